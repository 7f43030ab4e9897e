"""qmv: quantized matrix-vector (and small-batch) product in MLX's affine `mx.quantize` layout."""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from metalforge.intmath import cdiv
from metalforge.kernels import dtypes
from metalforge.kernels.family import Geometry, Launch, Param, allowed, mlx_choice
from metalforge.kernels.mlx_dispatch import QMV_TILE, qmv_values_per_thread
from metalforge.kernels.work import SECTOR, Tally
from metalforge.kernels.quantized import VECTOR_ROWS, QuantizedMatmul, QuantizedShape, quantization_problems


@dataclass(frozen=True)
class QmvShape(QuantizedShape):
    residual: int = 0   # 1: y = residual + x @ W^T (an output or down projection and its residual add)


class Qmv(QuantizedMatmul):
    """y = x @ dequant(w_q).T (+ a residual row), MLX's affine layout at every width mx.quantize
    writes, M in 1..8."""

    name = "qmv"
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

    def shape_problems(self, shape: QmvShape) -> list[str]:
        return decode_shape_problems(self.name, shape, ("residual",), "qmm takes more rows")

    def geometry(self, config, shape: QuantizedShape, dtype) -> tuple[Geometry, ...]:
        sg, ks, r = config["simdgroups"], config["k_split"], config["rows_per_simdgroup"]
        threads = 32 * sg * ks
        staged = 4 * ks * shape.M * 32 * config["values_per_lane"] if config["stage_x"] else 0
        partials = 4 * ks * sg * shape.M * r if ks > 1 else 0
        # M x R accumulators and M x V staged values per lane
        registers = shape.M * (r + config["values_per_lane"])
        return (Geometry((cdiv(shape.N, sg * r) * threads, 1, 1), (threads, 1, 1), staged + partials, registers),)

    def launches(self, config, shape: QuantizedShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        kernel = self._kernel(
            self.template, ("x", "w", "scales", "biases") + (("residual",) if shape.residual else ()), ("y",),
            **rows_values(config, shape, d), N=shape.N, gather=False, residual=bool(shape.residual))
        g, = self.geometry(config, shape, dtype)
        return [Launch(kernel, g.grid, g.threadgroup, ((shape.M, shape.N),), (d.mlx,))]

    def make_inputs(self, shape: QmvShape, dtype, seed=0):
        out = super().make_inputs(shape, dtype, seed)
        if shape.residual:
            out["residual"] = mx.random.normal((shape.M, shape.N), key=mx.random.key(seed + 1)).astype(dtypes.get(dtype).mlx)
        return out

    def reference(self, shape: QmvShape, dtype, inp):
        y = super().reference(shape, dtype, inp)
        return (y.astype(mx.float32) + inp["residual"].astype(mx.float32)).astype(y.dtype) if shape.residual else y

    def baseline(self, shape: QmvShape, dtype, inp):
        """mlx-lm's composition: MLX's quantized product, then the residual add."""
        y = super().baseline(shape, dtype, inp)
        return inp["residual"] + y if shape.residual else y

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

    def work(self, config, shape, dtype) -> list:
        """The launch's counters (kernels/work.py), instruction by instruction as the template runs."""
        d = dtypes.get(dtype)
        tally = _rows_tally(config, shape, d, norm=False)
        if shape.residual:   # lane 0 reads each output's residual value before it writes y
            tally.device("residual", ((0, d.size),), shape.M * shape.N)
            tally.footprint("residual", shape.M * shape.N * d.size)
        return [tally.counted()]

    def mlx_config(self, shape, dtype, device):
        """MLX's qmv / qmv_fast tile: 2 SIMD-groups of 4 output rows, each lane taking
        pack_factor x packs_per_thread values a step, x prescaled by each value's place in its
        word (MLX's load_vector) where values fill words. None where MLX runs another kernel:
        qmv_quad (K of 64 or 128: four lanes a row), qmv_wide (2+ rows on M3 and later: lanes
        split across K and rows), or qmm past its batch limit."""
        choice = mlx_choice(self, shape, dtype, device)
        if choice is None or choice.launches[0].function not in ("affine_qmv_fast", "affine_qmv"):
            return None
        shape = self.shape(shape)
        simdgroups = QMV_TILE["threadgroup"][1]
        return allowed(self, {**self.default_config(), "simdgroups": simdgroups,
                              "rows_per_simdgroup": QMV_TILE["rows"] // simdgroups,
                              "values_per_lane": qmv_values_per_thread(shape.bits), "stage_x": False, "k_split": 1,
                              "load_width": 1, "prescaled_x": shape.bits in (2, 4)}, shape, dtype, device)


def footprints(tally: Tally, shape, size: int, rows: int, x_rows: int) -> None:
    """Every value of x, of `rows` weight rows (their scales and biases) and of y is touched once."""
    groups = shape.K // shape.group_size
    tally.footprint("x", x_rows * shape.K * size)
    tally.footprint("w", rows * shape.K * shape.bits // 8)
    tally.footprint("scales", rows * groups * size)
    tally.footprint("biases", rows * groups * size)
    tally.footprint("y", x_rows * shape.N * size)


def _residues(count: int, stride: int, base: int) -> dict[int, int]:
    """{base + i * stride mod 32: how many i in 0..count-1}: what decides an access's sectors."""
    out: dict = {}
    for i in range(min(count, SECTOR)):
        key = (base + i * stride) % SECTOR
        out[key] = out.get(key, 0) + len(range(i, count, SECTOR))
    return out


QMV = Qmv()


def as_qmv(shape, rows: int) -> QmvShape:
    """The qmv whose weights stream as a fused kernel's do: `rows` rows of the shape's K."""
    return QmvShape(M=shape.M, N=rows, K=shape.K, bits=shape.bits, group_size=shape.group_size)


def _rows_tally(config, shape, d, norm: bool) -> Tally:
    """qmv.metal.j2's (or a fused family's, with `norm`) product of the shape's rows."""
    g, = QMV.geometry(config, shape, d)
    tally = Tally(QMV.name, g)
    count_rows(tally, config, shape, d.size, {"x": 0, "w": 0, "scales": 0, "biases": 0, "y": 0}, norm)
    footprints(tally, shape, d.size, rows=shape.N, x_rows=shape.M)
    if norm:
        tally.footprint("norm", shape.K * d.size)
    return tally


def fused_work(config, qmv_shape: QmvShape, matrices: int, dtype) -> list:
    """The work of a fused quantized family, counted as qmv's for the same weights: each SIMD-group
    computing its R rows of `matrices` matrices, its lanes reading the RMS norm's weight with x.
    ASSUMED: the sum of squares, eps and the epilogues (a few operations a row) add nothing the
    model prices (tests/test_scaled_work.py bounds them)."""
    config = {**config, "rows_per_simdgroup": matrices * config["rows_per_simdgroup"]}
    return [_rows_tally(config, qmv_shape, dtypes.get(dtype), norm=True).counted()]


def rows_values(config, shape, d, **fused) -> dict:
    """The values quantized_rows.j2 (the dot product qmv, gather_qmv and the fused families
    share) renders with: the shape's sizes, the config's tunables, and the fused prologue's
    (`NW` weight matrices, `norm` (the RMS norm's weight and eps are inputs), `BLOCKS` row blocks a threadgroup)."""
    return dict(M=shape.M, K=shape.K, bits=shape.bits, group_size=shape.group_size, T=d.metal,
                SG=config["simdgroups"], R=config["rows_per_simdgroup"], V=config["values_per_lane"],
                stage_x=config["stage_x"], KS=config["k_split"], LW=config["load_width"],
                prescaled=config["prescaled_x"], **{"NW": 1, "norm": False, "BLOCKS": 1, **fused})


def random_norm(shape, d, key) -> dict[str, mx.array]:
    """A fused prologue's RMS-norm inputs: a weight near one (so it matters) and eps."""
    return {"norm": (1 + 0.2 * mx.random.normal((shape.K,), key=key)).astype(d.mlx),
            "eps": mx.array([1e-5], dtype=mx.float32)}


def decode_shape_problems(family: str, shape, flags: tuple[str, ...], larger: str) -> list[str]:
    """What the decode-sized quantized families (qmv and the fused ones) refuse: the
    quantization's problems, M outside 1..8 (`larger`: what serves more rows), a flag not 0 or 1."""
    out = quantization_problems(shape)
    if not 1 <= shape.M <= VECTOR_ROWS:
        out.append(f"M={shape.M} is outside 1..{VECTOR_ROWS} ({family} is the decode / small-batch kernel; {larger})")
    out += [f"{f}={getattr(shape, f)} is not 0 or 1" for f in flags if getattr(shape, f) not in (0, 1)]
    return out


def count_rows(tally: Tally, config, shape, size: int, at: dict, norm: bool = False) -> None:
    """The instructions of one grid row of qmv.metal.j2 (one product; one pair of gather_qmv), its
    buffers starting `at` these byte offsets; with `norm`, each x value's read of the norm weight
    (quantized_rows.j2's prologue). Exact where lanes diverge only at K's tail."""
    SG, R, V, KS, LW = (config[k] for k in ("simdgroups", "rows_per_simdgroup", "values_per_lane", "k_split",
                                           "load_width"))
    M, N, K, bits = shape.M, shape.N, shape.K, shape.bits
    step_len, groups, row_bytes = 32 * V, K // shape.group_size, K * bits // 8
    steps = cdiv(K, step_len * KS)
    tgs = cdiv(N, SG * R)
    sgs = tgs * SG                                        # SIMD-groups per K split
    w_rows = _residues(N, row_bytes, at["w"])             # a row's first byte mod 32 -> rows
    s_rows = {b: _residues(N, groups * size, at[b]) for b in ("scales", "biases")}
    for step in range(steps):
        if config["stage_x"]:
            _stage_x(tally, config, shape, size, at["x"], step, tgs)
        for ks in range(KS):
            k0 = (step * KS + ks) * step_len
            lanes = range(max(0, min(32, (K - k0) // V)))   # lanes with k < K
            if not lanes:
                continue
            for m in range(M):
                for v in range(V):
                    if config["stage_x"]:
                        tally.threadgroup((4 * staged_word((ks * M + m) * step_len + l * V + v, V) for l in lanes), sgs)
                    else:
                        tally.device("x", ((at["x"] + (m * K + k0 + l * V + v) * size, size) for l in lanes), sgs)
                    if norm:
                        tally.device("norm", (((k0 + l * V + v) * size, size) for l in lanes), sgs)
            for base, rows in w_rows.items():
                first = base + k0 * bits // 8
                if 32 % bits == 0:
                    for j in range(0, V * bits // 32, LW):
                        tally.device("w", ((first + l * V * bits // 8 + 4 * j, 4 * LW) for l in lanes), rows * M)
                else:
                    for byte in range(V * bits // 8):
                        tally.device("w", ((first + l * V * bits // 8 + byte, 1) for l in lanes), rows * M)
            for b, residues in s_rows.items():
                for base, rows in residues.items():
                    tally.device(b, ((base + (k0 + l * V) // shape.group_size * size, size) for l in lanes), rows)
    tally.barriers_per_threadgroup += 2 * steps if config["stage_x"] else 0
    tally.simd_functions += sgs * KS * R * M
    if KS == 1:
        tally.device("y", ((at["y"], size),), M * N)      # lane 0 writes each output: one sector
        return
    tally.barriers_per_threadgroup += 1
    tally.threadgroup((0,), sgs * KS * R * M)             # lane 0 writes each partial sum
    for it in range(cdiv(M * R, 32)):                     # the first split's lanes sum them, lane i word i
        lanes = range(32 * it, min(M * R, 32 * it + 32))
        for j in range(KS):
            tally.threadgroup((4 * (j * SG * M * R + i) for i in lanes), sgs)
        for (_, valid), (count, row0) in _row_groups(tgs * SG, R, N, size, at["y"]).items():
            tally.device("y", ((at["y"] + (i // R * N + row0 + i % R) * size, size) for i in lanes
                               if i % R < valid), count)


def _row_groups(groups: int, R: int, N: int, size: int, y0: int) -> dict:
    """SIMD-groups' first output rows (R apart) whose writes meet the sectors alike: {(offset mod
    32, rows below N): (how many, the first such row)}; offsets repeat every 32 SIMD-groups."""
    full = min(groups, N // R)                  # the groups whose R rows all lie below N
    out: dict = {}
    for i in list(range(min(full, SECTOR))) + list(range(full, groups)):
        key = ((y0 + i * R * size) % SECTOR, min(R, max(0, N - i * R)))
        count, first = out.get(key, (0, i * R))
        out[key] = (count + (len(range(i, full, SECTOR)) if i < full else 1), first)
    return out


def _stage_x(tally: Tally, config, shape, size: int, x0: int, step: int, tgs: int) -> None:
    """One step's staging of x: every thread copies values of each K split's slice into xs."""
    SG, V, KS = config["simdgroups"], config["values_per_lane"], config["k_split"]
    M, K, step_len = shape.M, shape.K, 32 * V
    threads, total = 32 * SG * KS, KS * M * step_len
    for sg in range(SG * KS):
        for it in range(cdiv(total, threads)):
            idx = [i for i in range(sg * 32 + it * threads, sg * 32 + it * threads + 32) if i < total]
            kk = {i: (step * KS + i // (M * step_len)) * step_len + i % step_len for i in idx}
            tally.device("x", ((x0 + ((i // step_len) % M * K + kk[i]) * size, size) for i in idx if kk[i] < K), tgs)
            tally.threadgroup((4 * staged_word(i, V) for i in idx), tgs)


def staged_word(i: int, V: int) -> int:
    """Where quantized_rows.j2 stages value i of x's slices (lane l's V values in words l*V..,
    value v at v XOR l / lanes-per-bank-row): 32 lanes at one v, or 32 consecutive values, meet
    32 distinct banks."""
    return i ^ (i % (32 * V) // V // max(1, 32 // V))
