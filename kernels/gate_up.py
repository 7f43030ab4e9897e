"""gate_up: a gated MLP's RMS norm, gate and up products and SwiGLU/GeGLU in one dispatch
(mlx-lm runs them as a norm, two quantized matmuls and two or three elementwise kernels). The
dot product and its tunables are qmv's (templates/quantized_rows.j2), with two weight matrices
and the norm's sum of squares taken beside the dot product."""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from metalforge.kernels import dtypes
from metalforge.kernels.family import Geometry, Launch
from metalforge.kernels.qmv import QMV, Qmv, as_qmv, decode_shape_problems, fused_work, random_norm, rows_values
from metalforge.kernels.quantized import QuantizedMatmul, dequantize_reference, matmul_sizes, random_quantized

@dataclass(frozen=True)
class GateUpShape:
    M: int          # rows (tokens)
    N: int          # the MLP's intermediate size
    K: int          # the hidden size
    bits: int = 4
    group_size: int = 64
    gelu: int = 0   # 1: GeGLU (tanh-approximated gelu, Gemma); 0: SwiGLU


class GateUp(QuantizedMatmul):
    """out = act(W_gate n) * W_up n, n = rms_norm(x, norm, eps): MLX's affine layout, M in 1..8."""

    name = "gate_up"
    shape_type = GateUpShape
    variant_fields = ("gelu",)
    params = Qmv.params
    op = "gated_mlp"

    def mlx_jobs(self, fields: dict) -> list[tuple[str, dict]]:
        """The gate and up products mlx-lm runs (the norm and the activation's kernels around
        them are counted as a step's dispatches by engine/step_glue.py, not here: `compare`
        prices MLX's side low, never high)."""
        return [(self.mlx_op, matmul_sizes(fields, fields["N"]))] * 2

    def shape_distance(self, a, b) -> float | None:
        return None if a.gelu != b.gelu else super().shape_distance(a, b)

    def shape_problems(self, shape: GateUpShape) -> list[str]:
        return decode_shape_problems(self.name, shape, ("gelu",), "more rows take MLX's composition of our linears")

    def buffer_elements(self, shape: GateUpShape) -> dict[str, int]:
        return {"x": shape.M * shape.K, "w_gate": shape.N * shape.K, "y": shape.M * shape.N}

    def geometry(self, config, shape: GateUpShape, dtype) -> tuple[Geometry, ...]:
        g, = QMV.geometry(config, as_qmv(shape, shape.N), dtype)
        # a second matrix's R accumulators and the sum of squares beside qmv's
        extra = shape.M * (config["rows_per_simdgroup"] + 1)
        partials = 4 * config["k_split"] * config["simdgroups"] * extra if config["k_split"] > 1 else 0
        return (Geometry(g.grid, g.threadgroup, g.threadgroup_memory_bytes + partials, g.registers + extra),)

    def config_problems(self, config, shape, dtype) -> list[str]:
        return QMV.config_problems(config, as_qmv(shape, shape.N), dtype)

    def launches(self, config, shape: GateUpShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        names = ("x", "norm", "eps") + tuple(f"{p}_{m}" for m in ("gate", "up") for p in ("w", "scales", "biases"))
        kernel = self._kernel(self.template, names, ("y",), **rows_values(config, shape, d, NW=2, norm=True),
                              N=shape.N, gelu=bool(shape.gelu))
        g, = self.geometry(config, shape, dtype)
        return [Launch(kernel, g.grid, g.threadgroup, ((shape.M, shape.N),), (d.mlx,))]

    def make_inputs(self, shape: GateUpShape, dtype, seed=0):
        d = dtypes.get(dtype)
        k1, k2, k3, k4 = mx.random.split(mx.random.key(seed), 4)
        return {"x": mx.random.normal((shape.M, shape.K), key=k1).astype(d.mlx), **random_norm(shape, d, k2),
                **random_quantized(shape.N, shape, d, k3, "_gate"), **random_quantized(shape.N, shape, d, k4, "_up")}

    def reference(self, shape: GateUpShape, dtype, inp):
        """The unfused composition in fp32: mx.fast.rms_norm, the two products of weights
        dequantised with plain MLX ops, the activation times up."""
        n = mx.fast.rms_norm(inp["x"].astype(mx.float32), inp["norm"].astype(mx.float32), inp["eps"].item())
        gate, up = (n @ dequantize_reference(inp["w_" + m], inp["scales_" + m], inp["biases_" + m], shape.bits,
                                             shape.group_size).T for m in ("gate", "up"))
        return (activation(shape)(gate) * up).astype(dtypes.get(dtype).mlx)

    def baseline(self, shape: GateUpShape, dtype, inp):
        """mlx-lm's composition: MLX's norm, two quantized matmuls, the activation and the product."""
        n = mx.fast.rms_norm(inp["x"], inp["norm"], inp["eps"].item())
        gate, up = (mx.quantized_matmul(n, inp["w_" + m], inp["scales_" + m], inp["biases_" + m], transpose=True,
                                        group_size=shape.group_size, bits=shape.bits) for m in ("gate", "up"))
        return activation(shape)(gate) * up

    def tolerance(self, config, dtype):
        return QMV.tolerance(config, dtype)

    def work(self, config, shape, dtype) -> list:
        """qmv's work for both matrices' rows in one launch (qmv.fused_work)."""
        return fused_work(config, as_qmv(shape, 2 * shape.N), 2, dtype)


def activation(shape: GateUpShape):
    return nn.gelu_approx if shape.gelu else nn.silu
