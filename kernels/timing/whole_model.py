"""The whole-model check of the per-kernel prices: a decode step's time is the sum of its kernels'
prices - MLX's real kernels, chosen by MLX's rules for each op (seven quantized projections a
layer, decode attention over the context, the LM head) - plus a per-dispatch cost `d`, fitted once,
for every dispatch of the step (the priced kernels and the others: norms, RoPE, residual adds,
activations, cache writes), compared with published tokens/s
(benchmarks/data/apple_measurements.yaml). A priced kernel's `launch` constant is left out here:
it is the host round trip of a kernel timed alone, which a pipelined step does not pay per
kernel; `d` is what a dispatch costs inside a step. The other per-kernel constants are the kernel
fit's; the DRAM factor, which the warm kernel timings cannot show, is fitted here with `d` (two
constants, non-negative least squares on relative error). One `d` for every dispatch, ours and
MLX's alike, is what lets a step with fewer dispatches be priced fairly (model.price_in_step).

Labelled assumptions: a step makes DISPATCHES_PER_LAYER dispatches a layer (mlx-lm's 17-19 a
layer counted by benchmarks/dispatch_count.py: a llama layer's 17, qwen3's 19 with its q/k norms)
of which the priced kernels are 8; quantized weights
are priced as MLX's 4-bit group-64 (8-bit where a weight takes over 6 bits) whatever format the run
used (llama.cpp's runs are priced with MLX's kernels: a stand-in, its kernels are not emulated);
the MLP width follows from the parameter count. Unquantized runs (F16, BF16) are left out: MLX's
unquantized matmul kernels are not emulated. Prefill is not checked yet (a prompt's qmm_t, attention
and glue per chunk are not summed here).
"""
from __future__ import annotations

import statistics

import numpy as np

from metalforge.errors import MetalforgeError
from metalforge.kernels.model_measurements import Point
from metalforge.kernels.timing import mlx_jobs, model
from metalforge.kernels.timing.fit import nonnegative_lstsq

DISPATCHES_PER_LAYER = 17   # mlx-lm's llama decode layer: 7 quantized matmuls, attention, 9 others
DTYPE = "float16"


def matmuls(p: Point) -> list[tuple[int, int, int]]:
    """(N, K, times per step) of a decode step's quantized projections, the LM head included."""
    a = p.sizes
    attn = a.hidden * (2 * a.heads * a.head_dim + 2 * a.kv_heads * a.head_dim)
    head = a.vocab * a.hidden
    per_layer = (a.params_b * 1e9 - head * (1 if a.tied else 2)) / a.layers
    inter = int(round((per_layer - attn) / (3 * a.hidden) / 256)) * 256
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return [(q, a.hidden, a.layers), (kv, a.hidden, 2 * a.layers), (a.hidden, q, a.layers),
            (inter, a.hidden, 2 * a.layers), (a.hidden, inter, a.layers), (a.vocab, a.hidden, 1)]


def bits(p: Point) -> int:
    per_weight = p.weight_gib * 2**30 * 8 / (p.sizes.params_b * 1e9)
    if per_weight > 10:
        raise MetalforgeError(f"{p.weights} weights: MLX's unquantized matmul kernels are not emulated")
    return 4 if per_weight < 6 else 8


def kernel_terms(p: Point) -> np.ndarray:
    """Coefficients of the per-kernel constants in the step's kernel time."""
    dev, b = p.device, bits(p)
    out = np.zeros(len(model.TERMS))
    for N, K, times in matmuls(p):
        counted = mlx_jobs.counted("matmul", {"M": 1, "N": N, "K": K, "bits": b, "group_size": 64}, DTYPE, dev)
        out += times * model.terms(counted, dev)
    a = p.sizes
    attention = mlx_jobs.counted("decode", {"B": 1, "Hq": a.heads, "Hkv": a.kv_heads, "S": max(1, int(p.context)),
                                            "D": a.head_dim}, DTYPE, dev)
    return out + a.layers * model.terms(attention, dev)


def dispatches(p: Point) -> int:
    """Every dispatch of a decode step's layers, the priced kernels included."""
    return p.sizes.layers * DISPATCHES_PER_LAYER


def rows(points, constants) -> tuple[list, list]:
    """([(point, seconds of the kernels without DRAM or launch, DRAM term's coefficient, dispatches)],
    [(point, reason)]) for the decode points, priced with the kernel fit's `constants`."""
    c = constants.vector()
    dram = model.TERMS.index("dram")
    c[dram] = 0.0
    c[model.TERMS.index("launch")] = 0.0   # a dispatch's fixed cost inside a step is `d`
    out, skipped = [], []
    for p in points:
        if p.kind != "decode":
            continue
        try:
            t = kernel_terms(p)
            out.append((p, float(t @ c), float(t[dram]), dispatches(p)))
        except MetalforgeError as e:
            skipped.append((p, str(e)))
    return out, skipped


def fit(rows) -> tuple[float, float]:
    """(DRAM factor, per-dispatch seconds) minimising the relative error in step time, both >= 0."""
    a = np.array([[m * p.tokens_per_s, n * p.tokens_per_s] for p, _, m, n in rows])
    b = np.array([1 - k * p.tokens_per_s for p, k, _, _ in rows])
    dram, d = nonnegative_lstsq(a, b)
    return float(dram), float(d)


def predict(row, dram: float, d: float) -> float:
    """Tokens per second."""
    _, k, m, n = row
    return 1.0 / (k + dram * m + d * n)


def held_out(rows) -> tuple[float, list]:
    """Median |predicted / measured - 1| with the two constants fitted without each point's chip."""
    errs = []
    for row in rows:
        dram, d = fit([r for r in rows if r[0].chip != row[0].chip])
        errs.append(predict(row, dram, d) / row[0].tokens_per_s - 1)
    return float(statistics.median(abs(e) for e in errs)), errs
