"""qmm: quantized matrix-matrix product for prompts (M > 8), MLX's affine `mx.quantize` layout."""
from __future__ import annotations

import itertools

import mlx.core as mx

from metalforge.intmath import cdiv
from metalforge.kernels import dtypes
from metalforge.kernels.dtypes import vector_of
from metalforge.kernels.family import (TILE_PAD_BYTES, Geometry, Launch, Param, allowed, fragment_problems,
                                       mlx_choice, stage_dtype, stage_problems)
from metalforge.kernels.mlx_dispatch import QMM_TILE
from metalforge.kernels.work import SECTOR, Tally
from metalforge.kernels.quantized import VECTOR_ROWS, QuantizedMatmul, quantization_problems, quantized_proxy
from metalforge.kernels.timing.traces import cut


QMM_BITS = (2, 4, 8)   # whole words of values; 3-, 5- and 6-bit prompts run MLX's op


class Qmm(QuantizedMatmul):
    """y = x @ dequant(w_q).T for prompts, on SIMD-group matrices (qmv's layout, inputs, reference
    and baseline: kernels/quantized.py)."""

    name = "qmm"
    bound = "compute"
    tuned_with_models = True    # a model's prompt runs it: every linear of a prefill past 8 rows (engine/ops.py)
    trace_groups = (("M",), ("N",), ("K",))
    params = (
        Param("BM", (8, 16, 32, 64), 32, "output rows per threadgroup"),
        Param("BN", (8, 16, 32, 64), 32, "output columns per threadgroup"),
        Param("BK", (16, 32, 64, 128), 32, "K values staged per step"),
        Param("WM", (1, 2, 4), 2, "SIMD-groups across the tile's rows"),
        Param("WN", (1, 2, 4), 2, "SIMD-groups across the tile's columns"),
        Param("dequant", ("threadgroup", "registers"), "threadgroup",
              "dequantise weights into a shared tile, or each lane into its own fragment elements"),
        Param("stage", ("input", "float"), "input", "element type of the staged tiles: the input's, or fp32"),
        Param("split_k", (1, 2, 4, 8, 16, 32), 1, "threadgroups across K, their fp32 partial tiles summed by a second pass"),
        Param("operands", ("float", "input"), "float", "operand fragments in fp32 or the input's half (fp32 accumulation)"),
    )

    def trace_proxy(self, fields: dict, config) -> dict:
        """Every counter grows with M x N x K in whole tiles: quantized_proxy of BN rows of w by
        BK x split_k values of K (every split whole steps), M whole BM-row tiles (a 64-row tile
        traced over 32 rows scaled one half-empty tile)."""
        out = quantized_proxy(fields, config["BN"], config["BK"] * config["split_k"])
        return cut(out, {"M": config["BM"]})

    def mlx_regime(self, shape) -> str:
        """MLX's mat-vec kernels at qmv's rows (1..VECTOR_ROWS), qmm_t past them (a 128-row
        bucket's 3.7x taken as evidence at one row once routed decode to qmm)."""
        return "vector" if shape.M <= VECTOR_ROWS else "matrix"

    def shape_problems(self, shape) -> list[str]:
        return quantization_problems(shape, bits=QMM_BITS) + ([] if shape.M >= 1 else [f"M={shape.M} must be positive"])

    def geometry(self, config, shape, dtype) -> tuple[Geometry, ...]:
        threads = 32 * config["WM"] * config["WN"]
        rows = config["BM"] + (config["BN"] if config["dequant"] == "threadgroup" else 0)
        grid = (threads * cdiv(shape.N, config["BN"]), cdiv(shape.M, config["BM"]), config["split_k"])
        tm, tn = config["BM"] // config["WM"] // 8, config["BN"] // config["WN"] // 8
        # fp32 accumulators (two registers a lane each), TM + 1 operands (one each in half)
        registers = 2 * tm * tn + (tm + 1) * (2 if config["operands"] == "float" else 1)
        main = Geometry(grid, (threads, 1, 1), rows * self.tile_row_bytes(config, dtype), registers=registers)
        if config["split_k"] == 1:
            return (main,)
        return main, Geometry((shape.N, shape.M, 1), (64, 1, 1), registers=2)

    @staticmethod
    def tile_row_bytes(config, dtype) -> int:
        """A staged tile row: BK values and 16 bytes of padding (MLX's steel loaders pad so)."""
        return config["BK"] * stage_dtype(config, dtype).size + TILE_PAD_BYTES

    def fragments(self, config) -> int:
        """8x8 fp32 fragments a SIMD-group holds: its outputs, a column of x and one weight operand."""
        tm, tn = config["BM"] // config["WM"] // 8, config["BN"] // config["WN"] // 8
        return tm * tn + tm + 1

    def config_problems(self, config, shape, dtype) -> list[str]:
        out = []
        for tile, ways in (("BM", "WM"), ("BN", "WN")):
            if config[tile] % (8 * config[ways]):
                out.append(f"{tile}={config[tile]} over {ways}={config[ways]} is not a whole number of 8-wide fragments")
        if not out:
            out += fragment_problems(self.fragments(config))
        if shape.K % (config["BK"] * config["split_k"]):
            split = f" x split_k={config['split_k']}" if config["split_k"] > 1 else ""
            out.append(f"K={shape.K} is not a multiple of BK={config['BK']}{split}")
        if config["operands"] == "input" and (dtypes.get(dtype).name != "float16" or config["stage"] != "input"):
            out.append("operands=input takes half tiles as half fragments (float16 inputs staged as input; "
                       "bfloat fragments need an M3 or later)")
        return out + stage_problems(config, dtype)

    def launches(self, config, shape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        stage = stage_dtype(config, dtype)
        split = config["split_k"]
        words_per_step = config["BK"] * shape.bits // 32
        kernel = self._kernel(
            self.template, ("x", "w", "scales", "biases", "lengths"), ("y",) if split == 1 else ("partial",),
            N=shape.N, K=shape.K, bits=shape.bits, group_size=shape.group_size, T=d.metal, TV=d.vector,
            BM=config["BM"], BN=config["BN"], BK=config["BK"], WM=config["WM"], WN=config["WN"],
            DQ=config["dequant"], ST=stage.metal, PAD=TILE_PAD_BYTES // stage.size, XV=16 // d.size,
            WV=min(4, words_per_step), SPLIT_K=split, vector=vector_of,
            OT="float" if config["operands"] == "float" else d.metal,
        )
        geometry = self.geometry(config, shape, dtype)
        main = geometry[0]
        if split == 1:
            return [Launch(kernel, main.grid, main.threadgroup, ((shape.M, shape.N),), (d.mlx,), lengths=(shape.M,))]
        reduce = self._kernel("qmm_reduce.metal.j2", ("partial", "lengths"), ("y",), N=shape.N, SPLIT_K=split,
                              T=d.metal)
        return [Launch(kernel, main.grid, main.threadgroup, ((split, shape.M, shape.N),), (mx.float32,),
                       lengths=(shape.M,)),
                Launch(reduce, geometry[1].grid, geometry[1].threadgroup, ((shape.M, shape.N),), (d.mlx,),
                       lengths=(shape.M,))]

    def work(self, config, shape, dtype) -> list:
        """Each launch's counters (kernels/work.py) as the template runs."""
        d = dtypes.get(dtype)
        geometry = self.geometry(config, shape, d)
        main = Tally(self.name, geometry[0])
        _count_qmm(main, config, shape, d)
        if config["split_k"] == 1:
            return [main.counted()]
        reduce = Tally(self.name + "_reduce", geometry[1])
        _count_qmm_reduce(reduce, shape, config["split_k"], d.size)
        return [main.counted(), reduce.counted()]

    def mlx_config(self, shape, dtype, device):
        """MLX's qmm_t tile (BM = BN = BK = 32, 2 x 2 SIMD-groups, weights dequantised into a
        threadgroup tile, tiles in the input's type, fp32 operand fragments as steel's BlockMMA
        loads them) and qmm_splitk's partitions of K. None where MLX runs a mat-vec kernel (rows
        below its batch limit), splits K into a count our split_k lacks, or runs NAX (M5)."""
        choice = mlx_choice(self, shape, dtype, device)
        if choice is None or not choice.launches[0].function.startswith("affine_qmm_t"):
            return None
        main = choice.launches[0]
        split = main.grid[2] if main.function == "affine_qmm_t_splitk" else 1
        if split not in self.param("split_k").domain:
            return None
        return allowed(self, {"BM": QMM_TILE["bm"], "BN": QMM_TILE["bn"], "BK": QMM_TILE["bk"],
                              "WM": main.threadgroup[2], "WN": main.threadgroup[1], "dequant": "threadgroup",
                              "stage": "float" if dtypes.get(dtype).name == "float32" else "input",
                              "split_k": split, "operands": "float"}, shape, dtype, device)


def _classes(values, key) -> dict:
    """{key(v): (how many v, the first v)}: the places whose accesses meet the sectors alike."""
    out: dict = {}
    for v in values:
        k = key(v)
        count, first = out.get(k, (0, v))
        out[k] = (count + 1, first)
    return out


def _count_qmm(tally: Tally, config, shape, d) -> None:
    """qmm.metal.j2, instruction by instruction; tiles and K steps whose accesses meet the sectors
    alike (the same valid rows, the same offsets modulo 32 bytes) counted once and multiplied."""
    BM, BN, BK, WM, WN, split = (config[k] for k in ("BM", "BN", "BK", "WM", "WN", "split_k"))
    M, N, K = shape.M, shape.N, shape.K
    st, size = stage_dtype(config, d).size, d.size
    stride, threads, SG = BK + TILE_PAD_BYTES // st, 32 * WM * WN, WM * WN
    TM, TN = BM // WM // 8, BN // WN // 8
    XV = 16 // size
    steps = K // split // BK
    tiles_m, tiles_n = cdiv(M, BM), cdiv(N, BN)
    tgs = tiles_m * tiles_n * split
    k0s = range(0, K, BK)                      # every step of every split
    tally.device("lengths", ((0, 4),), tgs * SG)
    tally.barriers_per_threadgroup += 2 * steps
    lanes = [(sg, it) for sg in range(SG) for it in range(cdiv(BM * BK, threads * XV))]
    # x staged: 16-byte loads of rows below M; XV stores to the tile each
    for valid, (count, _) in _classes((min(BM, M - m0) for m0 in range(0, M, BM)), lambda v: v).items():
        for sg, it in lanes:
            idx = [i for i in range((sg * 32 + it * threads) * XV, (sg * 32 + 32 + it * threads) * XV, XV)
                   if i < BM * BK]
            tally.device("x", ((((i // BK) * K + i % BK) * size, 16) for i in idx if i // BK < valid),
                         count * tiles_n * steps * split)
    for sg, it in lanes:
        idx = [i for i in range((sg * 32 + it * threads) * XV, (sg * 32 + 32 + it * threads) * XV, XV) if i < BM * BK]
        for c in range(XV):
            tally.threadgroup([((i // BK) * stride + i % BK + c) * st for i in idx], tgs * steps)
    # the weights: dequantised into a shared tile, or by each lane into its fragment elements
    if config["dequant"] == "threadgroup":
        _count_weight_tile(tally, config, shape, d, tiles_m, k0s)
    else:
        _count_weight_fragments(tally, config, shape, d, tiles_m, k0s)
    # fragment reads: a shifted tile row meets the banks alike, so one of each counts for all
    fm_fn = [(((lane // 4) & 4) + (lane // 2) % 4, ((lane // 4) & 2) * 2 + (lane % 2) * 2) for lane in range(32)]
    frags = tgs * steps * (BK // 8) * SG
    for c in range(2):
        tally.threadgroup([(fm * stride + fn + c) * st for fm, fn in fm_fn], frags * TM)
        if config["dequant"] == "threadgroup":
            tally.threadgroup([((fn + c) * stride + fm) * st for fm, fn in fm_fn], frags * TN)
    tally.matrix_multiplies += frags * TM * TN
    # the output: each lane its two elements of each fragment, rows below M and columns below N
    out, out_size = ("y", size) if split == 1 else ("partial", 4)
    rows = _classes(range(0, tiles_m * BM, 8), lambda m: (min(8, max(0, M - m)), m * N * out_size % SECTOR))
    cols = _classes(range(0, tiles_n * BN, 8), lambda n: (min(8, max(0, N - n)), n * out_size % SECTOR))
    for (m_valid, _), (m_count, m) in rows.items():
        for (n_valid, _), (n_count, n) in cols.items():
            for z, c in itertools.product(range(split), range(2)):
                tally.device(out, ((((z * M + m + fm) * N + n + fn + c) * out_size, out_size) for fm, fn in fm_fn
                                   if fm < m_valid and fn + c < n_valid), m_count * n_count)
    tally.footprint("lengths", 4)
    tally.footprint("x", M * K * size)
    footprints_w(tally, shape, size)
    tally.footprint(out, split * M * N * out_size)


def footprints_w(tally: Tally, shape, size: int) -> None:
    tally.footprint("w", shape.N * shape.K * shape.bits // 8)
    for b in ("scales", "biases"):
        tally.footprint(b, shape.N * (shape.K // shape.group_size) * size)


def _count_weight_tile(tally: Tally, config, shape, d, tiles_m: int, k0s) -> None:
    """Each thread loads WV packed words of a row, reads their groups' scales and biases, and
    stores the dequantised values into the shared tile."""
    BN, BK, WM, WN = config["BN"], config["BK"], config["WM"], config["WN"]
    N, K, bits, gs, size = shape.N, shape.K, shape.bits, shape.group_size, d.size
    st, threads = stage_dtype(config, d).size, 32 * WM * WN
    stride, per_word, groups = BK + TILE_PAD_BYTES // st, 32 // bits, K // gs
    WV, row_words = min(4, BK * bits // 32), BK // per_word
    tiles = _classes(range(0, N, BN), lambda n0: (min(BN, N - n0), n0 * K * bits // 8 % SECTOR,
                                                  n0 * groups * size % SECTOR))
    steps = _classes(k0s, lambda k0: (k0 * bits // 8 % SECTOR, k0 % gs, k0 // gs * size % SECTOR))
    places = {(n_key, k_key): (n_count * k_count, (n0, k0)) for n_key, (n_count, n0) in tiles.items()
              for k_key, (k_count, k0) in steps.items()}
    work = [[i for i in range((sg * 32 + it * threads) * WV, (sg * 32 + 32 + it * threads) * WV, WV)
             if i < BN * row_words] for sg in range(WM * WN) for it in range(cdiv(BN * row_words, threads * WV))]
    for idx in work:   # the tile's stores, alike in every threadgroup and step
        for j, p in itertools.product(range(WV), range(per_word)):
            tally.threadgroup([((i // row_words) * stride + (i % row_words + j) * per_word + p) * st for i in idx],
                              tiles_m * len(k0s) * cdiv(N, BN))
    for ((valid, *_), _), (count, (n0, k0)) in places.items():
        for idx in work:
            live = [(i // row_words, i % row_words * per_word) for i in idx if i // row_words < valid]
            tally.device("w", ((((n0 + r) * K + k0 + k) * bits // 8, 4 * WV) for r, k in live), count * tiles_m)
            for j, b in itertools.product(range(WV), ("scales", "biases")):
                tally.device(b, ((((n0 + r) * groups + (k0 + k + j * per_word) // gs) * size, size)
                                 for r, k in live), count * tiles_m)

def _count_weight_fragments(tally: Tally, config, shape, d, tiles_m: int, k0s) -> None:
    """Each lane reads the word, scale and bias of each of its two elements of each weight
    fragment (row n of w, K value k): every SIMD-group row of the tile its own."""
    BN, BK, WM = config["BN"], config["BK"], config["WM"]
    N, K, bits, gs, size = shape.N, shape.K, shape.bits, shape.group_size, d.size
    per_word, groups = 32 // bits, K // gs
    fm_fn = [(((lane // 4) & 4) + (lane // 2) % 4, ((lane // 4) & 2) * 2 + (lane % 2) * 2) for lane in range(32)]
    # fragments of 8 rows of w: every SIMD-group row (WM of them) of every row of tiles reads them
    blocks = _classes(range(0, cdiv(N, BN) * BN, 8), lambda n: (min(8, max(0, N - n)), n * K * bits // 8 % SECTOR,
                                                                 n * groups * size % SECTOR))
    ks = _classes((k0 + kk for k0 in k0s for kk in range(0, BK, 8)),
                  lambda k: (k * bits // 8 % SECTOR, k % gs, k // gs * size % SECTOR))
    for (valid, *_), (n_count, n) in blocks.items():
        for _, (k_count, k) in ks.items():
            times = n_count * k_count * tiles_m * WM
            for c in range(2):
                live = [(n + fn + c, k + fm) for fm, fn in fm_fn if fn + c < valid]
                tally.device("w", ((4 * (r * K // per_word + kk // per_word), 4) for r, kk in live), times)
                for b in ("scales", "biases"):
                    tally.device(b, (((r * groups + kk // gs) * size, size) for r, kk in live), times)


def _count_qmm_reduce(tally: Tally, shape, split: int, size: int) -> None:
    """qmm_reduce.metal.j2: a thread an output, summing its split_k partials (a SIMD-group: 32
    outputs of a row)."""
    M, N = shape.M, shape.N
    rows = _classes(range(M), lambda m: tuple((z * M + m) * N * 4 % SECTOR for z in range(split + 1)))
    blocks = _classes(range(0, N, 32), lambda n0: min(32, N - n0))   # n0 x 4 bytes: whole sectors
    for (count, m), (width, (n_count, n0)) in itertools.product(rows.values(), blocks.items()):
        lanes, times = range(n0, n0 + width), count * n_count
        tally.device("lengths", ((0, 4),), times)
        for z in range(split):
            tally.device("partial", ((((z * M + m) * N + n) * 4, 4) for n in lanes), times)
        tally.device("y", (((m * N + n) * size, size) for n in lanes), times)
    tally.footprint("lengths", 4)
    tally.footprint("partial", split * M * N * 4)
    tally.footprint("y", M * N * size)
