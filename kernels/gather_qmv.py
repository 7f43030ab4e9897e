"""gather_qmv: for each of M tokens, its top-k experts' quantized products in one dispatch
(MLX's gather_qmm at decode sizes, the expert layers of a mixture-of-experts model). Each
(token, expert) pair is one row of the grid running qmv's kernel (M = 1) on the expert its
`indices` entry names: the ids are read on the GPU, no host round trip. The tunables, their
checks and the work per pair are qmv's."""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metalforge.kernels import dtypes
from metalforge.kernels.family import Family, Geometry, Launch, cut_keeping_tail
from metalforge.kernels.qmv import QMV, Qmv, count_rows, footprints, rows_values
from metalforge.kernels.work import Tally
from metalforge.kernels.quantized import (VECTOR_ROWS, QuantizedShape, dequantize_reference, quantization_problems,
                                          quantized_op_shape)


@dataclass(frozen=True)
class GatherQmvShape:
    M: int          # tokens
    N: int
    K: int
    experts: int
    top_k: int
    bits: int = 4
    group_size: int = 64

    @property
    def pairs(self) -> int:
        return self.M * self.top_k


def pair_shape(shape: GatherQmvShape) -> QuantizedShape:
    """What one (token, expert) pair runs: a qmv of one row."""
    return QMV.shape(dict(M=1, N=shape.N, K=shape.K, bits=shape.bits, group_size=shape.group_size))


class GatherQmv(Family):
    """y[p] = x[p] @ dequant(w[indices[p]]).T for each (token, expert) pair p, MLX's affine layout."""

    name = "gather_qmv"
    bucketed = ("M",)
    shape_type = GatherQmvShape
    params = Qmv.params
    op = "expert_linear"   # a token's top-k experts

    def op_shape(self, values: dict) -> dict | None:
        return quantized_op_shape(values)

    def proxy_shape(self, shape):
        return self.shape({**shape.__dict__, "N": cut_keeping_tail(shape.N, 256, 256),
                           "K": cut_keeping_tail(shape.K, 1024, 1024), "experts": min(shape.experts, 4),
                           "top_k": min(shape.top_k, 4)})

    def shape_distance(self, a, b) -> float | None:
        if (a.bits, a.group_size) != (b.bits, b.group_size):
            return None
        return (abs(math.log2(a.N / b.N)) + abs(math.log2(a.K / b.K)) + abs(math.log2(a.pairs / b.pairs))
                + abs(math.log2(a.experts / b.experts)))

    def shape_problems(self, shape: GatherQmvShape) -> list[str]:
        out = quantization_problems(shape)
        if not 1 <= shape.M <= VECTOR_ROWS:
            out.append(f"M={shape.M} is outside 1..{VECTOR_ROWS} (gather_qmv is the decode kernel; prompts take MLX's gather_qmm)")
        if not 1 <= shape.top_k <= shape.experts:
            out.append(f"top_k={shape.top_k} is outside 1..experts={shape.experts}")
        return out

    def buffer_elements(self, shape: GatherQmvShape) -> dict[str, int]:
        return {"x": shape.pairs * shape.K, "w": shape.experts * shape.N * shape.K, "y": shape.pairs * shape.N}

    def geometry(self, config, shape: GatherQmvShape, dtype) -> tuple[Geometry, ...]:
        g, = QMV.geometry(config, pair_shape(shape), dtype)
        return (Geometry((g.grid[0], shape.pairs, 1), g.threadgroup, g.threadgroup_memory_bytes),)

    def config_problems(self, config, shape, dtype) -> list[str]:
        return QMV.config_problems(config, pair_shape(shape), dtype)

    def launches(self, config, shape: GatherQmvShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        kernel = self._kernel(
            self.template, ("x", "w", "scales", "biases", "indices"), ("y",),
            **rows_values(config, pair_shape(shape), d), N=shape.N, gather=True, residual=False)
        g, = self.geometry(config, shape, dtype)
        return [Launch(kernel, g.grid, g.threadgroup, ((shape.pairs, shape.N),), (d.mlx,))]

    def make_inputs(self, shape: GatherQmvShape, dtype, seed=0):
        d = dtypes.get(dtype)
        k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
        w = (mx.random.normal((shape.experts, shape.N, shape.K), key=k1) * 0.05).astype(d.mlx)
        wq, scales, biases = mx.quantize(w, group_size=shape.group_size, bits=shape.bits)
        x = mx.random.normal((shape.pairs, shape.K), key=k2).astype(d.mlx)
        indices = mx.random.randint(0, shape.experts, (shape.pairs,), key=k3).astype(mx.uint32)
        return {"x": x, "w": wq, "scales": scales, "biases": biases, "indices": indices}

    def reference(self, shape: GatherQmvShape, dtype, inp):
        """Each expert dequantised with plain MLX ops, gathered by pair, multiplied in fp32."""
        E, N = shape.experts, shape.N
        w = dequantize_reference(inp["w"].reshape(E * N, -1), inp["scales"].reshape(E * N, -1),
                                 inp["biases"].reshape(E * N, -1), shape.bits, shape.group_size).reshape(E, N, -1)
        picked = w[inp["indices"]]                                   # (pairs, N, K)
        y = (picked @ inp["x"].astype(mx.float32)[:, :, None])[:, :, 0]
        return y.astype(dtypes.get(dtype).mlx)

    def baseline(self, shape: GatherQmvShape, dtype, inp):
        return mx.gather_qmm(inp["x"][:, None, :], inp["w"], inp["scales"], inp["biases"], rhs_indices=inp["indices"],
                             transpose=True, group_size=shape.group_size, bits=shape.bits)[:, 0, :]

    def tolerance(self, config, dtype):
        return QMV.tolerance(config, dtype)

    def work(self, config, shape, dtype) -> list:
        """qmv's rows once per pair (kernels/qmv.py count_rows), each pair at its own x, y and
        expert. ASSUMED: the pairs' experts are distinct up to `experts` (a token's top-k are), each
        expert's weights starting where the first's do relative to 32-byte sectors."""
        d = dtypes.get(dtype)
        g, = self.geometry(config, shape, d)
        tally, one = Tally(self.name, g), pair_shape(shape)
        sgs = g.threadgroups // shape.pairs * config["simdgroups"] * config["k_split"]
        for p in range(shape.pairs):
            count_rows(tally, config, one, d.size, {"x": p * shape.K * d.size, "w": 0, "scales": 0, "biases": 0,
                                                    "y": p * shape.N * d.size})
            tally.device("indices", ((4 * p, 4),) * 32, sgs)   # every lane reads its pair's expert id
        footprints(tally, one, d.size, rows=min(shape.pairs, shape.experts) * shape.N, x_rows=shape.pairs)
        tally.footprint("indices", 4 * shape.pairs)
        return [tally.counted()]
