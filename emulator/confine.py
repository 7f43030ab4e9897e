"""The operating system's walls around the emulator's child processes (the C++ compiler, the
front end, kernel workers): resource limits, a network namespace of their own, and Landlock, which
leaves a process only the folders it is given. Each layer is probed at run time and used where
the kernel permits; `layers()` says which are active. The kernel worker adds a seccomp filter of
its own (mf_worker.cpp) once it has loaded its library."""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache

from metalforge import signals

# Linux x86-64 system call numbers and Landlock's constants (linux/landlock.h).
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | (1 << 14) | (1 << 15)   # + TRUNCATE, IOCTL_DEV
_ALL_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_READ = _EXECUTE | _READ_FILE | _READ_DIR
_WRITE = (1 << 16) - 1                      # everything, within the folder given
_NET_TCP = (1 << 0) | (1 << 1)              # bind, connect (ABI 4)
_SCOPES = (1 << 0) | (1 << 1)               # abstract unix sockets, signals (ABI 6)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@lru_cache(maxsize=1)
def landlock_abi() -> int:
    """Landlock's ABI version, 0 where the kernel lacks it or it is disabled."""
    abi = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, int(abi))


@lru_cache(maxsize=1)
def network_namespace() -> bool:
    """Whether a child can get a network namespace of its own (root, or unprivileged user namespaces)."""
    try:
        return subprocess.run(["true"], preexec_fn=_own_network, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def layers() -> dict[str, str]:
    """Which walls the emulator's processes get on this machine, in words."""
    abi = landlock_abi()
    return {
        "processes": "the front end, the compiler and every kernel run in child processes",
        "seccomp": "kernel workers: only memory, thread, futex, own-signal and own-socket system calls",
        "rlimits": "address space, CPU time, file size, open files",
        "landlock": f"ABI {abi}: files" + (", TCP" if abi >= 4 else "") + (", signals" if abi >= 6 else "")
                    if abi else "not available (kernel without Landlock): file access is not restricted",
        "network namespace": "yes" if network_namespace() else "not available: network is not isolated "
                                                                   "by a namespace",
    }


@dataclass(frozen=True)
class Walls:
    """What one child process may touch. `read`/`write`: folders or files it keeps; everything
    else on the file system is gone for it (where Landlock is available). `read=None` leaves the
    file system to the child to lock itself (the front end does, once its libraries are loaded)."""
    read: tuple[str, ...] | None = ()
    write: tuple[str, ...] = ()
    memory_bytes: int | None = 4 << 30
    cpu_seconds: int | None = 600
    file_bytes: int | None = 256 << 20
    open_files: int | None = 256
    network: bool = False

    def preexec_fn(self):
        """The function that raises the walls in a child between fork and exec (what can be probed
        is probed here, in the parent)."""
        own_network = not self.network and network_namespace()
        landlock_abi()
        return lambda: self._raise(own_network)

    def _raise(self, own_network: bool) -> None:
        try:
            self._raise_walls(own_network)
        except BaseException as e:   # subprocess reports only "Exception occurred in preexec_fn"
            os.write(2, f"metalforge: the sandbox could not be set up: {e!r}\n".encode())
            raise

    def _raise_walls(self, own_network: bool) -> None:
        os.setsid()   # its own process group: Ctrl-C at a terminal reaches the caller, which ends it
        if own_network:
            _own_network()
        if self.read is not None:   # before the limits: it opens each path (the caller's descriptors are still open)
            restrict_files(self.read, self.write)
        for limit, value in ((resource.RLIMIT_AS, self.memory_bytes), (resource.RLIMIT_CPU, self.cpu_seconds),
                             (resource.RLIMIT_FSIZE, self.file_bytes), (resource.RLIMIT_NOFILE, self.open_files),
                             (resource.RLIMIT_CORE, 0)):
            if value is not None:
                resource.setrlimit(limit, (value, value))


def _own_network() -> None:
    """Move this (child) process into a new, empty network namespace: loopback down, no routes."""
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNET if uid == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    if uid != 0:   # map ourselves, so files we create keep our owner
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def restrict_files(read: tuple[str, ...], write: tuple[str, ...]) -> bool:
    """Landlock this process (and what it executes) to `read` and `write`; no TCP, no signals or
    abstract sockets outside its domain where the ABI has them. False where Landlock is absent."""
    abi = landlock_abi()
    if not abi:
        return False
    fs = _ALL_FS[min(abi, 5)]
    attr = _RulesetAttr(fs, _NET_TCP if abi >= 4 else 0, _SCOPES if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        for paths, rights in ((read, _READ), (write, _WRITE)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue   # not on this machine: nothing to allow
                try:
                    allowed = rights & fs & (_FILE_RIGHTS if not os.path.isdir(path) else ~0)
                    rule = _PathBeneath(allowed, fd)
                    if _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1),
                                     ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                        raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
                finally:
                    os.close(fd)
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if _libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return True


# What any program needs to start: its libraries and the loader's cache, read-only.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")


def kill_group(proc: subprocess.Popen) -> None:
    """End a child started with Walls.preexec (its own session) and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run(cmd: list[str], walls: Walls, timeout_s: float, env: dict | None = None,
        output_bytes: int = 1 << 20) -> subprocess.CompletedProcess:
    """Run a tool (the compiler, nm) inside `walls` with a wall-clock limit; Ctrl-C or the limit
    end it and its children at once. Its output goes to files (capped by the file-size limit) of
    which the first `output_bytes` are kept. Raises subprocess.TimeoutExpired on the limit."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = None
        try:
            # Python drops an exception raised in an at-fork handler (filelock has some): a Ctrl-C
            # while Popen forks would be lost, so it waits until the child exists.
            with signals.held():
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        preexec_fn=walls.preexec_fn(), env=env)
            proc.wait(timeout=timeout_s)
        except BaseException:
            if proc is not None:
                kill_group(proc)
            raise
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read(output_bytes).decode(errors="replace"))
    return subprocess.CompletedProcess(cmd, proc.returncode, *texts)


def signal_name(returncode: int) -> str:
    """'SIGSEGV (a segmentation fault)' for a child that a signal ended."""
    sig = -returncode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
    what = {"SIGSEGV": "an invalid memory access", "SIGILL": "an illegal instruction", "SIGBUS": "a bus error",
            "SIGSYS": "a forbidden system call", "SIGKILL": "killed (out of memory, or its CPU time limit)",
            "SIGXCPU": "its CPU time limit", "SIGXFSZ": "its output size limit", "SIGABRT": "aborted",
            "SIGFPE": "an arithmetic fault", "SIGTRAP": "a trap instruction"}.get(name)
    return f"{name} ({what})" if what else name
