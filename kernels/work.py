"""A config's work counted from its geometry and access pattern, without running anything: the
same counters (traces.Counted) that the emulator's trace mode fills from a real run, so that one
pricing function (timing/model.py `price`) ranks configs in the tuner and prices the results.

A family's `work(config, shape, dtype)` describes each launch as SIMD-group instructions: which
lanes touch which bytes of which buffer, how often. The counters follow emulator/trace.py's rules:
a device instruction costs the distinct 32-byte sectors its lanes touch (an access counts its
first and last sector), a threadgroup instruction one pass plus its bank conflicts (per bank, the
distinct 4-byte words it serves, less one), a buffer's footprint its distinct bytes.
tests/test_work.py checks each family's counts against traces of the same configs.
"""
from __future__ import annotations

from functools import lru_cache

from metalforge.kernels.family import BANKS, Geometry
from metalforge.kernels.timing.traces import Counted

SECTOR = 32
WORD = 4


@lru_cache(maxsize=65536)
def sectors(accesses: tuple) -> int:
    """Distinct 32-byte sectors one instruction touches; `accesses`: (byte offset, bytes) per lane."""
    return len({s for at, n in accesses for s in (at // SECTOR, (at + n - 1) // SECTOR)})


@lru_cache(maxsize=65536)
def passes(offsets: tuple) -> int:
    """Passes over the 32 banks one threadgroup instruction takes; `offsets`: each lane's byte offset."""
    per_bank: dict = {}
    for word in {at // WORD for at in offsets}:
        per_bank[word % BANKS] = per_bank.get(word % BANKS, 0) + 1
    return max(per_bank.values(), default=1)


class Tally:
    """The counters of one launch, built up instruction by instruction."""

    def __init__(self, kernel: str, geometry: Geometry):
        self.kernel = kernel
        self.geometry = geometry
        self.footprints: dict = {}
        self.sector_bytes: dict = {}
        self.threadgroup_passes = 0
        self.fragment_ops = 0
        self.matrix_multiplies = 0
        self.barriers_per_threadgroup = 0
        self.simd_functions = 0

    def footprint(self, buffer: str, nbytes: int) -> None:
        """The distinct bytes of `buffer` the launch touches."""
        self.footprints[buffer] = self.footprints.get(buffer, 0) + nbytes

    def device(self, buffer: str, accesses, times: int = 1) -> None:
        """`times` SIMD-group instructions on `buffer`, each with these lanes' (offset, bytes)."""
        accesses = tuple(accesses)
        if accesses and times:
            self.sector_bytes[buffer] = self.sector_bytes.get(buffer, 0) + SECTOR * sectors(accesses) * times

    def whole_sectors(self, buffer: str, nbytes: int) -> None:
        """Device traffic on `buffer` known to cover whole 32-byte sectors, each once an instruction
        (rows starting on sectors, read whole): its sectors' bytes are its bytes."""
        self.sector_bytes[buffer] = self.sector_bytes.get(buffer, 0) + nbytes

    def threadgroup(self, offsets, times: int = 1) -> None:
        """`times` SIMD-group instructions on threadgroup memory at these lanes' byte offsets."""
        offsets = tuple(offsets)
        if offsets and times:
            self.threadgroup_passes += passes(offsets) * times

    def counted(self) -> Counted:
        g = self.geometry
        threadgroup = tuple(min(t, n) for t, n in zip(g.threadgroup, g.grid))
        features = {}
        for name in sorted(self.footprints):
            features[f"dram_bytes/{name}"] = self.footprints[name]
            features[f"sector_bytes/{name}"] = self.sector_bytes.get(name, 0)
        features.update({
            "threadgroup_passes": self.threadgroup_passes, "fragment_ops": self.fragment_ops,
            "matrix_multiplies": self.matrix_multiplies, "barriers": self.barriers_per_threadgroup * g.threadgroups,
            "simd_functions": self.simd_functions, "simd_fences": 0,   # our templates fence no SIMD-group
            "threadgroups": g.threadgroups,
            "threads": g.threadgroups * threadgroup[0] * threadgroup[1] * threadgroup[2]})
        return Counted(self.kernel, threadgroup, g.threadgroup_memory_bytes, features)
