"""The whole-model check of the per-kernel prices: a published decode step's time
(benchmarks/data/apple_measurements.yaml) against mlx-lm's step as engine/step_price.py prices it -
the model's op plan, each op by MLX's real kernels, and every other dispatch of mlx-lm's graph -
with the two constants the kernel timings cannot show fitted here: the DRAM factor (the weights
of a step are cold) and the per-dispatch cost `d` (non-negative least squares on relative error).
One `d` for every dispatch, ours and MLX's alike, is what lets a step with fewer dispatches be
priced fairly. A published prefill (a prompt in chunks) is priced alike, chunk by chunk
(step_price.prefill_parts), and checked against the decode fit's constants, not fitted.
ASSUMED there: a chunk makes the dispatches mlx-lm's graph makes for a 16-token chunk
(PREFILL_COUNTED_AT), and no LM head (mlx-lm evaluates only the cache while it prefills; the
last chunk's logits are left out).

A point's model is its config.json facts, read by the model's architecture (engine/models/), with
the quantization its weights imply: MLX's 4-bit group-64 format, 8-bit where a weight takes over
6 bits (its weight_gib over the architecture's parameter count), whatever format the run used
(llama.cpp's runs are priced with MLX's kernels and mlx-lm's other dispatches: a stand-in, its
kernels are not emulated). Unquantized runs (F16, BF16) are left out: MLX's unquantized matmul
kernels are not emulated.
"""
from __future__ import annotations

import statistics

import numpy as np

from metalforge.engine import models, step_glue, step_price
from metalforge.errors import MetalforgeError
from metalforge.kernels.timing.fit import nonnegative_lstsq

GROUP_SIZE = 64   # mlx-lm's default quantization group


def bits_per_weight(p) -> float:
    """A point's weight_gib over its model's parameter count (its architecture's, unquantized)."""
    args = models.parse(p.facts.config, p.model)
    return p.weight_gib * 2**30 * 8 / models.get(args.model_type).parameter_count(args)


def config_of(p) -> dict:
    """The point's model as a config.json: its facts, and the quantization its weights imply (or
    state, where the facts carry one: a run of ours)."""
    config = dict(p.facts.config)
    if "quantization" not in config:
        per_weight = bits_per_weight(p)
        if per_weight > 10:
            raise MetalforgeError(f"{p.weights} weights: MLX's unquantized matmul kernels are not emulated")
        config["quantization"] = {"bits": 4 if per_weight < 6 else 8, "group_size": GROUP_SIZE}
    return config


# prefill chunks' other dispatches are counted at this context (a 16-token chunk after 47 cached
# tokens): the count of a chunk's dispatches does not grow with its tokens or its prefix
PREFILL_COUNTED_AT = 64


def decode_step(p, constants) -> step_price.Cost:
    """mlx-lm's decode step of point `p` on its device, priced with the kernel fit's `constants`."""
    config = config_of(p)
    context = max(1, int(p.context))
    kernels, glue = step_price.mlx_lm_parts(config, context, p.device, constants, step_glue.counts_for(config, context))
    return kernels + glue


def prefill(p, constants) -> step_price.Cost:
    """mlx-lm's prefill of point `p`'s prompt in its chunks, priced with the kernel fit's `constants`."""
    config = config_of(p)
    kernels, glue = step_price.prefill_parts(config, p.tokens, p.chunk, p.device, constants,
                                             step_glue.counts_for(config, PREFILL_COUNTED_AT))
    return kernels + glue


def rows(points, constants, kind: str = "decode") -> tuple[list, list]:
    """([(point, Cost of its step or prompt)], [(point, reason)]) for the points of `kind`
    (decode or prefill), priced with the kernel fit's `constants`."""
    price = decode_step if kind == "decode" else prefill
    out, skipped = [], []
    for p in points:
        if p.kind != kind:
            continue
        try:
            out.append((p, price(p, constants)))
        except MetalforgeError as e:
            skipped.append((p, str(e)))
    return out, skipped


def _tokens(p) -> int:
    """Tokens of the published step (one) or prompt."""
    return p.tokens if p.kind == "prefill" else 1


def _measured_s(p) -> float:
    return _tokens(p) / p.tokens_per_s


def fit(rows) -> tuple[float, float]:
    """(DRAM factor, per-dispatch seconds) minimising the relative error in step time, both >= 0."""
    a = np.array([[c.dram_s / _measured_s(p), c.dispatches / _measured_s(p)] for p, c in rows])
    b = np.array([1 - c.fixed_s / _measured_s(p) for p, c in rows])
    dram, d = nonnegative_lstsq(a, b)
    return float(dram), float(d)


def predict(row, dram: float, d: float) -> float:
    """Tokens per second."""
    p, cost = row
    return _tokens(p) / cost.seconds(dram, d)


def held_out(rows, fitted_on=None) -> tuple[float, list]:
    """Median |predicted / measured - 1| with the two constants fitted on `fitted_on` (by default
    the rows themselves) without each point's chip."""
    basis = rows if fitted_on is None else fitted_on
    errs = []
    for row in rows:
        dram, d = fit([r for r in basis if r[0].chip != row[0].chip])
        errs.append(predict(row, dram, d) / row[0].tokens_per_s - 1)
    return float(statistics.median(abs(e) for e in errs)), errs
