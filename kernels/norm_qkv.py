"""norm_qkv: an attention block's input side in one dispatch: the RMS norm, the q/k/v products
(biases where the architecture has them), q's and k's per-head RMS norms (qwen3) and RoPE at each
row's position (mlx-lm runs a norm, three quantized matmuls, bias adds, two norms and two RoPEs).
One threadgroup computes one head, so the epilogue has the head's D values together. The dot
product and its tunables are qmv's (templates/quantized_rows.j2). RoPE's frequencies and scale
are inputs: every scaling of engine/models/rope.py, decided on the host, runs the same kernel."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import mlx.core as mx

from metalforge.intmath import cdiv
from metalforge.kernels import dtypes
from metalforge.kernels.family import Family, Geometry, Launch, cut_keeping_tail
from metalforge.kernels.timing.traces import cut
from metalforge.kernels.qmv import QMV, Qmv, as_qmv, decode_shape_problems, fused_work, random_norm, rows_values
from metalforge.kernels.quantized import (dequantize_reference, matmul_sizes, quantized_op_shape,
                                         proxy_k, random_quantized)


@dataclass(frozen=True)
class NormQkvShape:
    M: int              # rows (tokens)
    K: int              # the hidden size
    Hq: int
    Hkv: int
    D: int
    bits: int = 4
    group_size: int = 64
    bias: int = 0       # 1: the q/k/v projections have biases (qwen2)
    qk_norm: int = 0    # 1: RMS norms of each q and k head (qwen3)
    rope_dims: int = 0  # the features RoPE rotates; 0: all D (partial rotary otherwise)
    traditional: int = 0   # 1: RoPE rotates adjacent pairs, not the two halves

    @property
    def heads(self) -> int:
        return self.Hq + 2 * self.Hkv

    @property
    def N(self) -> int:
        """Rows of q, k and v together."""
        return self.heads * self.D

    @property
    def dims(self) -> int:
        return self.rope_dims or self.D


class NormQkv(Family):
    """(q, k, v) heads = RoPE(qk_norm(W n + bias)), n = rms_norm(x): MLX's affine layout, M in 1..8."""

    name = "norm_qkv"
    bucketed = ("M",)
    shape_type = NormQkvShape
    variant_fields = ("bias", "qk_norm", "rope_dims", "traditional")
    params = Qmv.params
    op = "attention_input"
    mlx_op = "matmul"
    trace_groups = (("Hq", "Hkv"), ("K",))

    def op_shape(self, values: dict) -> dict | None:
        return quantized_op_shape(values)

    def mlx_jobs(self, fields: dict) -> list[tuple[str, dict]]:
        """The q, k and v products mlx-lm runs (its norms, bias adds and RoPE kernels around them
        are counted as a step's dispatches by engine/step_glue.py, not here: `compare` prices
        MLX's side low, never high)."""
        return [(self.mlx_op, matmul_sizes(fields, heads * fields["D"]))
                for heads in (fields["Hq"], fields["Hkv"], fields["Hkv"])]

    def trace_proxy(self, fields: dict, config) -> dict:
        """One KV head and its query heads (a head's D rows stay); K as qmv's (proxy_k)."""
        K = proxy_k(fields, 32 * config["values_per_lane"] * config["k_split"])
        return cut({**fields, "K": K}, {"Hq": fields["Hq"] // fields["Hkv"], "Hkv": 1})

    def proxy_shape(self, shape):
        """One KV head and its query heads (the GQA ratio kept), K cut keeping its tail."""
        return self.shape({**shape.__dict__, "K": cut_keeping_tail(shape.K, 1024, 1024),
                           "Hq": shape.Hq // shape.Hkv, "Hkv": 1})

    def shape_distance(self, a, b) -> float | None:
        if (a.bits, a.group_size, a.D, a.bias, a.qk_norm, a.rope_dims, a.traditional) != \
                (b.bits, b.group_size, b.D, b.bias, b.qk_norm, b.rope_dims, b.traditional):
            return None
        return (abs(math.log2(a.heads / b.heads)) + abs(math.log2(a.K / b.K)) + abs(math.log2(a.M / b.M)))

    def shape_problems(self, shape: NormQkvShape) -> list[str]:
        out = decode_shape_problems(self.name, shape, ("bias", "qk_norm", "traditional"),
                                    "more rows take MLX's composition of our linears")
        if min(shape.Hq, shape.Hkv, shape.D) < 1 or shape.Hq % shape.Hkv:
            out.append(f"Hq={shape.Hq} is not a positive multiple of Hkv={shape.Hkv}")
        if shape.D < 8:   # an input under 8 values is in Metal's constant address space; a head's are device
            out.append(f"D={shape.D} is under 8")
        if shape.dims % 2 or not 0 < shape.dims <= shape.D:
            out.append(f"rope_dims={shape.rope_dims} is not an even count of at most D={shape.D}")
        return out

    def buffer_elements(self, shape: NormQkvShape) -> dict[str, int]:
        return {"x": shape.M * shape.K, "w_q": shape.Hq * shape.D * shape.K, "out": shape.heads * shape.M * shape.D}

    def geometry(self, config, shape: NormQkvShape, dtype) -> tuple[Geometry, ...]:
        g, = QMV.geometry(config, as_qmv(shape, shape.D), dtype)
        extra = shape.M   # the sum of squares beside qmv's accumulators
        partials = 4 * config["k_split"] * config["simdgroups"] * extra if config["k_split"] > 1 else 0
        head = 4 * shape.M * (head_row(config, shape) + shape.qk_norm)   # the head's values (and its norm's scales)
        return (Geometry((shape.heads * g.threads, 1, 1), g.threadgroup,
                         g.threadgroup_memory_bytes + partials + head, g.registers + extra),)

    def config_problems(self, config, shape, dtype) -> list[str]:
        out = QMV.config_problems(config, as_qmv(shape, shape.D), dtype)
        rows = config["simdgroups"] * config["rows_per_simdgroup"]
        if rows > shape.D:
            out.append(f"simdgroups x rows_per_simdgroup = {rows} rows a block is more than a head's D={shape.D}: "
                       f"SIMD-groups would idle")
        return out

    def launches(self, config, shape: NormQkvShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        blocks = cdiv(shape.D, config["simdgroups"] * config["rows_per_simdgroup"])
        kernel = self._kernel(self.template, input_names(shape), ("out",),
                              **rows_values(config, shape, d, norm=True, BLOCKS=blocks), HQ=shape.Hq, HKV=shape.Hkv,
                              HV_ROW=head_row(config, shape),
                              D=shape.D, DIMS=shape.dims, bias=bool(shape.bias), qk_norm=bool(shape.qk_norm),
                              traditional=bool(shape.traditional))
        g, = self.geometry(config, shape, dtype)
        return [Launch(kernel, g.grid, g.threadgroup, ((1, shape.heads, shape.M, shape.D),), (d.mlx,))]

    def make_inputs(self, shape: NormQkvShape, dtype, seed=0):
        d = dtypes.get(dtype)
        keys = mx.random.split(mx.random.key(seed), 12)
        out = {"x": mx.random.normal((shape.M, shape.K), key=keys[0]).astype(d.mlx), **random_norm(shape, d, keys[1])}
        for i, (m, heads) in enumerate((("q", shape.Hq), ("k", shape.Hkv), ("v", shape.Hkv))):
            out.update(random_quantized(heads * shape.D, shape, d, keys[2 + i], "_" + m))
            if shape.bias:
                out["bias_" + m] = mx.random.normal((heads * shape.D,), key=keys[5 + i]).astype(d.mlx)
        if shape.qk_norm:
            out.update({n: (1 + 0.2 * mx.random.normal((shape.D,), key=keys[8 + i])).astype(d.mlx)
                        for i, n in enumerate(("q_norm", "k_norm"))})
        out["positions"] = mx.random.randint(0, 200, (shape.M,), key=keys[10]).astype(mx.int32)
        out["inv_freq"] = 1.0 / (10000.0 ** (mx.arange(0, shape.dims, 2, dtype=mx.float32) / shape.dims))
        out["rope_scale"] = mx.array([1.1], dtype=mx.float32)   # a scaling's magnitude factor (yarn, longrope)
        return out

    def reference(self, shape: NormQkvShape, dtype, inp):
        """The unfused composition in fp32: mx.fast.rms_norm, the three products of weights
        dequantised with plain MLX ops, the biases, mx.fast.rms_norm per head, mx.fast.rope at
        each row's position (the rotated part times rope_scale)."""
        f32 = mx.float32
        n = mx.fast.rms_norm(inp["x"].astype(f32), inp["norm"].astype(f32), inp["eps"].item())
        heads = []
        for m, H in (("q", shape.Hq), ("k", shape.Hkv), ("v", shape.Hkv)):
            y = n @ dequantize_reference(inp["w_" + m], inp["scales_" + m], inp["biases_" + m], shape.bits,
                                         shape.group_size).T
            if shape.bias:
                y = y + inp["bias_" + m].astype(f32)
            y = y.reshape(shape.M, H, 1, shape.D)           # each row its own sequence, for its position
            if m != "v":
                if shape.qk_norm:
                    y = mx.fast.rms_norm(y, inp[m + "_norm"].astype(f32), inp["eps"].item())
                y = rope(y, inp, shape)
            heads.append(y[:, :, 0].transpose(1, 0, 2))     # (H, M, D)
        return mx.concatenate(heads)[None].astype(dtypes.get(dtype).mlx)

    def baseline(self, shape: NormQkvShape, dtype, inp):
        """mlx-lm's composition in the model's dtype (MLX's kernels)."""
        n = mx.fast.rms_norm(inp["x"], inp["norm"], inp["eps"].item())
        heads = []
        for m, H in (("q", shape.Hq), ("k", shape.Hkv), ("v", shape.Hkv)):
            y = mx.quantized_matmul(n, inp["w_" + m], inp["scales_" + m], inp["biases_" + m], transpose=True,
                                    group_size=shape.group_size, bits=shape.bits)
            if shape.bias:
                y = y + inp["bias_" + m]
            y = y.reshape(shape.M, H, 1, shape.D)
            if m != "v":
                if shape.qk_norm:
                    y = mx.fast.rms_norm(y, inp[m + "_norm"], inp["eps"].item())
                y = rope(y, inp, shape)
            heads.append(y[:, :, 0].transpose(1, 0, 2))
        return mx.concatenate(heads)[None]

    def tolerance(self, config, dtype):
        return QMV.tolerance(config, dtype)

    def work(self, config, shape, dtype) -> list:
        """qmv's work for the q/k/v rows (qmv.fused_work) in this launch's geometry: a head a
        threadgroup, its D rows in blocks (as qmv's, a block a threadgroup, it launched 2x the
        threadgroups at D=64 over 32-row blocks, and priced the built-in model's as if twice as
        many cores streamed its weights: 25% under its trace)."""
        counted, = fused_work(config, as_qmv(shape, shape.N), 1, dtype)
        g, = self.geometry(config, shape, dtype)
        threadgroup = tuple(min(t, n) for t, n in zip(g.threadgroup, g.grid))
        return [dataclasses.replace(counted, threadgroup=threadgroup, threadgroup_memory_bytes=g.threadgroup_memory_bytes,
                                    features={**counted.features, "threadgroups": g.threadgroups,
                                              "threads": g.threadgroups * math.prod(threadgroup)})]


def head_row(config, shape: NormQkvShape) -> int:
    """Words a row of the head's values (hv) takes in threadgroup memory. With k_split > 1 the
    first split's lane i stores row m = i / R, value r = i % R at once, so rows start R banks
    apart (D padded) and the lanes meet distinct banks; otherwise lane 0 stores alone, no pad."""
    return shape.D + ((config["rows_per_simdgroup"] - shape.D) % 32 if config["k_split"] > 1 else 0)


def input_names(shape: NormQkvShape) -> tuple[str, ...]:
    names = ["x", "norm", "eps"] + [f"{p}_{m}" for m in "qkv" for p in ("w", "scales", "biases")]
    names += [f"bias_{m}" for m in "qkv"] if shape.bias else []
    names += ["q_norm", "k_norm"] if shape.qk_norm else []
    return tuple(names + ["positions", "inv_freq", "rope_scale"])


def rope(y: mx.array, inp: dict, shape: NormQkvShape) -> mx.array:
    """mx.fast.rope over (rows, heads, 1, D), each row at its own position, the rotated part scaled."""
    d = shape.dims
    rotated = mx.fast.rope(y, d, traditional=bool(shape.traditional), base=None, scale=1.0,
                           offset=inp["positions"], freqs=1.0 / inp["inv_freq"])
    scale = inp["rope_scale"].astype(y.dtype)
    return rotated * scale if d == shape.D else mx.concatenate([rotated[..., :d] * scale, rotated[..., d:]], axis=-1)
