"""An analytic time estimate for a kernel config on a device profile: what tuning uses off a Mac.

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

from metalforge import devices
from metalforge.kernels import dtypes
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


def estimate(family, config: dict, shape, dtype, device) -> float:
    """Modelled seconds for one call of `config` on `shape`."""
    dev = devices.get(device)
    d = dtypes.get(dtype)
    return {"qmv": _qmv, "qmm": _qmm, "decode_attention": _decode, "prefill_attention": _prefill}[family.name](
        family, config, shape, d, dev)


def _roofline(bytes_moved: float, flops: float, dev, parallel: float) -> float:
    memory = bytes_moved / (dev.memory_bandwidth_gbs * 1e9 * max(parallel, 1e-3))
    compute = flops / (dev.peak_fp32_tflops * 1e12 * max(parallel, 1e-3))
    return max(memory, compute)


def _qmv(fam, config, shape, dtype, dev) -> float:
    rows_per_tg = config["simdgroups"] * config["rows_per_simdgroup"]
    groups = cdiv(shape.N, rows_per_tg)
    occ = occupancy(32 * config["simdgroups"], fam.threadgroup_memory_bytes(config, shape, dtype), groups)
    padded_rows = groups * rows_per_tg
    weights = padded_rows * shape.K * shape.bits / 8 + 2 * padded_rows * (shape.K / shape.group_size) * dtype.size
    # x is re-read by every SIMD-group (mostly from cache) unless staged once per threadgroup
    x_reads = shape.M * shape.K * dtype.size * groups * (1 if config["stage_x"] else config["simdgroups"]) * 0.05
    # narrow per-lane loads waste memory transactions: 16 bytes per lane per load is full width
    load_bytes = config["values_per_lane"] * shape.bits / 8
    width = min(1.0, load_bytes / 16) ** 0.35
    # register pressure: M x R accumulators and M x V staged values per lane
    registers = shape.M * (config["rows_per_simdgroup"] + config["values_per_lane"])
    pressure = 1.0 if registers <= 96 else 96 / registers
    parallel = occ.parallel_fraction(dev, ilp=config["rows_per_simdgroup"] / 2) * width * pressure
    flops = 2 * shape.M * padded_rows * shape.K + 3 * padded_rows * shape.K   # FMAs plus unpacking
    t = _roofline(weights + x_reads, flops, dev, parallel)
    steps = cdiv(shape.K, 32 * config["values_per_lane"])
    if config["stage_x"]:
        t += 2 * steps * BARRIER_S * occ.waves(dev)
    t += shape.M * config["rows_per_simdgroup"] * SIMD_REDUCE_S * occ.waves(dev)
    return t + LAUNCH_S


def _qmm(fam, config, shape, dtype, dev) -> float:
    tiles_n, tiles_m = cdiv(shape.N, config["BN"]), cdiv(shape.M, config["BM"])
    occ = occupancy(config["threads"], fam.threadgroup_memory_bytes(config, shape, dtype), tiles_n * tiles_m)
    weights = shape.N * shape.K * shape.bits / 8 + 2 * shape.N * (shape.K / shape.group_size) * dtype.size
    # each row of tiles re-streams the weights and each column of tiles re-streams x (cache helps)
    moved = weights * (1 + 0.3 * (tiles_m - 1)) + shape.M * shape.K * dtype.size * (1 + 0.3 * (tiles_n - 1))
    outputs = tiles_m * config["BM"] * tiles_n * config["BN"]
    flops = 2 * outputs * shape.K + 4 * tiles_m * tiles_n * config["BN"] * shape.K
    # threadgroup-memory reads per FMA: small tiles per thread re-read more (1/BK amortises loads)
    per_thread = config["BM"] * config["BN"] / config["threads"]
    parallel = occ.parallel_fraction(dev, ilp=min(2.0, per_thread / 8)) * min(1.0, config["BK"] / 32) ** 0.25
    t = _roofline(moved, flops * 1.5, dev, parallel)
    return t + 2 * cdiv(shape.K, config["BK"]) * BARRIER_S * occ.waves(dev) + LAUNCH_S


def _decode(fam, config, shape, dtype, dev) -> float:
    sg = config["threads"] // 32
    g = shape.Hq // shape.Hkv
    heads = g if config["share_kv"] else 1
    tgs = shape.B * (shape.Hkv if config["share_kv"] else shape.Hq) * config["splits"]
    occ = occupancy(config["threads"], fam.threadgroup_memory_bytes(config, shape, dtype), tgs)
    kv = 2 * shape.B * shape.Hkv * shape.S * shape.D * dtype.size
    # without sharing, the G query heads of a KV head each stream it (partly from cache)
    kv_reads = kv * (1 if config["share_kv"] else 1 + (g - 1) * 0.35)
    partials = 2 * shape.B * shape.Hq * config["splits"] * (shape.D + 2) * 4 if config["splits"] > 1 else 0
    parallel = occ.parallel_fraction(dev, ilp=config["keys_per_step"] / 2)
    # SIMD-groups left without keys (short slices) add nothing but still merge
    keys_per_tg = cdiv(shape.S, config["splits"])
    busy = min(1.0, keys_per_tg / (sg * config["keys_per_step"]))
    flops = 4 * shape.B * shape.Hq * shape.S * shape.D + 6 * shape.B * shape.Hq * shape.S  # dot products, softmax
    t = _roofline(kv_reads + partials, flops, dev, parallel * busy)
    steps = cdiv(keys_per_tg, sg * config["keys_per_step"])
    t += steps * heads * config["keys_per_step"] * SIMD_REDUCE_S * occ.waves(dev)
    per_core_bandwidth = dev.memory_bandwidth_gbs * 1e9 / dev.gpu_cores
    t += (BARRIER_S + sg * heads * shape.D * 4 / per_core_bandwidth * 0.05) * occ.waves(dev)
    return t + LAUNCH_S * (2 if config["splits"] > 1 else 1)


def _prefill(fam, config, shape, dtype, dev) -> float:
    sg = config["simdgroups"]
    qtiles = cdiv(shape.L, config["BQ"])
    tgs = shape.B * shape.Hq * qtiles
    occ = occupancy(32 * sg, fam.threadgroup_memory_bytes(config, shape, dtype), tgs)
    stage = 2 if config["stage"] == "half" else 4
    q_bytes = shape.B * shape.Hq * shape.L * shape.D * dtype.size
    # every query tile streams the keys it can see (causal: about half on average)
    visible = shape.prefix + (shape.L + config["BQ"]) / 2
    kv_bytes = 2 * shape.B * shape.Hq * qtiles * visible * shape.D * dtype.size * 0.5  # half served by the cache
    out_bytes = q_bytes
    pairs = shape.B * shape.Hq * (shape.L * shape.prefix + shape.L * (shape.L + 1) / 2)
    # one simd_sum (5 shuffles) per (row, key) pair plus D/32 FMAs per lane; fp32 staging reads
    # twice the threadgroup-memory bytes of half staging
    lane_ops = pairs * 32 * (2 * shape.D / 32 * (1 + 0.25 * (stage == 4)) + 10)
    parallel = occ.parallel_fraction(dev, ilp=min(2.0, config["BQ"] / sg / 2))
    t = _roofline(q_bytes + kv_bytes + out_bytes, lane_ops, dev, parallel)
    ktiles = cdiv(int(visible), config["BK"])
    t += 2 * ktiles * BARRIER_S * occ.waves(dev)
    return t + LAUNCH_S


# ---- MLX's built-ins, modelled the same way (the baseline a tuned kernel must beat) -----------
MLX_BASELINES = {
    # qmv_fast: 2 SIMD-groups x 4 rows, 16 4-bit values (or 8 8-bit values) per lane per step
    "qmv": lambda shape: {"simdgroups": 2, "rows_per_simdgroup": 4, "stage_x": False,
                          "values_per_lane": 16 if shape.bits == 4 else 8},
    # steel qmm: 32 x 32 tiles, BK 32, 128 threads, SIMD-group matrix MMA
    "qmm": lambda shape: {"BM": 32, "BN": 32, "BK": 32, "threads": 128},
    # sdpa_vector: one 1024-thread threadgroup per query head; two-pass over 32 blocks at 4k+ keys
    "decode_attention": lambda shape: {"threads": 1024, "keys_per_step": 1, "share_kv": False,
                                       "splits": 32 if shape.S >= 4096 else 1},
    # steel attention: 32 x 16 tiles, 4 SIMD-groups, half staging, with SIMD-group matrix MMA
    "prefill_attention": lambda shape: {"BQ": 32, "BK": 16, "simdgroups": 4, "stage": "half"},
}
MLX_MMA_SPEEDUP = 4.0  # steel's simdgroup_matrix products against our scalar loops


def baseline_estimate(family, shape, dtype, device) -> float:
    """Modelled seconds for MLX's own kernel for the job."""
    config = family.config(MLX_BASELINES[family.name](shape))
    t = estimate(family, config, shape, dtype, device)
    if family.name in ("prefill_attention", "qmm"):
        t = LAUNCH_S + (t - LAUNCH_S) / MLX_MMA_SPEEDUP
    return t
