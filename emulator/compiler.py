"""Compiling emulated kernels: a C++ compiler run inside confine.Walls (only its own files and the
build folder, bounded memory, CPU and time), a disk cache keyed by everything that affects the
binary, load-time code refused before linking, and compile errors mapped back to the kernel's MSL
lines. The compiled library is run by runner.Library, never loaded into this process."""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

from metalforge.errors import MetalforgeError

from . import confine, environment, loadtime
from .runner import Library
from .source import METAL_HEADERS, compat_header, kernel_interface, runtime_source, worker_source


class CompileError(MetalforgeError):
    """The kernel's MSL did not compile; the message points at lines of the generated MSL."""


@lru_cache(maxsize=1)
def compiler() -> tuple[str, str]:
    """(path, version line) of the C++ compiler: $CXX, else g++, else clang++."""
    for cand in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if cand and shutil.which(cand):
            path = shutil.which(cand)
            version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()
            return path, (version[0] if version else "")
    raise MetalforgeError(
        "emulator: no C++ compiler found; install one (Debian/Ubuntu: apt-get install g++, "
        "Fedora: dnf install gcc-c++, macOS: xcode-select --install) or set CXX"
    )


def _cpu_flags() -> list[str]:
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
        return ["-mf16c"] if re.search(r"\bf16c\b", info) else []
    return []


def flags(checked: bool) -> list[str]:
    """Flags of both objects of a kernel's library: the runtime and the kernel."""
    # -g1: line tables only, so a fault's report names the kernel's MSL line in either mode
    opt = ["-O1", "-g"] if checked else ["-O2", "-g1"]
    # Hidden visibility keeps each kernel's runtime state (registries, errors) private to its
    # library: GCC would otherwise unify inline functions' statics across loaded libraries.
    # Stack-clash protection probes every page of a large frame, so a private array bigger than a
    # thread's stack hits the guard page below it (an error) instead of another thread's stack.
    return ["-std=c++17", *opt, "-fPIC", "-pthread", "-fvisibility=hidden", "-Wno-attributes",
            "-fno-strict-aliasing", "-fstack-clash-protection", *_cpu_flags()]


# The kernel's own object: no system include folder at all (it sees MSL's names only, from
# metal_compat.h), no exceptions or RTTI (Metal has neither). Metal has no double: unsuffixed
# literals are float, as -fsingle-precision-constant makes them.
KERNEL_FLAGS = ["-nostdinc", "-nostdinc++", "-fno-exceptions", "-fno-rtti", "-fsingle-precision-constant"]


def cache_dir() -> Path:
    root = os.environ.get("METALFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "metalforge")
    path = Path(root) / "emulator"
    path.mkdir(parents=True, exist_ok=True)
    return path


_loaded: dict[str, Library] = {}
_lock = threading.Lock()


def build(unit_source: str, kernel_name: str, checked: bool, library: bool = False,
          traced: bool = False) -> tuple[Library, Path]:
    """Compile (or fetch from the cache) the shared library for one translation unit; returns the
    runner.Library that launches it (in worker processes) and its path.

    The cache key hashes the full source, the headers, the runtime, the compiler and its flags,
    so a changed source never runs a stale binary. Writes go to a temporary file renamed into
    place, so concurrent processes share the cache safely.
    """
    cxx, version = compiler()
    header = compat_header(checked or traced, library, traced)
    fl = flags(checked or traced)
    key = hashlib.sha256("\0".join([unit_source, header, runtime_source(), cxx, version, " ".join(fl + KERNEL_FLAGS)])
                         .encode()).hexdigest()[:24]
    target = cache_dir() / f"{key}.so"
    with _lock:
        if key in _loaded:
            return _loaded[key], target
    include = _header_dir(header, cxx, version, fl)
    if not target.exists():   # compiled outside the lock: threads may precompile in parallel
        _compile(unit_source, include, header, kernel_name, cxx, fl, target)
    with _lock:
        if key not in _loaded:
            _loaded[key] = Library(target, kernel_name, include / "mf_worker")
        return _loaded[key], target


def _tool(cmd: list[str], folder: Path, what: str, read: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the compiler (or a binutils tool) on files in `folder`: it reads the system's files and
    `read`, writes `folder` only, and is stopped at the compile time limit."""
    limit = environment.compile_timeout_s()
    walls = confine.Walls(read=(*confine.SYSTEM_READ, *read), write=(str(folder),),
                          memory_bytes=environment.compiler_memory_bytes(), cpu_seconds=int(limit) + 1)
    try:
        proc = confine.run(cmd, walls, limit, env={**os.environ, "TMPDIR": str(folder)})
    except subprocess.TimeoutExpired:
        raise CompileError(f"emulator: {what} took longer than {limit:g} s and was stopped (a template or macro "
                           "that expands without end? raise the limit with METALFORGE_EMULATOR_COMPILE_TIMEOUT_S)") from None
    if proc.returncode < 0 or "virtual memory exhausted" in proc.stderr or "out of memory" in proc.stderr:
        cause = confine.signal_name(proc.returncode) if proc.returncode < 0 else "it ran out of memory"
        raise CompileError(f"emulator: {what} was stopped: {cause} (its limits: {limit:g} s, "
                           "METALFORGE_EMULATOR_COMPILE_TIMEOUT_S; "
                           f"{environment.compiler_memory_bytes() >> 20} MiB, METALFORGE_EMULATOR_COMPILE_MEMORY_MB)")
    return proc


def _is_gcc(cxx: str, version: str) -> bool:
    return "g++" in Path(cxx).name or "gcc" in version.lower() or "(GCC)" in version or "Debian" in version


def _header_dir(header: str, cxx: str, version: str, fl: list[str]) -> Path:
    """A folder with what every kernel of these flags shares: metal_compat.h (with GCC also its
    precompiled form: parsing it is most of a small kernel's compile time), Metal's header names,
    the runtime's object and the worker program that runs kernels. Built in a temporary folder
    renamed into place."""
    runtime = runtime_source()
    key = hashlib.sha256("\0".join([header, runtime, worker_source(), cxx, version, " ".join(fl + KERNEL_FLAGS)])
                         .encode()).hexdigest()[:16]
    folder = cache_dir() / f"header-{key}"
    if folder.exists():
        return folder
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix="header-build-"))
    try:
        (tmp / "metal_compat.h").write_text(header)
        for name in METAL_HEADERS:   # `#include <metal_stdlib>`: already there, metal_compat.h comes first
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_text(f"// Metal's <{name}>: the emulator declares all of it in metal_compat.h\n")
        (tmp / "mf_kernel.h").write_text(kernel_interface())
        (tmp / "mf_runtime.cpp").write_text(runtime)
        (tmp / "mf_worker.cpp").write_text(worker_source())
        for cmd, what in (([cxx, *fl, "-c", str(tmp / "mf_runtime.cpp"), "-o", str(tmp / "mf_runtime.o")], "runtime"),
                          ([cxx, "-std=c++17", "-O2", str(tmp / "mf_worker.cpp"), "-o", str(tmp / "mf_worker"), "-ldl"],
                           "worker program")):
            proc = _tool(cmd, tmp, f"compiling the emulator's {what}")
            if proc.returncode != 0:
                raise CompileError(f"emulator: its {what} failed to compile with {cxx} ({version}):\n{proc.stderr[-2000:]}")
        if _is_gcc(cxx, version):
            pch = _tool([cxx, *fl, *KERNEL_FLAGS, "-x", "c++-header", "-w", str(tmp / "metal_compat.h"),
                         "-o", str(tmp / "metal_compat.h.gch")], tmp, "precompiling metal_compat.h")
            if pch.returncode != 0:
                (tmp / "metal_compat.h.gch").unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, folder)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _compile(unit_source: str, include: Path, header: str, kernel_name: str, cxx: str, fl: list[str],
             target: Path) -> None:
    """The kernel's object, compiled against MSL's names only (the compiler sees the system's
    files and the shared folder, and writes the build folder only), checked for what it links
    against and for load-time code, then linked with the runtime's object into one shared library."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as tmp:
        src = Path(tmp) / "unit.cpp"
        src.write_text('#include "metal_compat.h"\n' + unit_source)
        obj, out = Path(tmp) / "unit.o", Path(tmp) / "unit.so"
        proc = _tool([cxx, *fl, *KERNEL_FLAGS, "-I", str(include), "-c", str(src), "-o", str(obj)], Path(tmp),
                     f"compiling kernel `{kernel_name}`", read=(str(include),))
        if proc.returncode != 0:
            raise CompileError(format_compile_errors(proc.stderr, kernel_name, unit_source))
        outside = [name for name in undefined_symbols(obj) if not _may_link(name, header)]
        if outside:
            raise CompileError(
                f"emulator: kernel `{kernel_name}` refers to {', '.join(f'`{n}`' for n in outside[:5])}, outside Metal's "
                "standard library: a kernel can call only Metal's functions and its own, and the emulator links it "
                "with nothing else")
        load_time = loadtime.load_time_code(obj)
        if load_time:
            raise CompileError(f"emulator: kernel `{kernel_name}` is refused before loading: it has "
                               + "; ".join(load_time[:3]))
        proc = _tool([cxx, *fl, "-shared", str(obj), str(include / "mf_runtime.o"), "-o", str(out)], Path(tmp),
                     f"linking kernel `{kernel_name}`", read=(str(include),))
        if proc.returncode != 0:
            raise CompileError(f"emulator: kernel `{kernel_name}` failed to link:\n{proc.stderr[-2000:]}")
        os.replace(out, target)


# ---- what a kernel's object may refer to ----------------------------------------------------------
# The functions of mf_kernel.h; the C library's memory copies (the compiler emits them for struct
# copies); thread-local and static-initialisation plumbing; libgcc's arithmetic helpers
# (__extendhfsf2, __popcountdi2, ...); the math functions metal_compat.h calls as builtins, and
# sincosf, which GCC makes of a sin and a cos of one value (mlx-lm's rope kernels do that).
_RUNTIME_API = re.compile(r"mf::(self|to_scheduler|tg_memory|tg_offset|tg_bytes|simd_sync|out_of_bounds|tg_log|device_buffer|trace|trace_simdgroup_operation)\(")
_PLUMBING = {"memcpy", "memmove", "memset", "__tls_get_addr", "_GLOBAL_OFFSET_TABLE_", "__dso_handle",
             "__cxa_atexit", "__cxa_guard_acquire", "__cxa_guard_release", "__cxa_guard_abort", "sincosf"}


def _may_link(name: str, header: str) -> bool:
    return (name in _PLUMBING or bool(_RUNTIME_API.match(name)) or name in _libgcc_helpers()
            or name in _builtin_functions(header))


@lru_cache(maxsize=1)
def _libgcc_helpers() -> frozenset[str]:
    """The arithmetic helpers libgcc itself defines (__extendhfsf2, __popcountdi2, ...): read from
    the compiler's libgcc, so a C library name shaped like one (__dup2) is not among them."""
    cxx = compiler()[0]
    archive = subprocess.run([cxx, "-print-libgcc-file-name"], capture_output=True, text=True).stdout.strip()
    nm = shutil.which("nm")
    if not archive or not nm or not Path(archive).exists():
        return frozenset()
    out = subprocess.run([nm, "-g", "--defined-only", archive], capture_output=True, text=True).stdout
    return frozenset(line.split()[-1] for line in out.splitlines() if re.match(r"[0-9a-f]+ T __\w+$", line))


@lru_cache(maxsize=4)
def _builtin_functions(header: str) -> frozenset[str]:
    return frozenset(re.findall(r"__builtin_(\w+)", header))


def undefined_symbols(obj: Path) -> list[str]:
    """The names an object file needs from elsewhere, demangled."""
    nm = shutil.which("nm")
    if not nm:
        raise MetalforgeError("emulator: `nm` (binutils) is needed to check what a kernel links against; "
                              "install binutils (Debian/Ubuntu: apt-get install binutils)")
    proc = _tool([nm, "-u", "-C", str(obj)], obj.parent, "reading the kernel's symbols")
    if proc.returncode != 0:
        raise MetalforgeError(f"emulator: nm failed on a kernel's object: {proc.stderr.strip()[:500]}")
    return [line.split(None, 1)[1].strip() for line in proc.stdout.splitlines() if line.strip().startswith(("U ", "w "))]


def format_compile_errors(stderr: str, kernel_name: str, unit_source: str) -> str:
    """Keep the diagnostics that point into the kernel's MSL, with the offending source line."""
    msl_file = f"{kernel_name}.metal"
    msl_lines = unit_source.split(f'#line 1 "{msl_file}"\n', 1)[-1].splitlines()
    picked = []
    for line in stderr.splitlines():
        m = re.match(rf".*{re.escape(msl_file)}:(\d+):(?:\d+:)?\s*(?:fatal )?(error|note|warning)?:?\s*(.*)", line)
        if m and m.group(2) == "error":
            n = int(m.group(1))
            text = msl_lines[n - 1].strip() if 0 < n <= len(msl_lines) else ""
            picked.append(f"  line {n}: {m.group(3)}\n      {text}")
    if not picked:
        errors = [ln for ln in stderr.splitlines() if "error" in ln][:5]
        picked = ["  " + ln for ln in errors] or ["  " + stderr.strip()[-2000:]]
    return f"emulator: kernel `{kernel_name}` failed to compile (lines of its generated MSL; verbose=True prints it):\n" + "\n".join(picked[:10])


def addr2line(library: Path, offsets: list[int], msl_file: str) -> dict[int, int]:
    """Map code offsets in a checked-mode library (built with -g) to lines of the kernel's MSL."""
    tool = shutil.which("addr2line")
    if not tool or not offsets:
        return {}
    # With -i each address prints its inline chain, innermost first: take the frame in the MSL.
    result = {}
    for off in offsets:
        out = subprocess.run([tool, "-i", "-e", str(library), hex(off)], capture_output=True, text=True).stdout
        for frame in out.splitlines():
            m = re.match(rf".*{re.escape(msl_file)}:(\d+)", frame)
            if m:
                result[off] = int(m.group(1))
                break
    return result
