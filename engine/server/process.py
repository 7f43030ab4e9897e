"""A server in a child process, for scripts that drive one (the load benchmark, the tests): started
on a free loopback port, ready once `GET /health` answers 200, stopped with SIGINT (then killed)."""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path

from metalforge.errors import MetalforgeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(cmd: list[str], url: str, log: Path, timeout_s: float = 300.0, env=None):
    """Run `cmd` (its output to `log`) until the block ends; yield the process once `url`/health
    answers. A server that exits or does not answer in time is an error quoting its log's end."""
    import httpx
    name = " ".join(cmd[:4])
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise MetalforgeError(f"{name} exited with {process.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise MetalforgeError(f"{name} did not answer in {timeout_s:.0f} s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
