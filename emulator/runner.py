"""Launching a compiled kernel library: the one place where emulated kernel code runs.

A library (a kernel's object linked with the runtime, see compiler.py) runs only in worker
processes (mf_worker.cpp): started inside confine.Walls (address-space, CPU-time, file-size and
open-file limits; no network; Landlock leaves it the system's libraries and its own library), it
loads the library and then installs a seccomp filter under which it can do nothing but compute on
the memory it was given. Buffers cross through one shared-memory arena per worker (a memfd mapped
by both sides), never the caller's own memory: a kernel cannot read or write the caller's heap,
and the caller copies outputs out of the arena only after the worker has answered. A worker's
death, a hang past the time limit or Ctrl-C ends that worker (SIGKILL, at once); the caller gets
an EmulatorError naming the kernel and the cause, or its KeyboardInterrupt, and the next launch
starts a fresh worker.

    lib = Library(path_of_so, "my_kernel")
    lib.threadgroup_bytes                       # the runtime's sum of threadgroup declarations
    result = lib.launch("mf_launch", [Arg(x), Arg(out, output=True)], grid=(n, 1, 1),
                        threadgroup=(256, 1, 1), workers=2, checked=False, timeout_s=10)
    result.rc, result.stats, result.errors      # outputs are back in `out`

`entry` names any exported function of the library with mf_launch's signature
(`int (void** buffers, const long long* meta, const long long* bytes, int workers, int checked)`),
so a library of several kernels exports one entry per kernel and dispatches each through here.
"""
from __future__ import annotations

import collections
import ctypes
import mmap
import os
import select
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metalforge.intmath import cdiv

from . import confine, environment
from .errors import EmulatorError

_REQUEST = struct.Struct("<4siiiQ9q")
_REPLY = struct.Struct("<4si3qi")
_ALIGN = 64
_MAX_BUFFERS = 4096
_UNBOUND = (1 << 64) - 1   # an arena offset that stands for a null pointer
_IDLE_PER_LIBRARY = 2
_LIVE_LIBRARIES = 16
# Largest grid dimension Metal takes: threads_per_grid is a uint3.
MAX_GRID_DIMENSION = (1 << 32) - 1


@dataclass
class Arg:
    """One buffer of a launch. Inputs are read from `array` (any strides: the span it reaches
    is copied); outputs (`output=True`) are written back into `array`, which must be
    C-contiguous, starting from its contents when `initialised`, else from zeros. `count` is the
    element count checked mode bounds accesses by (default: the elements `array` reaches), of
    `itemsize` bytes each (default the array's: a library kernel may read bytes as uint32). No
    array: an unbound buffer, a null pointer to the kernel (as in Metal, a fault only when read)."""
    array: np.ndarray | None
    output: bool = False
    initialised: bool = False
    count: int | None = None
    itemsize: int | None = None

    def span(self) -> tuple[int, int]:
        """(offset of the first byte from the data pointer, bytes) the array reaches."""
        a = self.array
        if a is None or a.size == 0:
            return 0, 0
        lo = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s < 0)
        hi = sum((n - 1) * s for n, s in zip(a.shape, a.strides) if s > 0) + a.itemsize
        return lo, hi - lo

    def elements(self) -> int:
        if self.count is not None:
            return self.count
        a = self.array
        if a is None or a.size == 0:
            return 0
        if any(s < 0 for s in a.strides):
            return 1 << 62      # checked mode cannot bound a view that runs backwards
        return 1 + sum((n - 1) * s for n, s in zip(a.shape, a.strides)) // a.itemsize

    def guarded_bytes(self) -> int:
        """Bytes the runtime puts between guard pages; 0 leaves the buffer unguarded (backwards views)."""
        n = self.elements()
        if n == 0:
            return 0
        return n * (self.itemsize or self.array.itemsize) if n < (1 << 62) else 0


@dataclass
class Launched:
    rc: int                  # the entry's: 0 fine, -1 errors reported
    stats: dict
    errors: list[str]


def geometry(grid, threadgroup) -> list[int]:
    """MLX's dispatch of `grid` threads in `threadgroup`-sized groups: each threadgroup dimension
    clamped to the grid, partial groups at the edges. Returns grid, group size and group counts."""
    grid = [int(g) for g in grid]
    tg = [int(t) for t in threadgroup]
    if len(grid) != 3 or len(tg) != 3 or min(grid) < 1 or min(tg) < 1:
        raise ValueError(f"[metal_kernel] grid and threadgroup must be three positive integers, got "
                         f"{tuple(grid)} and {tuple(tg)}")
    if max(grid) > MAX_GRID_DIMENSION or max(tg) > MAX_GRID_DIMENSION:
        raise ValueError(f"[metal_kernel] grid {tuple(grid)} has a dimension larger than a Metal grid takes "
                         f"({MAX_GRID_DIMENSION} threads)")
    if grid[0] * grid[1] * grid[2] >= 1 << 64:
        raise ValueError(f"[metal_kernel] grid {tuple(grid)} has {grid[0] * grid[1] * grid[2]} threads, more than a "
                         "64-bit count holds")
    nominal = [min(t, g) for g, t in zip(grid, tg)]
    return [*grid, *nominal, *(cdiv(g, t) for g, t in zip(grid, nominal))]


class _Worker:
    """One worker process serving one library."""

    def __init__(self, library: Library):
        self.library = library
        self.owner = os.getpid()   # a forked child must not share this worker's socket
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = parent
        self.log = tempfile.TemporaryFile()
        walls = confine.Walls(read=(*confine.SYSTEM_READ, str(library.path), str(library.worker_binary)),
                              memory_bytes=environment.worker_memory_bytes(), cpu_seconds=3600,
                              file_bytes=1 << 20, open_files=64)
        try:
            self.proc = subprocess.Popen([str(library.worker_binary), str(library.path), str(child.fileno())],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log,
                                         pass_fds=(child.fileno(),), preexec_fn=walls.preexec_fn(),
                                         env={"LIBC_FATAL_STDERR_": "1"})   # glibc's fatal messages to the log
        finally:
            child.close()
        self.arena: mmap.mmap | None = None
        self.arena_view: np.ndarray | None = None
        hello = self._receive(time.monotonic() + 60, "loading its library")
        if hello[:4] != b"MFOK" or len(hello) != 12:
            self.close()
            raise EmulatorError(f"{library.name}: its worker process could not load the kernel's library: "
                                f"{hello[4:400].decode(errors='replace')}")
        self.threadgroup_bytes = struct.unpack("<Q", hello[4:])[0]

    def _receive(self, deadline: float | None, doing: str) -> bytes:
        """The worker's next packet; its death, the deadline or Ctrl-C end it (and raise)."""
        try:
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([self.sock], [], [], wait)
                if ready:
                    data = self.sock.recv(1 << 20)
                    if data:
                        return data
                    raise EmulatorError(self._death(doing))
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError
        except BaseException:
            self.close()
            raise

    def _death(self, doing: str) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self.log.seek(0)
        said = [line for line in self.log.read(1 << 16).decode(errors="replace").splitlines() if line.strip()]
        last = said[-1].strip()[:300] if said else ""
        if code is not None and code < 0:
            cause = f"ended by {confine.signal_name(code)}"
        elif code == 71:
            cause = f"stopped by the sandbox: {last.removeprefix('mf-worker: ')} (a kernel may only compute)"
            last = ""
        else:
            cause = f"exited with status {code}"
        if "bad_alloc" in last or "out of memory" in last:
            cause += f": it ran out of memory (the worker's limit is {environment.worker_memory_bytes() >> 20} MiB, "\
                     "METALFORGE_EMULATOR_MEMORY_MB)"
        elif last:
            cause += f": {last}"
        return f"{self.library.name}: the kernel's worker process died while {doing}, {cause}"

    def launch(self, entry: str, args: list[Arg], meta: list[int], workers: int, checked: int,
               timeout_s: float | None) -> Launched:
        if len(args) > _MAX_BUFFERS:
            raise EmulatorError(f"{self.library.name}: {len(args)} buffers, more than the emulator passes ({_MAX_BUFFERS})")
        offsets, spans, total = [], [], 0
        for a in args:
            lo, size = a.span()
            offsets.append(_UNBOUND if a.array is None else total - lo)   # where the array's data pointer lands
            spans.append((total, lo, size))
            total += (size + _ALIGN - 1) // _ALIGN * _ALIGN
        fds = self._arena_for(max(total, _ALIGN))
        base = self.arena_view.ctypes.data
        for a, (start, lo, size) in zip(args, spans):
            if a.output and not a.initialised:
                ctypes.memset(base + start, 0, size)
            elif size:
                ctypes.memmove(base + start, a.array.ctypes.data + lo, size)
        n = len(args)
        packet = (_REQUEST.pack(b"MFGO", workers, int(checked), n, len(self.arena), *meta)
                  + struct.pack(f"<{n}q{n}q{n}Q", *(a.elements() for a in args), *(a.guarded_bytes() for a in args),
                                *offsets) + entry.encode())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            socket.send_fds(self.sock, [packet], fds)
        except OSError:
            raise EmulatorError(self._death("receiving a launch")) from None
        finally:
            for fd in fds:
                os.close(fd)
        try:
            reply = self._receive(deadline, "running the kernel")
        except TimeoutError:
            raise EmulatorError(f"{self.library.name}: the kernel ran past its time limit of {timeout_s:g} s and was "
                                "stopped (an endless loop? raise the limit with timeout= or "
                                "METALFORGE_EMULATOR_TIMEOUT_S)") from None
        if len(reply) < _REPLY.size or reply[:4] != b"MFRE":
            self.close()
            raise EmulatorError(f"{self.library.name}: its worker process answered out of protocol")
        _, rc, threads, crossings, lanes, count = _REPLY.unpack_from(reply)
        errors = [m.decode(errors="replace") for m in reply[_REPLY.size:].split(b"\0")[:max(0, min(count, 64))]]
        for a, (start, lo, size) in zip(args, spans):
            if a.output and size:
                ctypes.memmove(a.array.ctypes.data, base + start, size)
        return Launched(rc, {"threads": threads, "barrier_crossings": crossings, "simd_lanes": lanes}, errors)

    def _arena_for(self, size: int) -> list[int]:
        """Grow the shared arena to `size` bytes: a new memfd, whose descriptor goes with the request."""
        if self.arena is not None and len(self.arena) >= size:
            return []
        size = max(size, 2 * len(self.arena) if self.arena is not None else 1 << 20)
        self._drop_arena()
        fd = os.memfd_create("metalforge-buffers", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.arena = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.arena_view = np.frombuffer(self.arena, dtype=np.uint8)
        return [fd]

    def _drop_arena(self) -> None:
        self.arena_view = None
        if self.arena is not None:
            self.arena.close()
            self.arena = None

    def close(self) -> None:
        confine.kill_group(self.proc)
        self.sock.close()
        self.log.close()
        self._drop_arena()


class Library:
    """A compiled kernel library and the sandboxed workers that run it (one launch per worker at a
    time; concurrent launches get workers of their own, up to two kept idle)."""

    def __init__(self, path: Path, name: str, worker_binary: Path):
        self.path = Path(path)
        self.name = name
        self.worker_binary = Path(worker_binary)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._threadgroup_bytes: int | None = None

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.owner == os.getpid():
                    return worker
        _touch(self)
        return _Worker(self)

    def _give(self, worker: _Worker) -> None:
        with self._lock:
            if len(self._idle) < _IDLE_PER_LIBRARY:
                self._idle.append(worker)
                return
        worker.close()

    @property
    def threadgroup_bytes(self) -> int:
        if self._threadgroup_bytes is None:
            worker = self._take()
            self._threadgroup_bytes = worker.threadgroup_bytes
            self._give(worker)
        return self._threadgroup_bytes

    def launch(self, entry: str, args: list[Arg], *, grid, threadgroup, workers: int, checked: int,
               timeout_s: float | None) -> Launched:
        """Run `entry` over `grid` (MLX's dispatch: see geometry) in a sandboxed worker; outputs
        land in their Args' arrays. `checked`: 0 plain, 1 bounds- and race-checked (True), 2
        bounds-checked only, 3 bounds-checked with lanes in lockstep at threadgroup accesses. Raises EmulatorError when the worker dies or overruns
        `timeout_s`, KeyboardInterrupt when interrupted (the worker is ended either way)."""
        meta = geometry(grid, threadgroup)
        worker = self._take()
        result = worker.launch(entry, args, meta, workers, checked, timeout_s)   # raises after closing it
        self._give(worker)
        return result

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_recent: collections.OrderedDict[int, Library] = collections.OrderedDict()
_recent_lock = threading.Lock()


def _touch(library: Library) -> None:
    """Keep workers for the most recently started libraries only; older ones' idle workers end."""
    with _recent_lock:
        _recent[id(library)] = library
        _recent.move_to_end(id(library))
        old = [_recent.popitem(last=False)[1] for _ in range(max(0, len(_recent) - _LIVE_LIBRARIES))]
    for library in old:
        library.close()
