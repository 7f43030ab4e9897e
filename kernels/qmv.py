"""qmv: quantized matrix-vector (and small-batch) product in MLX's affine `mx.quantize` layout."""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metalforge import devices
from metalforge.intmath import cdiv
from metalforge.kernels import cost, dtypes
from metalforge.kernels.family import Family, Geometry, Launch, Param, cut_keeping_tail


@dataclass(frozen=True)
class QmvShape:
    M: int
    N: int
    K: int
    bits: int = 4
    group_size: int = 64
    residual: int = 0   # 1: y = residual + x @ W^T (an output or down projection and its residual add)


class Qmv(Family):
    """y = x @ dequant(w_q).T (+ a residual row), MLX's affine layout at every width mx.quantize
    writes, M in 1..8."""

    name = "qmv"
    bucketed = ("M",)
    variant_fields = ("residual",)
    shape_type = QmvShape
    params = (
        Param("simdgroups", (1, 2, 4, 8), 2, "SIMD-groups across output rows"),
        Param("rows_per_simdgroup", (1, 2, 4, 8), 4, "output rows each SIMD-group computes"),
        Param("values_per_lane", (8, 16, 32), 16, "K values each lane consumes per step"),
        Param("stage_x", (False, True), False, "stage x through threadgroup memory once per step"),
        Param("k_split", (1, 2, 4, 8), 1, "SIMD-groups across K, summed in threadgroup memory"),
        Param("load_width", (1, 2, 4), 1, "packed 32-bit words per load"),
        Param("prescaled_x", (False, True), False, "x divided by each value's place in its word: no shifts"),
    )

    def proxy_shape(self, shape):
        return self.shape({**shape.__dict__, "N": cut_keeping_tail(shape.N, 256, 256),
                           "K": cut_keeping_tail(shape.K, 1024, 1024)})

    def shape_distance(self, a, b) -> float | None:
        if (a.bits, a.group_size) != (b.bits, b.group_size):
            return None
        return abs(math.log2(a.N / b.N)) + abs(math.log2(a.K / b.K)) + abs(math.log2(a.M / b.M))

    def shape_problems(self, shape: QmvShape) -> list[str]:
        return decode_shape_problems(self.name, shape, ("residual",), "qmm takes more rows")

    def buffer_elements(self, shape: QmvShape) -> dict[str, int]:
        return quantized_buffer_elements(shape)

    def geometry(self, config, shape: QmvShape, dtype) -> tuple[Geometry, ...]:
        sg, ks, r = config["simdgroups"], config["k_split"], config["rows_per_simdgroup"]
        threads = 32 * sg * ks
        staged = 4 * ks * shape.M * 32 * config["values_per_lane"] if config["stage_x"] else 0
        partials = 4 * ks * sg * shape.M * r if ks > 1 else 0
        # M x R accumulators and M x V staged values per lane
        registers = shape.M * (r + config["values_per_lane"])
        return (Geometry((cdiv(shape.N, sg * r) * threads, 1, 1), (threads, 1, 1), staged + partials, registers),)

    def launches(self, config, shape: QmvShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        kernel = self._kernel(
            self.template, ("x", "w", "scales", "biases") + (("residual",) if shape.residual else ()), ("y",),
            **rows_values(config, shape, d), N=shape.N, gather=False, residual=bool(shape.residual))
        g, = self.geometry(config, shape, dtype)
        return [Launch(kernel, g.grid, g.threadgroup, ((shape.M, shape.N),), (d.mlx,))]

    def make_inputs(self, shape: QmvShape, dtype, seed=0):
        d = dtypes.get(dtype)
        key = mx.random.key(seed)
        k1, k2 = mx.random.split(key)
        x = mx.random.normal((shape.M, shape.K), key=k2).astype(d.mlx)
        out = {"x": x, **random_quantized(shape.N, shape, d, k1)}
        if shape.residual:
            out["residual"] = mx.random.normal((shape.M, shape.N), key=mx.random.key(seed + 1)).astype(d.mlx)
        return out

    def reference(self, shape: QmvShape, dtype, inp):
        """Dequantise with plain MLX ops (independent of MLX's quantized kernels) and multiply in fp32."""
        w = dequantize_reference(inp["w"], inp["scales"], inp["biases"], shape.bits, shape.group_size)
        y = inp["x"].astype(mx.float32) @ w.T
        if shape.residual:
            y = y + inp["residual"].astype(mx.float32)
        return y.astype(dtypes.get(dtype).mlx)

    def baseline(self, shape: QmvShape, dtype, inp):
        """mlx-lm's composition: MLX's quantized product, then the residual add."""
        y = mx.quantized_matmul(inp["x"], inp["w"], inp["scales"], inp["biases"],
                                transpose=True, group_size=shape.group_size, bits=shape.bits)
        return inp["residual"] + y if shape.residual else y

    def tolerance(self, config, dtype):
        d = dtypes.get(dtype)
        # Each output sums K products; rounding grows with sqrt(K) but is bounded for our inputs.
        return d.atol * 4, d.rtol

    def config_problems(self, config, shape, dtype) -> list[str]:
        values = config["values_per_lane"]
        out = []
        if 32 % shape.bits == 0 and values * shape.bits % 32:
            out.append(f"values_per_lane={values} is not a whole 32-bit word of {shape.bits}-bit weights")
        elif shape.K % values:
            out.append(f"K={shape.K} is not a multiple of values_per_lane={values}")
        if 32 % shape.bits:
            for name, plain in (("load_width", 1), ("prescaled_x", False)):
                if config[name] != plain:
                    out.append(f"{name}={config[name]} needs whole words; {shape.bits}-bit values straddle them")
        elif not out:
            words, row_words = values * shape.bits // 32, shape.K * shape.bits // 32
            if words % config["load_width"] or row_words % config["load_width"]:
                out.append(f"load_width={config['load_width']} does not divide a lane's {words} words per step "
                           f"and a row's {row_words} words (loads must stay aligned)")
        if config["k_split"] > 1 and 32 * values * config["k_split"] > shape.K:
            out.append(f"k_split={config['k_split']} leaves SIMD-groups without K: K={shape.K} is less than "
                       f"k_split x 32 lanes x values_per_lane = {config['k_split'] * 32 * values}")
        return out

    def cost(self, config, shape, dtype, device) -> float:
        """Modelled seconds for one call (kernels/cost.py says how)."""
        dev = devices.get(device)
        dtype = dtypes.get(dtype)
        g, = self.geometry(config, shape, dtype)
        ks = config["k_split"]
        occ = cost.occupancy(g.threads, g.threadgroup_memory_bytes, g.threadgroups)
        padded_rows = g.threadgroups * config["simdgroups"] * config["rows_per_simdgroup"]
        weights = padded_rows * shape.K * shape.bits / 8 + 2 * padded_rows * (shape.K / shape.group_size) * dtype.size
        # x is re-read by every SIMD-group (mostly from cache) unless staged once per threadgroup
        x_reads = shape.M * shape.K * dtype.size * g.threadgroups * (1 if config["stage_x"] else config["simdgroups"]) * 0.05
        x_reads += shape.residual * shape.M * shape.N * dtype.size   # the residual row, read once
        # a load instruction's width: LW words of whole-word widths; straddling widths read a
        # lane's V values as bytes the compiler merges
        whole_words = 32 % shape.bits == 0
        width = cost.load_efficiency(4 * config["load_width"] if whole_words else
                                     config["values_per_lane"] * shape.bits / 8)
        pressure = 1.0 if g.registers <= 96 else 96 / g.registers   # register pressure
        parallel = occ.parallel_fraction(dev, ilp=config["rows_per_simdgroup"] / 2) * width * pressure
        # FMAs plus unpacking: mask, shift and convert per value; a pre-scaled x saves the shift
        unpack = 2 if config["prescaled_x"] else 3
        flops = 2 * shape.M * padded_rows * shape.K + unpack * padded_rows * shape.K
        t = cost.roofline(weights + x_reads, flops, dev, parallel)
        steps = cdiv(shape.K, 32 * config["values_per_lane"] * ks)
        if config["stage_x"]:
            t += 2 * steps * cost.BARRIER_S * occ.waves(dev)
        t += shape.M * config["rows_per_simdgroup"] * cost.SIMD_REDUCE_S * occ.waves(dev)
        if ks > 1:   # partial sums through threadgroup memory: a barrier and KS reads per output
            t += (cost.BARRIER_S + ks * shape.M * config["rows_per_simdgroup"] * cost.SIMD_REDUCE_S / 32) * occ.waves(dev)
        return t + cost.launch_seconds()


QMV = Qmv()


def as_qmv(shape, rows: int) -> QmvShape:
    """The qmv whose weights stream as a fused kernel's do: `rows` rows of the shape's K."""
    return QmvShape(M=shape.M, N=rows, K=shape.K, bits=shape.bits, group_size=shape.group_size)


def fused_cost(config, qmv_shape: QmvShape, matrices: int, dtype, device) -> float:
    """Modelled seconds of a fused quantized family, in qmv's style: qmv's for the same weights,
    each SIMD-group computing its R rows of `matrices` matrices (the epilogues are a few flops a row)."""
    return QMV.cost({**config, "rows_per_simdgroup": matrices * config["rows_per_simdgroup"]}, qmv_shape, dtype,
                    device)


def rows_values(config, shape, d, **fused) -> dict:
    """The values quantized_rows.j2 (the dot product qmv, gather_qmv and the fused families
    share) renders with: the shape's sizes, the config's tunables, and the fused prologue's
    (`NW` weight matrices, `norm` (the RMS norm's weight and eps are inputs), `BLOCKS` row blocks a threadgroup)."""
    return dict(M=shape.M, K=shape.K, bits=shape.bits, group_size=shape.group_size, T=d.metal,
                SG=config["simdgroups"], R=config["rows_per_simdgroup"], V=config["values_per_lane"],
                stage_x=config["stage_x"], KS=config["k_split"], LW=config["load_width"],
                prescaled=config["prescaled_x"], **{"NW": 1, "norm": False, "BLOCKS": 1, **fused})


def random_quantized(rows: int, shape, d, key, suffix: str = "") -> dict[str, mx.array]:
    """A random (rows, K) weight in MLX's affine layout at the shape's bits and group size:
    {w, scales, biases} (names with `suffix`), as the quantized families' inputs."""
    w = (mx.random.normal((rows, shape.K), key=key) * 0.05).astype(d.mlx)
    wq, scales, biases = mx.quantize(w, group_size=shape.group_size, bits=shape.bits)
    return {"w" + suffix: wq, "scales" + suffix: scales, "biases" + suffix: biases}


def random_norm(shape, d, key) -> dict[str, mx.array]:
    """A fused prologue's RMS-norm inputs: a weight near one (so it matters) and eps."""
    return {"norm": (1 + 0.2 * mx.random.normal((shape.K,), key=key)).astype(d.mlx),
            "eps": mx.array([1e-5], dtype=mx.float32)}


def quantized_buffer_elements(shape) -> dict[str, int]:
    """x, the weight matrix (in values, as the kernels index it) and y, for qmv and qmm alike."""
    return {"x": shape.M * shape.K, "w": shape.N * shape.K, "y": shape.M * shape.N}


def decode_shape_problems(family: str, shape, flags: tuple[str, ...], larger: str) -> list[str]:
    """What the decode-sized quantized families (qmv and the fused ones) refuse: the
    quantization's problems, M outside 1..8 (`larger`: what serves more rows), a flag not 0 or 1."""
    out = quantization_problems(shape)
    if not 1 <= shape.M <= 8:
        out.append(f"M={shape.M} is outside 1..8 ({family} is the decode / small-batch kernel; {larger})")
    out += [f"{f}={getattr(shape, f)} is not 0 or 1" for f in flags if getattr(shape, f) not in (0, 1)]
    return out


QMV_BITS = (2, 3, 4, 5, 6, 8)   # every width mx.quantize (affine) writes


def quantization_problems(shape, bits=QMV_BITS) -> list[str]:
    """Shape problems shared by the quantized families (bits, group size, K divisibility)."""
    out = []
    if shape.bits not in bits:
        out.append(f"bits={shape.bits} is not supported (valid: {', '.join(map(str, bits))})")
    if shape.group_size not in (32, 64, 128):
        out.append(f"group_size={shape.group_size} is not supported (valid: 32, 64, 128)")
    if shape.N < 1 or shape.K < 1:
        out.append("N and K must be positive")
    elif shape.group_size in (32, 64, 128) and shape.K % shape.group_size:
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
