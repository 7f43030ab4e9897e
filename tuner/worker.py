"""Extra worker processes on one study (`metalforge tune --workers N`).

Each worker is a separate Python process in its own session, sharing nothing but the study's
storage, exactly like a worker on another machine. Its own session keeps the terminal's Ctrl-C
away from it: the parent decides, and stops its workers with SIGTERM, which a running worker
turns into an orderly stop (its trial is recorded as interrupted and run again later)."""
from __future__ import annotations

import gc
import json
import logging
import signal
import subprocess
import sys
import traceback

import optuna

from metalforge.errors import MetalforgeError
from metalforge.tuner.shapes import Target
from metalforge.tuner.study import Settings, run_study


class Pool:
    """`with Pool(target, settings, n):` runs n workers beside the caller and waits for them;
    on an exception in the caller (Ctrl-C) it stops them first."""

    def __init__(self, target, settings, count: int):
        self.specs = [json.dumps({
            "family": target.family.name, "shape": dict(target.shape.__dict__), "dtype": target.dtype,
            "device": settings.device, "trials": settings.trials, "timeout": settings.timeout,
            "storage": settings.storage, "sampler": settings.sampler,
            # each worker its own stream: one seed would make them all propose the same configs
            "seed": None if settings.seed is None else (settings.seed + i + 1) % 2**32})
            for i in range(count)]
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-m", "metalforge.tuner.worker", spec],
                                       start_new_session=True, stdin=subprocess.DEVNULL)
                      for spec in self.specs]
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            # the interrupted frames' locals may hold an unfinished database cursor, and with it
            # SQLite's read lock, which the workers need to record their stop: let them go first
            traceback.clear_frames(tb)
            gc.collect()
            for p in self.procs:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=None if exc_type is None else 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return False


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(spec: str) -> int:
    signal.signal(signal.SIGTERM, _stop)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)   # as in the parent (tuner/cli.py)
    s = json.loads(spec)
    target = Target(s["family"], s["shape"], s["dtype"])
    try:
        run_study(target, Settings(device=s["device"], trials=s["trials"], timeout=s["timeout"], storage=s["storage"],
                                   sampler=s["sampler"], seed=s["seed"], warm_start=False))
    except KeyboardInterrupt:
        return 130
    except MetalforgeError as e:
        print(f"metalforge: worker error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
