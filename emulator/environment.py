"""The emulator's environment variables, each read and checked here, with one wording."""
from __future__ import annotations

import os

from metalforge.errors import MetalforgeError


def number(name: str, default: float | None, *, minimum: float, whole: bool = False) -> float | None:
    """$name as a number >= minimum (a whole one if `whole`); unset or empty gives `default`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum or value != value:
        kind = "a whole number" if whole else "a number"
        raise MetalforgeError(f"{name} must be {kind} >= {minimum:g}, got {raw!r}")
    return value


def checked() -> bool:
    """METALFORGE_EMULATOR_CHECKED: run kernels in checked mode (bounds, races) by default."""
    return os.environ.get("METALFORGE_EMULATOR_CHECKED", "0").strip().lower() in ("1", "true", "yes", "on")


def threads() -> int:
    """METALFORGE_EMULATOR_THREADS: OS threads a dispatch runs threadgroups on (default: every core)."""
    return int(number("METALFORGE_EMULATOR_THREADS", max(1, os.cpu_count() or 1), minimum=1, whole=True))


def timeout_s() -> float | None:
    """METALFORGE_EMULATOR_TIMEOUT_S: seconds a launch may run (default: no limit)."""
    return number("METALFORGE_EMULATOR_TIMEOUT_S", None, minimum=1e-3)


def compile_timeout_s() -> float:
    """METALFORGE_EMULATOR_COMPILE_TIMEOUT_S: seconds the front end or the compiler may take on one kernel."""
    return number("METALFORGE_EMULATOR_COMPILE_TIMEOUT_S", 120.0, minimum=1e-3)


def worker_memory_bytes() -> int:
    """METALFORGE_EMULATOR_MEMORY_MB: the address space of a kernel's worker process (default 8 GiB)."""
    return int(number("METALFORGE_EMULATOR_MEMORY_MB", 8192, minimum=64, whole=True)) << 20


def compiler_memory_bytes() -> int:
    """Address space of the compiler and the front end on one kernel (3 GiB: a template or macro
    bomb ends there instead of taking the machine)."""
    return int(number("METALFORGE_EMULATOR_COMPILE_MEMORY_MB", 3072, minimum=256, whole=True)) << 20
