"""The old analytic time model, for the families that do not count their work yet (Family.cost;
prefill_attention): a family that counts it (Family.work) is priced by the per-kernel model
(kernels/timing/model.py), the one function that prices MLX's kernels and ours. Here the family
supplies what its kernel moves and computes; this module turns that into time.

It is a model, not a measurement: every output built on it says `timer: model` and carries the
model's error. Its parts, and where each number comes from:
- memory time: bytes * (A / published bandwidth + B / (GPU cores * clock)). A and B are FITTED
  (kernels/calibration.yaml) to published decode speeds of real models on 8 Apple chips;
- compute time: FLOPs * D / peak FP32, D FITTED per GPU generation (before M3, M3 on) to
  published prompt-processing speeds;
- a dispatch: the FITTED fixed cost per transformer layer C over the dispatches a layer makes
  (ASSUMED 14: norms, projections, RoPE, attention, MLP, residual adds, as llama.cpp and mlx-lm
  encode a llama layer);
- occupancy: threadgroups resident per core, limited by threadgroup memory and threads, and the
  share of the parallelism a launch keeps in flight. ASSUMED per core (Apple does not publish
  these, and end-to-end speeds cannot separate them): 2048 resident threads, 64 KB of threadgroup
  memory, about 1024 threads in flight to saturate memory, full occupancy up to 64 registers a
  lane; barrier and fragment-load costs.
It ranks those families' configs in the tuner's search. It does not price MLX's kernels: every ratio against
MLX is the per-kernel model's (kernels/timing), MLX's real kernel against our chosen config.
The fit, its data and its held-out error: kernels/calibration.py (fitted once; calibrate.py now fits the per-kernel model).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from metalforge.errors import MetalforgeError
from metalforge.intmath import cdiv

THREADS_PER_CORE = 2048
TG_MEMORY_PER_CORE = 65536
THREADS_TO_SATURATE = 1024
DISPATCHES_PER_LAYER = 14
BARRIER_S = 0.15e-6       # one threadgroup barrier, per threadgroup (assumed)
REGISTERS_AT_FULL_OCCUPANCY = 64   # 32-bit registers a lane can hold at full occupancy (assumed)
FRAGMENT_LOAD_COST = 0.5  # an 8x8 fragment read from threadgroup memory, in 8x8 multiply-accumulates (assumed)
DYNAMIC_CACHING_FROM = 15   # applegpu_g15 (M3) introduced the new shader core and dynamic caching


# ---- the fitted constants ---------------------------------------------------------------------
@dataclass(frozen=True)
class Constants:
    bandwidth_factor: float        # A
    core_seconds_per_byte: float   # B: seconds x cores x GHz per byte (1 / B: bytes per core-cycle)
    layer_overhead_s: float        # C
    compute_factor: dict           # D per generation group: "before_m3", "m3_on"


@dataclass(frozen=True)
class Calibration:
    constants: Constants
    held_out_error: dict    # "decode" / "prefill" -> median |predicted / measured - 1| on held-out chips
    points: int
    chips: int
    data: str               # digest of the measurements file it was fitted on

    def to_yaml(self) -> str:
        head = ("# Written by benchmarks/calibrate.py: the cost model's constants fitted to published Apple\n"
                "# measurements (benchmarks/data/apple_measurements.yaml). Do not edit by hand.\n")
        return head + yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def calibration_path() -> Path:
    return Path(str(resources.files("metalforge.kernels"))) / "calibration.yaml"


@lru_cache(maxsize=1)
def calibration() -> Calibration:
    """The shipped calibration. Missing or damaged: an error that says how to rebuild it."""
    path = calibration_path()
    try:
        raw = yaml.safe_load(path.read_text())
        return Calibration(constants=Constants(**raw["constants"]), held_out_error=dict(raw["held_out_error"]),
                           points=int(raw["points"]), chips=int(raw["chips"]), data=str(raw["data"]))
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise MetalforgeError(f"{path}: cost model calibration unreadable ({e}); it ships with metalforge "
                              "(no longer fitted): reinstall metalforge") from None


# ---- the primitives -------------------------------------------------------------------------
def generation_group(device) -> str:
    m = re.match(r"applegpu_g(\d+)", device.architecture)
    return "m3_on" if m and int(m.group(1)) >= DYNAMIC_CACHING_FROM else "before_m3"


def memory_terms(nbytes: float, dev) -> tuple[float, float]:
    """The coefficients of A and B in the memory time of `nbytes`."""
    return nbytes / (dev.memory_bandwidth_gbs * 1e9), nbytes / (dev.gpu_cores * dev.gpu_clock_ghz * 1e9)


def compute_term(flops: float, dev) -> float:
    """The coefficient of D in the compute time of `flops`."""
    return flops / (dev.peak_fp32_tflops * 1e12)


def memory_seconds(nbytes: float, dev, c: Constants | None = None) -> float:
    c = c or calibration().constants
    a, b = memory_terms(nbytes, dev)
    return a * c.bandwidth_factor + b * c.core_seconds_per_byte


def compute_seconds(flops: float, dev, c: Constants | None = None) -> float:
    c = c or calibration().constants
    return compute_term(flops, dev) * c.compute_factor[generation_group(dev)]


def launch_seconds() -> float:
    """One dispatch: the fitted cost per layer over the dispatches a layer makes."""
    return calibration().constants.layer_overhead_s / DISPATCHES_PER_LAYER


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


def occupancy(threads: int, tg_bytes: int, threadgroups: int, registers: int = 0) -> Occupancy:
    """Threadgroups resident per core: limited by threads, threadgroup memory and registers (a
    lane holding more than REGISTERS_AT_FULL_OCCUPANCY 32-bit values leaves room for fewer)."""
    resident_threads = THREADS_PER_CORE * min(1.0, REGISTERS_AT_FULL_OCCUPANCY / max(registers, 1))
    by_threads = max(1, int(resident_threads) // threads)
    by_memory = TG_MEMORY_PER_CORE // tg_bytes if tg_bytes else by_threads
    return Occupancy(max(1, min(by_threads, by_memory)), threadgroups, threads)


def load_efficiency(bytes_per_lane: float) -> float:
    """Share of the memory system's width a load of `bytes_per_lane` uses: 16 bytes a lane is full
    width (MLX's and llama.cpp's kernels load 16 bytes a lane); narrower loads waste transactions."""
    return min(1.0, bytes_per_lane / 16) ** 0.35


def roofline(bytes_moved: float, flops: float, dev, parallel: float) -> float:
    """The slower of moving the bytes and doing the arithmetic, at the parallelism kept in flight."""
    return max(memory_seconds(bytes_moved, dev), compute_seconds(flops, dev)) / max(parallel, 1e-3)


