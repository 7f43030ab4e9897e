"""Extra worker processes on one study (`metalforge tune --workers N`).

Each worker is a separate Python process in its own session, sharing nothing but the study's
storage, exactly like a worker on another machine. Its own session keeps the terminal's Ctrl-C
away from it: the parent decides, and stops its workers with SIGTERM, which a running worker
turns into an orderly stop (its trial is recorded as interrupted and run again later)."""
from __future__ import annotations

import dataclasses
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
from metalforge.tuner.settings import Settings
from metalforge.tuner.study import run_study


def spec(target, settings: Settings, index: int) -> str:
    """What worker `index` is told, as JSON: the target and every field of the settings, with a
    stream of its own (one seed would make all workers propose the same configs) and no seeding
    of the study (the parent seeded it)."""
    seed = None if settings.seed is None else (settings.seed + index + 1) % 2**32
    return json.dumps({"family": target.family.name, "shape": dict(target.shape.__dict__), "dtype": target.dtype,
                       "settings": dataclasses.replace(settings, seed=seed, warm_start=False).to_dict()})


def read_spec(text: str) -> tuple[Target, Settings]:
    s = json.loads(text)
    return Target(s["family"], s["shape"], s["dtype"]), Settings.from_dict(s["settings"])


class Pool:
    """`with Pool(target, settings, n):` runs n workers beside the caller and waits for them;
    on an exception in the caller (Ctrl-C) it stops them first."""

    def __init__(self, target, settings, count: int):
        self.specs = [spec(target, settings, i) for i in range(count)]
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


def main(text: str) -> int:
    signal.signal(signal.SIGTERM, _stop)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)   # as in the parent (tuner/cli.py)
    try:
        target, settings = read_spec(text)
        run_study(target, settings)
    except KeyboardInterrupt:
        return 130
    except MetalforgeError as e:
        print(f"metalforge: worker error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
