"""Linear layers on MLX's CPU backend (no Metal), done the way that backend rewards.

Two facts, measured side by side by `python benchmarks/engine_decode.py --linear` (its figures are in
docs/engine.md):
- MLX runs each CPU stream's work on one thread, so one matmul uses one core. A layer split by
  output rows into one part per core, each on its own stream, runs the parts at once (1.4-2.0x
  on two cores at 1 to 8 rows).
- For many rows (prefill chunks, large batches), dequantizing the layer once per call and
  multiplying in float32 beats quantized_matmul, which dequantizes per row: with the split,
  3.4-4.6x over quantized_matmul at 32-512 rows for layers up to 1408 x 512; break-even near 32
  rows for a 32000-row vocabulary projection, whose dequantized copy leaves the caches.
On a GPU none of this applies: the engine uses it only when MLX has no Metal device.
"""
from __future__ import annotations

import os

import mlx.core as mx

from metalforge.intmath import cdiv

DEQUANTIZE_MIN_ROWS = 32   # from this many rows, dequantize once per call (see the module docstring)
SPLIT_MIN_OUTPUTS = 128    # layers with fewer output rows run whole: the split's merge would cost more
DEQUANTIZE_CHUNK = 512     # output rows dequantized at a time: the float32 copy stays in cache (1.7x at 32 rows
                           # of a 32000 x 512 projection over dequantizing each core's half at once)


class CpuLinear:
    def __init__(self, cores: int | None = None, dequantize_from: int = DEQUANTIZE_MIN_ROWS):
        cores = cores or len(os.sched_getaffinity(0))
        self.streams = [mx.new_stream(mx.cpu) for _ in range(max(1, cores))]
        self.dequantize_from = dequantize_from

    def __call__(self, x: mx.array, w: dict, bits: int | None, group_size: int | None, mode: str = "affine") -> mx.array:
        """x (T, K) @ the layer's weight (N, K) transposed: (T, N), in x's dtype."""
        n, cores = w["weight"].shape[0], len(self.streams)
        parts = 1
        if n >= SPLIT_MIN_OUTPUTS * cores:
            dequantize = "scales" in w and x.shape[0] >= self.dequantize_from
            parts = cores * (cdiv(n, cores * DEQUANTIZE_CHUNK) if dequantize else 1)
        bounds = [n * i // parts for i in range(parts + 1)]
        outs = [self._part(x, {k: a[lo:hi] for k, a in w.items() if k != "bias"}, bits, group_size, mode,
                           self.streams[i % cores]) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
        return outs[0] if parts == 1 else mx.concatenate(outs, axis=1)

    def _part(self, x, w, bits, group_size, mode, stream):
        if "scales" not in w:
            return mx.matmul(x, w["weight"].T, stream=stream)
        if x.shape[0] >= self.dequantize_from:
            dense = mx.dequantize(w["weight"], w["scales"], w.get("biases"), group_size=group_size, bits=bits, mode=mode,
                                  dtype=w["biases"].dtype if "biases" in w else x.dtype, stream=stream)
            dense = mx.contiguous(dense.T, stream=stream)   # (K, N): MLX's CPU matmul is ~2x faster this way
            return mx.matmul(x.astype(dense.dtype), dense, stream=stream).astype(x.dtype)
        xs = x.astype(w["biases"].dtype) if "biases" in w else x   # affine scales: float32 on the CPU (see Model)
        return mx.quantized_matmul(xs, w["weight"], w["scales"], w.get("biases"), transpose=True, group_size=group_size,
                                   bits=bits, mode=mode, stream=stream).astype(x.dtype)
