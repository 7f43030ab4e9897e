"""What qmv and qmm share: MLX's affine `mx.quantize` layout (a row of w is one little-endian bit
stream, a scale and a bias per group of K values), its shape, its checks, its inputs, its reference
and MLX's op for it. The two families differ only in how they tile the product."""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metalforge.kernels import dtypes
from metalforge.kernels.family import Family, cut_keeping_tail
from metalforge.kernels.timing.traces import cut


@dataclass(frozen=True)
class QuantizedShape:
    M: int
    N: int
    K: int
    bits: int = 4
    group_size: int = 64


QUANTIZED_BITS = (2, 3, 4, 5, 6, 8)   # every width mx.quantize (affine) writes
VECTOR_ROWS = 8   # the rows of x qmv and the fused decode families serve (decode, small batches); qmm serves more
GROUP_SIZES = (32, 64, 128)
SECTOR_ROWS = 32   # rows whose 1-byte to 4-byte outputs fill whole 32-byte sectors (y, partial sums)


class QuantizedMatmul(Family):
    """y = x @ dequant(w_q).T in MLX's layout: the base of qmv (decode rows) and qmm (prompts)."""

    bucketed = ("M",)
    shape_type = QuantizedShape
    op = "linear"
    mlx_op = "matmul"
    trace_groups = (("N",), ("K",))

    def op_shape(self, values: dict) -> dict | None:
        return quantized_op_shape(values)

    def mlx_sizes(self, fields: dict) -> dict:
        """MLX's quantized_matmul alone: a residual variant's add (one elementwise kernel) is not
        counted, so MLX's side is priced low, never high."""
        return matmul_sizes(fields, fields["N"])

    def trace_proxy(self, fields: dict, config) -> dict:
        """quantized_proxy of qmv.metal.j2's tiling: simdgroups x rows_per_simdgroup rows a
        threadgroup, 32 lanes x values_per_lane x k_split values of K a step."""
        return quantized_proxy(fields, config["simdgroups"] * config["rows_per_simdgroup"],
                               32 * config["values_per_lane"] * config["k_split"])

    def proxy_shape(self, shape):
        return self.shape({**shape.__dict__, "N": cut_keeping_tail(shape.N, 256, 256),
                           "K": cut_keeping_tail(shape.K, 1024, 1024)})

    def shape_distance(self, a, b) -> float | None:
        if (a.bits, a.group_size) != (b.bits, b.group_size):
            return None
        return abs(math.log2(a.N / b.N)) + abs(math.log2(a.K / b.K)) + abs(math.log2(a.M / b.M))

    def buffer_elements(self, shape: QuantizedShape) -> dict[str, int]:
        """x, the weight matrix (in values, as the kernels index it) and y."""
        return {"x": shape.M * shape.K, "w": shape.N * shape.K, "y": shape.M * shape.N}

    def make_inputs(self, shape: QuantizedShape, dtype, seed=0):
        d = dtypes.get(dtype)
        k1, k2 = mx.random.split(mx.random.key(seed))
        x = mx.random.normal((shape.M, shape.K), key=k2).astype(d.mlx)
        return {"x": x, **random_quantized(shape.N, shape, d, k1)}

    def reference(self, shape: QuantizedShape, dtype, inp):
        """Dequantise with plain MLX ops (independent of MLX's quantized kernels) and multiply in fp32."""
        w = dequantize_reference(inp["w"], inp["scales"], inp["biases"], shape.bits, shape.group_size)
        return (inp["x"].astype(mx.float32) @ w.T).astype(dtypes.get(dtype).mlx)

    def baseline(self, shape: QuantizedShape, dtype, inp):
        return mx.quantized_matmul(inp["x"], inp["w"], inp["scales"], inp["biases"],
                                   transpose=True, group_size=shape.group_size, bits=shape.bits)

    def tolerance(self, config, dtype):
        d = dtypes.get(dtype)
        # Each output sums K products; rounding grows with sqrt(K) but is bounded for our inputs.
        return d.atol * 4, d.rtol


def random_quantized(rows: int, shape, d, key, suffix: str = "") -> dict[str, mx.array]:
    """A random (rows, K) weight in MLX's affine layout at the shape's bits and group size:
    {w, scales, biases} (names with `suffix`), as the quantized families' inputs."""
    w = (mx.random.normal((rows, shape.K), key=key) * 0.05).astype(d.mlx)
    wq, scales, biases = mx.quantize(w, group_size=shape.group_size, bits=shape.bits)
    return {"w" + suffix: wq, "scales" + suffix: scales, "biases" + suffix: biases}


def matmul_sizes(fields: dict, rows: int) -> dict:
    """MLX's quantized_matmul (kernels/timing/mlx_jobs.py's "matmul") of `rows` weight rows at
    the fields' M, K and quantization (mx.quantize's defaults where unset)."""
    return dict(M=fields["M"], N=rows, K=fields["K"], bits=fields.get("bits", QuantizedShape.bits),
                group_size=fields.get("group_size", QuantizedShape.group_size))


def proxy_k(fields: dict, k_step: int) -> int:
    """K of a quantized product's trace proxy (traces.cut), `k_step` values of K a step: whole
    steps in rows of w and of scales that start on sectors (16 groups of 2-byte scales; 4-byte
    ones align with fewer), else the real K (a row's sector phases decide its loads' sectors, and
    no smaller K has the real one's)."""
    bits, gs, K = fields["bits"], fields["group_size"], fields["K"]
    aligned = math.lcm(k_step, 16 * gs, 256 // math.gcd(256, bits))
    return cut(fields, {"K": aligned})["K"] if K % aligned == 0 else K


def quantized_proxy(fields: dict, rows: int, k_step: int) -> dict:
    """A quantized product's trace proxy, tiled `rows` rows of w by `k_step` values of K: K as
    proxy_k, N whole tiles in whole periods of the rows' sector phases at that K."""
    K, bits = proxy_k(fields, k_step), fields["bits"]
    phases = (32 // math.gcd(32, K * bits // 8), 32 // math.gcd(32, K // fields["group_size"] * 2))
    return cut({**fields, "K": K}, {"N": math.lcm(rows, SECTOR_ROWS, *phases)})


def quantized_op_shape(values: dict) -> dict | None:
    """A linear's sizes as a shape, where its weights are in MLX's affine layout (not the mxfp4 /
    nvfp4 `mode`s, not unquantized)."""
    return values if values.get("bits") and "mode" not in values else None


def quantization_problems(shape, bits=QUANTIZED_BITS) -> list[str]:
    """Shape problems shared by the quantized families (bits, group size, K divisibility)."""
    out = []
    if shape.bits not in bits:
        out.append(f"bits={shape.bits} is not supported (valid: {', '.join(map(str, bits))})")
    if shape.group_size not in GROUP_SIZES:
        out.append(f"group_size={shape.group_size} is not supported (valid: {', '.join(map(str, GROUP_SIZES))})")
    if shape.N < 1 or shape.K < 1:
        out.append("N and K must be positive")
    elif shape.group_size in GROUP_SIZES and shape.K % shape.group_size:
        out.append(f"K={shape.K} is not a multiple of group_size={shape.group_size}")
    return out


def dequantize_reference(wq, scales, biases, bits: int, group_size: int) -> mx.array:
    """Unpack MLX's layout with plain ops: each row is one little-endian bit stream, value i in
    bits i*bits .. i*bits+bits-1 (a 3-, 5- or 6-bit value may straddle two words); w = scale * q + bias."""
    n = wq.shape[0]
    stream = mx.view(wq, mx.uint8).reshape(n, -1, bits).astype(mx.uint32)   # `bits` bytes hold 8 values
    lo = sum(stream[:, :, b] << (8 * b) for b in range(min(bits, 4)))          # a chunk's bits 0..31
    hi = sum(stream[:, :, b] << (8 * (b - 4)) for b in range(4, bits)) if bits > 4 else mx.zeros_like(lo)
    values = []
    for j in range(8):
        offset = j * bits
        if offset + bits <= 32:
            v = lo >> offset
        elif offset >= 32:
            v = hi >> (offset - 32)
        else:   # straddles the 32-bit halves
            v = (lo >> offset) | (hi << (32 - offset))
        values.append(v & ((1 << bits) - 1))
    q = mx.stack(values, axis=-1).reshape(n, -1).astype(mx.float32)
    k = q.shape[1]
    s = mx.repeat(scales.astype(mx.float32), group_size, axis=1)[:, :k]
    b = mx.repeat(biases.astype(mx.float32), group_size, axis=1)[:, :k]
    return q * s + b
