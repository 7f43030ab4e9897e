"""The conformance front end (libclang) in a process of its own.

libclang parses whatever a kernel's source makes it parse: an exponential template, a macro bomb,
`#include "/dev/stdin"`. So it runs in a child process inside confine.Walls (bounded address
space, no network), which, once libclang is loaded, locks itself (Landlock) to the emulator's cache
folder: an `#include` of anything else is "file not found". Each check has the compile time limit;
a check past it, a crash or Ctrl-C ends the child, and the next check starts a fresh one.
Messages are JSON lines on its stdin and stdout.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time

from metalforge import signals

from . import confine, environment
from .compiler import CompileError, cache_dir

_lock = threading.Lock()
_child: subprocess.Popen | None = None
_owner = 0   # the process that started it (a forked child starts its own)


def check(msl: str, kernel_name: str, kernel_functions: frozenset[str] = frozenset(), library: bool = False):
    """conformance.check, in the front end's process: its Facts, or its ConformanceError."""
    from .conformance import ConformanceError, Facts
    limit = environment.compile_timeout_s()
    with _lock:
        child = _started()
        answer = _ask(child, {"msl": msl, "kernel": kernel_name, "kernels": sorted(kernel_functions),
                              "library": library}, limit, kernel_name)
    if "facts" in answer:
        tg, constants = answer["facts"]
        return Facts(int(tg), tuple((int(a), int(b)) for a, b in constants))
    if "refused" in answer:
        raise ConformanceError(str(answer["refused"]))
    raise CompileError(str(answer.get("error", "emulator: the front end answered out of protocol")))


def _started() -> subprocess.Popen:
    """The running child, or a new one; a new one too when the cache folder moved (the child may
    write only the folder it was started for)."""
    global _child, _owner
    cache = str(cache_dir())
    if _child is not None and _child.poll() is None and _child.args[-1] == cache and _owner == os.getpid():
        return _child
    if _child is not None and _owner == os.getpid():
        _end(_child)
    walls = confine.Walls(read=None, memory_bytes=environment.compiler_memory_bytes(), cpu_seconds=None,
                          file_bytes=1 << 30)
    with signals.held():   # a Ctrl-C while forking is not lost (see confine.run)
        _child = subprocess.Popen([sys.executable, "-m", "metalforge.emulator.frontend", cache],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  preexec_fn=walls.preexec_fn())
        _owner = os.getpid()
        atexit.register(_end, _child)
    return _child


def _ask(child: subprocess.Popen, request: dict, limit: float, kernel_name: str) -> dict:
    deadline = time.monotonic() + limit
    try:
        child.stdin.write((json.dumps(request) + "\n").encode())
        child.stdin.flush()
        line = b""
        while not line.endswith(b"\n"):
            wait = deadline - time.monotonic()
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, wait))
            if not ready:
                raise TimeoutError
            chunk = os.read(child.stdout.fileno(), 1 << 20)
            if not chunk:
                raise BrokenPipeError
            line += chunk
        return json.loads(line)
    except TimeoutError:
        _end(child)
        raise CompileError(f"emulator: the front end took longer than {limit:g} s on kernel `{kernel_name}` and was "
                           "stopped (a template or macro that expands without end? raise the limit with "
                           "METALFORGE_EMULATOR_COMPILE_TIMEOUT_S)") from None
    except (BrokenPipeError, ValueError):
        code = child.poll() if child.poll() is not None else _end(child)
        said = child.stderr.read(4000).decode(errors="replace").strip().splitlines() if code is not None else []
        cause = confine.signal_name(code) if code is not None and code < 0 else f"status {code}"
        if said and ("bad_alloc" in said[-1] or "MemoryError" in said[-1]):
            cause += ", out of memory"
        raise CompileError(f"emulator: the front end died on kernel `{kernel_name}` ({cause}; its limits: "
                           f"{environment.compiler_memory_bytes() >> 20} MiB, "
                           "METALFORGE_EMULATOR_COMPILE_MEMORY_MB)") from None
    except BaseException:
        _end(child)
        raise


def _end(child: subprocess.Popen) -> int | None:
    global _child
    confine.kill_group(child)
    for stream in (child.stdin, child.stdout):
        stream.close()
    if _child is child:
        _child = None
    return child.poll()


def _serve(cache: str) -> None:
    """The child: load libclang and the header, lock the file system down, answer checks."""
    from . import conformance
    conformance._index()
    conformance._precompiled_header()   # reads the installed libclang's version: before the lock
    conformance._pch_name(True)          # ... and the library variant's name, which reads it too
    confine.restrict_files(read=(cache,), write=(cache,))
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            facts = conformance.check(request["msl"], request["kernel"], frozenset(request["kernels"]),
                                      request["library"])
            answer = {"facts": [facts.threadgroup_declarations, [list(c) for c in facts.constant_declarations]]}
        except conformance.ConformanceError as e:
            answer = {"refused": str(e)}
        except Exception as e:   # reported to the caller, which raises it as a compile error
            answer = {"error": f"emulator: the front end failed on kernel `{request.get('kernel')}`: {e}"}
        out.write((json.dumps(answer) + "\n").encode())
        out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
