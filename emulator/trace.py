"""Trace mode: exact counts of what one dispatch did, as the traced build's runtime counts them
while the dispatch runs (mf_runtime.cpp, "trace mode"): device memory traffic as the distinct 32-,
64- and 128-byte sectors each SIMD-group access instruction touches (coalescing) and each buffer's
unique footprint, threadgroup memory accesses and bank conflicts (32 banks of 4 bytes), SIMD-group
matrix loads, stores and multiply-accumulates, barriers and SIMD-group functions, threads and
threadgroups. The runtime keeps counts, not events, so a model's full shapes trace in the time
their emulation takes.

A SIMD-group instruction is the n-th access of each lane of a SIMD-group within its threadgroup,
counted afresh from each barrier and SIMD-group function the lanes meet at: exact where control
flow between those points is uniform across the SIMD-group. Device accesses are those through
device pointers, threadgroup accesses those of threadgroup arrays and `threadgroup T*` pointers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


SECTORS = (32, 64, 128)
PER_BUFFER, TAIL = 6, 8   # the runtime's counts: six per buffer, then eight for the dispatch (mf_launch_traced)


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
    simd_fences: int = 0              # simdgroup_barrier calls per SIMD-group (no data between lanes)

    def sectors(self, size: int) -> int:
        return sum(b.sectors[size] for b in self.device.values())

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Dispatch:
    """One traced dispatch: the kernel (its host name), its geometry and what it did."""
    kernel: str
    threadgroups: tuple[int, int, int]   # the grid in threadgroups, as Metal's dispatchThreadgroups counts it
    threadgroup: tuple[int, int, int]    # threads per threadgroup
    trace: Trace

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "threadgroups": list(self.threadgroups), "threadgroup": list(self.threadgroup),
                "counters": self.trace.as_dict()}


def buffer(buffers: int) -> np.ndarray:
    """Room for the counts of a dispatch of a kernel with `buffers` buffers."""
    return np.zeros(buffers * PER_BUFFER + TAIL, dtype=np.int64)


def summarize(counts: np.ndarray, names: dict[int, str], stats: dict, threadgroups: int, tg_bytes: int) -> Trace:
    """The counters of one dispatch from the runtime's counts; `names`: buffer position -> the kernel's name for it."""
    threads = stats["threads"]
    per = counts[:len(names) * PER_BUFFER].reshape(len(names), PER_BUFFER)
    tg_accesses, tg_instructions, conflicts, loads, stores, multiplies, exchanges, fences = (int(c) for c in counts[-TAIL:])
    out = Trace(threads=threads, threadgroups=threadgroups, threadgroup_memory_bytes=tg_bytes,
                barriers=stats["barrier_crossings"] // max(1, threads),
                simd_functions=exchanges - multiplies,
                threadgroup_accesses=tg_accesses, threadgroup_instructions=tg_instructions, bank_conflicts=conflicts,
                matrix_loads=loads, matrix_stores=stores, matrix_multiplies=multiplies,
                simd_fences=fences)
    for i, name in sorted(names.items(), key=lambda x: x[1]):
        accesses, instructions, s32, s64, s128, footprint = (int(c) for c in per[i])
        if accesses:
            out.device[name] = BufferTraffic(accesses, instructions, dict(zip(SECTORS, (s32, s64, s128))), footprint)
    return out
