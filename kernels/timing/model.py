"""The price of a dispatch from its trace counters on a device profile: one function for MLX's
kernels and ours, linear in a handful of constants fitted to published per-kernel timings
(fit.py, benchmarks/calibrate.py).

    seconds = host_call  (a point timed per call only: its host round trip, kernel_measurements.TIMERS)
            + launch     * dispatches (not in a GPU-timestamped point)
            + dram       * device bytes (each buffer's footprint)       / (bandwidth x active)
            + cache      * the same, for bytes the system level cache serves (a cache-hot point's)
            + onchip     * (32-byte sectors x 32 + 128 x threadgroup passes) / (cores x clock x active)
            + mma        * 8x8 MMAs x 1024 flops                         / (peak FP32 x active)
            + sync       * (barriers x threadgroups + SIMD-group functions) / (cores x clock x active)

What a timing includes besides the kernel follows how it was timed (a point's `timer`): a wall clock
around each call pays the host's round trip (command buffer commit, wait and wake-up: host_call) on top
of each dispatch's cost; calls queued together share one round trip, so each pays its dispatches
(launch) only; GPU timestamps show the kernel alone. A price without a timer is a dispatch among
others queued together (host_amortised), as a kernel runs in a model's step.
ASSUMED: a host_amortised timing's share of its queue's one round trip (1 / calls queued: 8 to
thousands in the data) is not counted.

active = min(1, threadgroups / cores): a launch with fewer threadgroups than cores leaves cores idle.
ASSUMED: such a launch pays nothing beyond its active share. Its serial path unhidden (a term of
cycles per barrier or reduction of a threadgroup, in launches of fewer threadgroups than cores)
lowers the held-out error (decode attention 55% -> 47%, qmm 45% -> 37%) but fits at 411 cycles an
operation, a DRAM round trip's size: it stands for the load each key of MLX's 2-pass attention waits
on, which the trace does not count, and priced our small-grid qmv configs up to 7x MLX's. Not shipped.
A threadgroup pass (one SIMD-group access to threadgroup memory, each bank conflict and 8x8
fragment load or store another) moves up to 128 bytes through the same on-chip SRAM as the L1's
sectors (Apple's GPU cores share one SRAM between the L1 cache and threadgroup memory): one
constant prices both, fitted mostly on MLX's qmv, whose sectors dominate it (ASSUMED: a pass
costs what 128 bytes of sectors cost).
ASSUMED, not fitted (the data cannot separate them): the terms add (no overlap of memory and
arithmetic), a core's share of bandwidth is 1 / cores, one threadgroup per core keeps it busy,
scalar arithmetic is not counted by the trace (it is folded into the memory and sync terms).
ASSUMED, seen in the largest held-out errors (benchmarks/calibrate.py prints them) and not modelled:
MLX's 2-pass decode attention on the M5 Max (mlx issue 3837) takes about 290 us + K/V bytes at
625 GB/s (its DRAM's 614) at 32,768 keys whatever the KV heads: a fixed cost the trace does not show;
bfloat16 arithmetic costs what float16's does (the M1 Max's bfloat16 qmm_t took 1.78x its float16
time, mlx PR 4216: one chip, one shape).
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


def price_in_step(counted, device, constants: Constants, dispatch_s: float) -> float:
    """Seconds for the dispatches `counted` as part of a whole step (a decode step's pipelined
    sequence of kernels): each costs the whole-model fit's per-dispatch cost instead of `launch`,
    the host round trip a kernel timed on its own carries (whole_model.py)."""
    return price(counted, device, dataclasses.replace(constants, launch=dispatch_s))
