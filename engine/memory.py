"""MLX memory limits for an engine's lifetime, and the check that a model fits before loading it."""
from __future__ import annotations

import os
import re
import sys

import mlx.core as mx

from metalforge.errors import MetalforgeError
from metalforge import devices

LIMITS = ("wired_limit", "cache_limit", "memory_limit")


def working_set() -> tuple[int, str]:
    """(bytes, where the number comes from): Metal's recommended working set on a Mac, else the
    machine's physical memory."""
    info = devices.device_info()
    if info.get("max_recommended_working_set_size"):
        return int(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory (no Metal device)"


def parse_bytes(value, total: int, name: str) -> int:
    """An int of bytes, or a string: '80%' of `total`, '12GB', '512MiB'."""
    if isinstance(value, bool):
        raise MetalforgeError(f"memory {name}: expected bytes or a percentage, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise MetalforgeError(f"memory {name}: must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*(%|[KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise MetalforgeError(f"memory {name}: cannot read {value!r} (use bytes, '80%', '8GB' or '512MiB')")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    if unit == "%":
        if not 0 < number <= 100:
            raise MetalforgeError(f"memory {name}: percentage must be in (0, 100], got {value!r}")
        return int(total * number / 100)
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


class MemoryLimits:
    """Applies MLX's wired, cache and memory limits and restores the previous values."""

    def __init__(self, limits: dict | None):
        unknown = set(limits or {}) - set(LIMITS)
        if unknown:
            raise MetalforgeError(f"unknown memory setting(s) {sorted(unknown)}; valid: {', '.join(LIMITS)}")
        self.limits = dict(limits or {})
        self.previous: dict[str, int] = {}
        self.total, self.total_source = working_set()

    def apply(self) -> dict[str, int]:
        applied = {}
        for name in LIMITS:
            if name not in self.limits:
                continue
            value = parse_bytes(self.limits[name], self.total, name)
            if name == "wired_limit" and not mx.metal.is_available():
                print("metalforge: notice: wired_limit applies to Metal only; skipped on this machine", file=sys.stderr)
                continue
            setter = getattr(mx, f"set_{name}")
            self.previous[name] = setter(value)
            applied[name] = value
        return applied

    def restore(self) -> None:
        for name, value in self.previous.items():
            getattr(mx, f"set_{name}")(value)
        self.previous = {}


def check_fit(weights: int, kv: int, budget: int, source: str) -> None:
    if weights + kv > budget:
        raise MetalforgeError(
            f"the model ({weights / 2**30:.2f} GiB of weights) plus its KV pool ({kv / 2**30:.2f} GiB) needs "
            f"{(weights + kv) / 2**30:.2f} GiB, more than the {budget / 2**30:.2f} GiB available ({source}); "
            "load with a smaller kv_tokens or a smaller model")
