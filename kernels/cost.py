"""The analytic time model every family prices its configs with (Family.cost): what tuning uses
off a Mac. The family supplies what its kernel moves and computes; this module turns that into time.

It is a model, not a measurement, and every output built on it says `timer: model`. Its parts:
- memory time: bytes a config really moves (re-reads included) over the profile's bandwidth,
  scaled by how much memory-level parallelism the config keeps in flight;
- compute time: the kernel's arithmetic over the GPU's FP32 rate, scaled the same way;
- occupancy: threadgroups resident per core, limited by threadgroup memory and threads;
- fixed costs: launches, barriers and cross-SIMD-group merges.
Assumed per core (Apple does not publish these): 2048 resident threads, 64 KB of threadgroup
memory, and about 1024 threads in flight per core to saturate memory bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass

from metalforge.intmath import cdiv

THREADS_PER_CORE = 2048
TG_MEMORY_PER_CORE = 65536
THREADS_TO_SATURATE = 1024
LAUNCH_S = 4e-6           # one dispatch
BARRIER_S = 0.15e-6       # one threadgroup barrier, per threadgroup
SIMD_REDUCE_S = 0.02e-6   # one simd_sum per SIMD-group


@dataclass(frozen=True)
class Occupancy:
    resident_per_core: int
    threadgroups: int
    threads: int

    def parallel_fraction(self, device, ilp: float = 1.0) -> float:
        """Fraction of the bandwidth-saturating parallelism this launch keeps in flight."""
        active = min(self.threadgroups, self.resident_per_core * device.gpu_cores) * self.threads * ilp
        return min(1.0, active / (device.gpu_cores * THREADS_TO_SATURATE))

    def waves(self, device) -> int:
        return cdiv(self.threadgroups, self.resident_per_core * device.gpu_cores)


def occupancy(threads: int, tg_bytes: int, threadgroups: int) -> Occupancy:
    by_threads = max(1, THREADS_PER_CORE // threads)
    by_memory = TG_MEMORY_PER_CORE // tg_bytes if tg_bytes else by_threads
    return Occupancy(max(1, min(by_threads, by_memory)), threadgroups, threads)


def roofline(bytes_moved: float, flops: float, dev, parallel: float) -> float:
    memory = bytes_moved / (dev.memory_bandwidth_gbs * 1e9 * max(parallel, 1e-3))
    compute = flops / (dev.peak_fp32_tflops * 1e12 * max(parallel, 1e-3))
    return max(memory, compute)


# MLX's steel kernels multiply on SIMD-group matrices and ours (for now) do not: the speedup is an
# assumption, not a measurement, and goes when our prompt kernels use SIMD-group matrices too.
MLX_MMA_SPEEDUP = 4.0
