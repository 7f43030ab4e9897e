"""Trace mode: exact counts of what one dispatch did, from the records the traced build writes (see
MF_TRACE in metal_compat.h): device memory traffic as the distinct 32-, 64- and 128-byte sectors
each SIMD-group access instruction touches (coalescing) and each buffer's unique footprint,
threadgroup memory accesses and bank conflicts (32 banks of 4 bytes), SIMD-group matrix loads,
stores and multiply-accumulates, barriers and SIMD-group functions, threads and threadgroups.

A SIMD-group instruction is the n-th access of each lane of a SIMD-group within its threadgroup:
exact where control flow is uniform across the SIMD-group (divergent lanes pair up wrongly).
Device accesses are those through the kernel's buffer arguments, threadgroup accesses those
through arrays declared in the kernel (not through `threadgroup T*` helper arguments).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from metalforge.errors import MetalforgeError

DEVICE, THREADGROUP, MATRIX_LOAD, MATRIX_STORE, MATRIX_MULTIPLY = range(5)
SECTORS = (32, 64, 128)
BANKS, BANK_BYTES = 32, 4
RECORD = 8   # numbers per record


@dataclass
class BufferTraffic:
    accesses: int           # lane accesses
    instructions: int       # SIMD-group access instructions
    sectors: dict           # sector size -> sectors touched, summed over instructions
    footprint_bytes: int    # distinct bytes touched in the dispatch


@dataclass
class Trace:
    threads: int
    threadgroups: int
    threadgroup_memory_bytes: int
    barriers: int                     # barrier instructions per threadgroup (crossings / threads)
    simd_functions: int               # SIMD-group shuffles, reductions, votes (lane exchanges / 32)
    device: dict = field(default_factory=dict)          # buffer name -> BufferTraffic
    threadgroup_accesses: int = 0
    threadgroup_instructions: int = 0
    bank_conflicts: int = 0           # extra passes over the banks, summed over instructions
    matrix_loads: int = 0             # SIMD-group matrix operations (each by a whole SIMD-group)
    matrix_stores: int = 0
    matrix_multiplies: int = 0

    def sectors(self, size: int) -> int:
        return sum(b.sectors[size] for b in self.device.values())

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Dispatch:
    """One traced dispatch: the kernel (its host name), its geometry and what it did."""
    kernel: str
    threadgroups: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    trace: Trace

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "threadgroups": list(self.threadgroups), "threadgroup": list(self.threadgroup),
                "counters": self.trace.as_dict()}


def buffer(capacity: int) -> np.ndarray:
    """Room for `capacity` records after a header record, whose first number the traced launch
    entry (emulator/library.py) sets to the accesses the dispatch made."""
    return np.zeros((capacity + 1) * RECORD, dtype=np.int64)


def summarize(records: np.ndarray, names: dict[int, str], stats: dict, threadgroups: int, tg_bytes: int) -> Trace:
    """The counters of one dispatch from its records; `names`: buffer position -> the kernel's name for it."""
    used = int(records[0])
    capacity = records.size // RECORD - 1
    if used > capacity:
        raise MetalforgeError(f"emulator: the trace holds {capacity} accesses and the dispatch made {used}: trace a "
                              "smaller shape or give trace_capacity")
    r = records[RECORD:(used + 1) * RECORD].reshape(used, RECORD)
    kind = r[:, 0]
    threads = stats["threads"]
    mma = r[kind == MATRIX_MULTIPLY]
    out = Trace(threads=threads, threadgroups=threadgroups, threadgroup_memory_bytes=tg_bytes,
                barriers=stats["barrier_crossings"] // max(1, threads),
                simd_functions=(stats["simd_lanes"] - len(mma)) // 32,
                matrix_loads=_instructions(r[kind == MATRIX_LOAD]), matrix_stores=_instructions(r[kind == MATRIX_STORE]),
                matrix_multiplies=_instructions(mma))
    dev = r[kind == DEVICE]
    for p, name in sorted(((p, names.get(int(p), "?")) for p in np.unique(dev[:, 1])), key=lambda x: x[1]):
        mine = dev[dev[:, 1] == p]
        out.device[name] = BufferTraffic(
            accesses=len(mine), instructions=_instructions(mine),
            sectors={size: _sectors(mine, size) for size in SECTORS},
            footprint_bytes=len(np.unique(np.concatenate([mine[mine[:, 7] > k, 6] + k
                                                          for k in range(int(mine[:, 7].max()))]))))
    tg = r[kind == THREADGROUP]
    out.threadgroup_accesses = len(tg)
    out.threadgroup_instructions = _instructions(tg)
    out.bank_conflicts = _bank_conflicts(tg)
    return out


def _group_ids(r: np.ndarray) -> np.ndarray:
    """One id per SIMD-group instruction: (threadgroup, SIMD-group, sequence number), as one int64."""
    if len(r) == 0:
        return np.zeros(0, dtype=np.int64)
    tg = np.unique(r[:, 2], return_inverse=True)[1].reshape(-1)
    key = (tg * 64 + r[:, 3]) * (int(r[:, 5].max()) + 1) + r[:, 5]
    return np.unique(key, return_inverse=True)[1].reshape(-1)


def _pairs(g: np.ndarray, values: np.ndarray) -> int:
    """Distinct (instruction, value) pairs."""
    return len(np.unique(g * (int(values.max()) + 1) + values)) if len(g) else 0


def _instructions(r: np.ndarray) -> int:
    return int(_group_ids(r).max()) + 1 if len(r) else 0


def _sectors(r: np.ndarray, size: int) -> int:
    """Distinct `size`-byte sectors per instruction, summed (an access may straddle two)."""
    g = _group_ids(r)
    first, last = r[:, 6] // size, (r[:, 6] + r[:, 7] - 1) // size
    return _pairs(np.concatenate([g, g]), np.concatenate([first, last]))


def _bank_conflicts(r: np.ndarray) -> int:
    """Per instruction, the most distinct 4-byte words any one bank serves, less one (a word read by
    several lanes is one broadcast), summed over instructions."""
    if len(r) == 0:
        return 0
    g = _group_ids(r)
    words = r[:, 6] // BANK_BYTES
    distinct = np.unique(g * (int(words.max()) + 1) + words)           # (instruction, word) once each
    gi, word = distinct // (int(words.max()) + 1), distinct % (int(words.max()) + 1)
    bank_key, per_bank = np.unique(gi * BANKS + word % BANKS, return_counts=True)
    worst = np.zeros(int(g.max()) + 1, dtype=np.int64)
    np.maximum.at(worst, bank_key // BANKS, per_bank)
    return int((worst - 1).sum())
