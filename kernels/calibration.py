"""The cost model's free constants, fitted to published Apple measurements, and its stated error.

The per-kernel model (kernels/cost.py) prices a kernel as memory time plus compute time plus fixed
overheads. The same three primitives, summed over a transformer's layers, predict whole-model
tokens per second; those predictions are compared with tokens per second that people have
published for real models on real chips (benchmarks/data/apple_measurements.yaml), and the few
constants of the primitives are fitted there by least squares on relative error:

- decode (memory-bound), seconds per token:
      bytes * (A / bandwidth + B / (gpu_cores * clock)) + layers * C
  A: how far from the published peak bandwidth a chip's memory system runs; B: bytes a core can
  move per cycle (bandwidth is core-limited on the large M1 parts, as published numbers show);
  C: fixed cost per layer (a dozen dispatches and their encoding).
- prefill (compute-bound), seconds per token:
      flops * D[generation] / peak_fp32 + (weight reads + layers * C) / tokens per forward pass
  D: inverse of the fraction of peak FP32 a SIMD-group-matrix kernel sustains, one value before
  the M3 GPU (Apple GPU family 8 and earlier) and one from M3 on (dynamic caching, new shader core).

What remains of the old analytic model, for kernels/cost.py's prefill pricing until it moves to the
per-kernel model: calibration.yaml holds its constants, last written before benchmarks/calibrate.py
moved to the per-kernel model (tests/test_calibration.py checks they are this fit of the data).
"""
from __future__ import annotations

import dataclasses
import statistics

import numpy as np

from metalforge.errors import MetalforgeError
from metalforge.files import digest as data_digest
from metalforge.kernels import cost
from metalforge.kernels.cost import Calibration, Constants
from metalforge.kernels.model_measurements import KINDS, ModelSizes, Point, load_points
from metalforge.kernels.timing.fit import nonnegative_lstsq

KV_BYTES = 2            # the KV cache is float16 in every engine measured
GROUPS = ("before_m3", "m3_on")


def matmul_params(a: ModelSizes) -> float:
    """Parameters read by matrix products per token: all but an untied embedding table (looked up)."""
    return a.params_b * 1e9 - (0 if a.tied else a.vocab * a.hidden)


def kv_bytes(a: ModelSizes, context: float) -> float:
    return 2 * a.layers * a.kv_heads * a.head_dim * context * KV_BYTES


def attention_flops(a: ModelSizes, context: float) -> float:
    """QK^T and PV for one query token against `context` keys."""
    return 4 * a.layers * a.heads * a.head_dim * context


def weight_bytes(p: Point) -> float:
    """Bytes of weights read per forward pass (the embedding table's share is only looked up)."""
    return p.weight_gib * 2**30 * matmul_params(p.sizes) / (p.sizes.params_b * 1e9)


# ---- the model ----------------------------------------------------------------------------------
def _decode_features(p: Point) -> np.ndarray:
    """Coefficients of (A, B, C) in seconds per decoded token."""
    nbytes = weight_bytes(p) + kv_bytes(p.sizes, p.context)
    return np.array([*cost.memory_terms(nbytes, p.device), p.sizes.layers])


def _prefill_parts(p: Point, c: Constants) -> tuple[np.ndarray, float]:
    """Seconds per prompt token as (coefficients of D before_m3 / m3_on, known seconds)."""
    dev = p.device
    per_pass = min(p.chunk, p.tokens)
    flops = 2 * matmul_params(p.sizes) + attention_flops(p.sizes, p.tokens / 2)   # causal: mean context L/2
    coeff = np.array([cost.compute_term(flops, dev) if g == cost.generation_group(dev) else 0.0 for g in GROUPS])
    return coeff, (cost.memory_seconds(weight_bytes(p), dev, c) + p.sizes.layers * c.layer_overhead_s) / per_pass


def predict(p: Point, c: Constants) -> float:
    """Modelled tokens per second for a point."""
    if p.kind == "decode":
        t = _decode_features(p) @ [c.bandwidth_factor, c.core_seconds_per_byte, c.layer_overhead_s]
    else:
        coeff, known = _prefill_parts(p, c)
        t = coeff @ [c.compute_factor[g] for g in GROUPS] + known
    return 1.0 / t


def fit(points: list[Point]) -> Constants:
    """Fit the constants by least squares on relative error (each row divided by its measured time)."""
    decode = [p for p in points if p.kind == "decode"]
    prefill = [p for p in points if p.kind == "prefill"]
    if len(decode) < 3 or not prefill:
        raise MetalforgeError("calibration needs at least 3 decode points and 1 prefill point")
    a = np.array([_decode_features(p) * p.tokens_per_s for p in decode])
    x = nonnegative_lstsq(a, np.ones(len(decode)))
    partial = Constants(float(x[0]), float(x[1]), float(x[2]), {"before_m3": 1.0, "m3_on": 1.0})
    rows, rhs = [], []
    for p in prefill:
        coeff, known = _prefill_parts(p, partial)
        rows.append(coeff * p.tokens_per_s)
        rhs.append(1.0 - known * p.tokens_per_s)
    rows = np.array(rows)
    d = nonnegative_lstsq(rows, np.array(rhs))
    # a group without prefill points keeps the other group's factor rather than a zero
    seen = [bool(rows[:, i].any()) for i in range(2)]
    fallback = next((d[i] for i in range(2) if seen[i]), 1.0)
    return dataclasses.replace(partial, compute_factor={g: float(d[i] if seen[i] else fallback)
                                                        for i, g in enumerate(GROUPS)})


def relative_errors(points: list[Point], c: Constants) -> list[float]:
    return [predict(p, c) / p.tokens_per_s - 1.0 for p in points]


def leave_one_chip_out(points: list[Point]) -> dict[str, list[tuple[Point, float]]]:
    """For each chip: the constants fitted without it, judged on its own points (pred/meas - 1)."""
    out = {}
    for chip in sorted({p.chip for p in points}):
        train = [p for p in points if p.chip != chip]
        held = [p for p in points if p.chip == chip]
        c = fit(train)
        out[chip] = list(zip(held, relative_errors(held, c)))
    return out


def held_out_error(points: list[Point]) -> dict[str, float]:
    """Median absolute relative error on held-out chips, for decode and for prefill."""
    errors = {k: [] for k in KINDS}
    for pairs in leave_one_chip_out(points).values():
        for p, e in pairs:
            errors[p.kind].append(abs(e))
    return {k: round(float(statistics.median(v)), 4) for k, v in errors.items() if v}


def calibrate(path) -> Calibration:
    """Fit the measurements file at `path` and state the fit's held-out error."""
    points = load_points(path)
    return Calibration(constants=fit(points), held_out_error=held_out_error(points), points=len(points),
                       chips=len({p.chip for p in points}), data=data_digest(path))
