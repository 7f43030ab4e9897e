"""Linear layers on MLX's CPU backend (no Metal), done the way that backend rewards.

Two facts, measured side by side by `python benchmarks/engine_decode.py --linear` (its table is in
the README):
- MLX runs each CPU stream's work on one thread, so one matmul uses one core. A layer split by
  output rows into one part per core, each on its own stream, runs the parts at once (1.7-1.9x on
  two cores, from 128 output rows up).
- For many rows (prefill chunks, large batches), dequantizing the layer once per call and
  multiplying in float32 beats quantized_matmul, which re-dequantizes per row: 2.4x at 512 rows,
  break-even near 32 rows for a 32000-row vocabulary projection (8 rows for small layers).
On a GPU none of this applies: the engine uses it only when MLX has no Metal device.
"""
from __future__ import annotations

import os

import mlx.core as mx

DEQUANTIZE_MIN_ROWS = 32   # from this many rows, dequantize once per call (see the module docstring)
SPLIT_MIN_OUTPUTS = 128    # layers with fewer output rows run whole: the split's merge would cost more


class CpuLinear:
    def __init__(self, cores: int | None = None):
        cores = cores or len(os.sched_getaffinity(0))
        self.streams = [mx.new_stream(mx.cpu) for _ in range(max(1, cores))]

    def __call__(self, x: mx.array, w: dict, bits: int | None, group_size: int | None) -> mx.array:
        """x (T, K) @ the layer's weight (N, K) transposed: (T, N), in x's dtype."""
        n = w["weight"].shape[0]
        parts = len(self.streams) if n >= SPLIT_MIN_OUTPUTS * len(self.streams) else 1
        bounds = [n * i // parts for i in range(parts + 1)]
        outs = [self._part(x, {k: a[lo:hi] for k, a in w.items() if k != "bias"}, bits, group_size, s)
                for lo, hi, s in zip(bounds, bounds[1:], self.streams)]
        return outs[0] if parts == 1 else mx.concatenate(outs, axis=1)

    @staticmethod
    def _part(x, w, bits, group_size, stream):
        if "scales" not in w:
            return mx.matmul(x, w["weight"].T, stream=stream)
        if x.shape[0] >= DEQUANTIZE_MIN_ROWS:
            dense = mx.dequantize(w["weight"], w["scales"], w["biases"], group_size=group_size, bits=bits,
                                  stream=stream)
            dense = mx.contiguous(dense.T, stream=stream)   # (K, N): MLX's CPU matmul is ~2x faster this way
            return mx.matmul(x.astype(dense.dtype), dense, stream=stream).astype(x.dtype)
        xs = x.astype(w["scales"].dtype)
        return mx.quantized_matmul(xs, w["weight"], w["scales"], w["biases"], transpose=True, group_size=group_size,
                                   bits=bits, stream=stream).astype(x.dtype)
