"""The price of a dispatch from its trace counters on a device profile: one function for MLX's
kernels and ours, linear in a handful of constants fitted to published per-kernel timings
(fit.py, benchmarks/calibrate.py).

    seconds = host_call  * the host's round trips the clock holds (per call: 1; queued n per wait: 1/n)
            + launch     * dispatches (not in a GPU-timestamped point)
            + dram       * device bytes (each buffer's footprint)       / (bandwidth x active)
            + cache      * the same, for bytes the system level cache serves (a cache-hot point's)
            + onchip     * (32-byte sectors x 32 + 128 x threadgroup passes) / (cores x clock x active)
            + mma        * 8x8 MMAs x 1024 flops                         / (peak FP32 x active)
            + sync       * (barriers x threadgroups + SIMD-group functions) / (cores x clock x active)

What a timing includes besides the kernel follows how it was timed (a point's `timer` and
`calls_per_wait`, kernel_measurements.py): a wall clock around each call pays the host's round trip
(command buffer commit, wait and wake-up: host_call) on top of each dispatch's cost; n calls queued
per wait share one, 1/n each (mlx's sdpa_bench.py evaluates 8 chained attentions per wait, its
time_fn one call of 10); GPU timestamps show the kernel alone. A price without a timer is a dispatch
among others of a model's step (host_amortised, no share: the step's one wait is counted once by
engine/whole_model.py). ASSUMED: where the source does not say how many calls share a wait
(test-backend-ops' graphs hold hundreds to thousands of runs), the share is not counted.
The round trip is one constant for every chip and host (fitted at about 0.23 ms): it is the ~0.2 ms
fixed cost of the M5 Max's per-call decode attention of mlx issue 3837 (0.307 ms at one KV head,
0.351 ms at four, where mlx PR 4077's loop of 20 calls per wait times the same shape at 0.156 ms)
and of the M3 Max's steel attention under 256 tokens (mlx PR 1610: about 0.3 ms per wait of 8).

active = min(1, threadgroups / cores): a launch with fewer threadgroups than cores leaves cores idle.
ASSUMED: such a launch pays nothing beyond its active share. Its serial path unhidden (a term of
cycles per barrier or reduction of a threadgroup, in launches of fewer threadgroups than cores)
lowered the held-out error before the host's round trips were counted (decode attention 55% -> 47%,
qmm 45% -> 37%) but fitted at 411 cycles an operation and priced our small-grid qmv configs up to
7x MLX's. Not shipped.
ASSUMED: a threadgroup costs nothing beyond its work. A term of cycles per threadgroup was fitted
until this round (at 0); freed with the host's round trips counted, it takes 699 cycles a
threadgroup with the cache term held at 0, where it stands in for the cache-hot points' bytes
(MLX's qmv launches a threadgroup per 8 rows: its threadgroups grow with its bytes; without the 9
cache-hot points it fits at 108), lowers the mean held-out error by 0.1 point with the cache term
free, and raises our qmv's median ratio over MLX's in the parity table from 1.16x to 1.48x (ours
launch 8x fewer threadgroups than MLX's qmv at 4096 x 4096, for the same bytes). Removed.
A threadgroup pass (one SIMD-group access to threadgroup memory, each bank conflict and 8x8
fragment load or store another) moves up to 128 bytes through the same on-chip SRAM as the L1's
sectors (Apple's GPU cores share one SRAM between the L1 cache and threadgroup memory): one
constant prices both, fitted mostly on MLX's qmv, whose sectors dominate it (ASSUMED: a pass
costs what 128 bytes of sectors cost).
ASSUMED, not fitted (the data cannot separate them): the terms add (no overlap of memory and
arithmetic), a core's share of bandwidth is 1 / cores, one threadgroup per core keeps it busy,
scalar arithmetic is not counted by the trace (it is folded into the memory and sync terms), a
`simdgroup_barrier` fence costs nothing (the trace counts them apart, `simd_fences`: a SIMD-group's
lanes run in step, so a fence exchanges no data; priced by the sync term they stood in for MLX's
MMA cost - three a step of steel's BlockMMA - and made its qmm look 2.3-4.9x slower than ours).
ASSUMED, seen in the largest held-out errors (benchmarks/calibrate.py prints them) and not modelled:
bfloat16 arithmetic costs what float16's does (the M1 Max's bfloat16 qmm_t took 1.78x its float16
time, mlx PR 4216: one chip, one shape; a term of MMA flops in bfloat16 on the M1 and M2, which
lack it in hardware, lowers qmm's held-out error 28% -> 18% but rests on that one point and raises
decode and prefill attention's; not shipped); the Ultras' decode attention (M1 Ultra -53%, M2 Ultra
-29% held out), whose pass 1 reads each K/V head once per query head from threadgroups on
different cores (mlx issue 4076): traffic through the GPU's L2 that neither the trace's L1 sectors
nor its DRAM footprint count (a hypothesis: the trace has no per-threadgroup footprint to test it);
MLX's GQA pass 1 at head dim 64 (the M5 Max's 64/8 heads, -27% to -41%): unexplained.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

PIPELINED = "host_amortised"   # the timer of a dispatch queued among others
PASS_BYTES = 128   # a SIMD-group's threadgroup access: 32 lanes x 4 bytes
MMA_FLOPS = 2 * 8 * 8 * 8


@dataclass(frozen=True)
class Constants:
    host_call: float   # seconds per call timed on its own: the host's round trip
    launch: float      # seconds per dispatch
    dram: float        # x (bytes / published bandwidth)
    cache: float       # x (bytes / published bandwidth), bytes served by the system level cache
    onchip: float      # core-cycles per byte through the core's SRAM (L1 sectors, threadgroup passes)
    mma: float         # x (MMA flops / peak FP32)
    sync: float        # core-cycles per barrier or SIMD-group function

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, t) for t in TERMS])

    @classmethod
    def of(cls, values) -> "Constants":
        """From a vector in TERMS' order (a fit's solution)."""
        return cls(**dict(zip(TERMS, map(float, values), strict=True)))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# the constants' names, in the order of their vectors: the fields of Constants, the one place they are listed
TERMS = tuple(f.name for f in dataclasses.fields(Constants))


def dispatch_terms(c, device, timer: str = PIPELINED) -> dict:
    """{term: coefficient} of one dispatch `c` (traces.Counted) on `device` as a clock of kind
    `timer` sees it, the host's round trip of the call aside (`terms`)."""
    f = c.features
    cycles = device.gpu_cores * device.gpu_clock_ghz * 1e9
    active = min(1.0, f["threadgroups"] / device.gpu_cores)
    return {"launch": float(timer != "gpu"),
            "dram": c.total("dram_bytes") / (device.memory_bandwidth_gbs * 1e9 * active),
            "onchip": (c.total("sector_bytes") + PASS_BYTES * (f["threadgroup_passes"] + f["fragment_ops"]))
            / (cycles * active),
            "mma": f["matrix_multiplies"] * MMA_FLOPS / (device.peak_fp32_tflops * 1e12 * active),
            "sync": (f["barriers"] + f["simd_functions"]) / (cycles * active)}


def terms(counted, device, timer: str = PIPELINED, host_waits: float | None = None) -> np.ndarray:
    """The coefficients of TERMS in the time of the dispatches `counted` (traces.Counted) on `device`,
    as a clock of kind `timer` (kernel_measurements.TIMERS) sees them: one call of the whole list,
    carrying `host_waits` of the host's round trips (by default one timed per call, else none).
    `cache` stays 0 here: which bytes a cache serves is the point's, not the trace's (fit.point_terms)."""
    total = dict.fromkeys(TERMS, 0.0)
    total["host_call"] = float(timer == "host_per_call") if host_waits is None else host_waits
    for c in counted:
        for name, value in dispatch_terms(c, device, timer).items():
            total[name] += value
    return np.array([total[t] for t in TERMS])


def price(counted, device, constants: Constants, timer: str = PIPELINED) -> float:
    """Seconds for the dispatches `counted` on `device`: the same rule whoever wrote the kernel."""
    return float(terms(counted, device, timer) @ constants.vector())

