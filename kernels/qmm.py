"""qmm: quantized matrix-matrix product for prompts (M > 8), MLX's affine `mx.quantize` layout."""
from __future__ import annotations

import mlx.core as mx

from metalforge import devices
from metalforge.intmath import cdiv
from metalforge.kernels import cost, dtypes
from metalforge.kernels.dtypes import vector_of
from metalforge.kernels.family import (TILE_PAD_BYTES, Geometry, Launch, Param, fragment_bank_ways, fragment_problems,
                                       stage_dtype, stage_problems)
from metalforge.kernels.quantized import QuantizedMatmul, quantization_problems


QMM_BITS = (2, 4, 8)   # whole words of values; 3-, 5- and 6-bit prompts run MLX's op


class Qmm(QuantizedMatmul):
    """y = x @ dequant(w_q).T for prompts, on SIMD-group matrices (qmv's layout, inputs, reference
    and baseline: kernels/quantized.py)."""

    name = "qmm"
    bound = "compute"
    tuned_with_models = False   # the prompt-side product: tuned on request (--families)
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

    def cost(self, config, shape, dtype, device) -> float:
        """Modelled seconds for one call (kernels/cost.py says how)."""
        dev = devices.get(device)
        dtype = dtypes.get(dtype)
        bm, bn, wm, split = config["BM"], config["BN"], config["WM"], config["split_k"]
        g = self.geometry(config, shape, dtype)[0]
        tiles_n, tiles_m = cdiv(shape.N, bn), cdiv(shape.M, bm)
        in_registers = config["dequant"] == "registers"
        occ = cost.occupancy(g.threads, g.threadgroup_memory_bytes, g.threadgroups, registers=g.registers)
        weights = shape.N * shape.K * shape.bits / 8 + 2 * shape.N * (shape.K / shape.group_size) * dtype.size
        # each row of tiles re-streams the weights (and in registers each SIMD-group row of a tile
        # reads its own copy), each column of tiles re-streams x; the cache serves most repeats
        weight_reads = tiles_m * (wm if in_registers else 1)
        moved = weights * (1 + 0.3 * (weight_reads - 1)) + shape.M * shape.K * dtype.size * (1 + 0.3 * (tiles_n - 1))
        mma = 2 * tiles_m * bm * tiles_n * bn * shape.K
        dequant = 3 * shape.N * shape.K * weight_reads
        # fragment loads from threadgroup memory per multiply-accumulate: x's serve TN columns,
        # weights' TM rows (none in registers: each lane dequantises its own); bank conflicts
        # serialise a load (the padded rows leave none at 2-byte staging)
        tm, tn = max(1, bm // wm // 8), max(1, bn // config["WN"] // 8)   # (priced for invalid configs too)
        row, size = self.tile_row_bytes(config, dtype), stage_dtype(config, dtype).size
        loads = fragment_bank_ways(row, size, False) / tn + \
            (0.0 if in_registers else fragment_bank_ways(row, size, True) / tm)
        flops = mma * (1 + cost.FRAGMENT_LOAD_COST * loads) + dequant
        # in registers each lane reads words of two rows: scattered 4-byte loads
        width = cost.load_efficiency(4) if in_registers else 1.0
        parallel = occ.parallel_fraction(dev, ilp=min(2.0, tm * tn / 2)) * width
        t = cost.roofline(moved, flops, dev, parallel)
        if split > 1:   # the fp32 partial tiles written and summed by a second launch
            partials = 2 * split * shape.M * shape.N * 4
            t += cost.roofline(partials, split * shape.M * shape.N, dev, occ.parallel_fraction(dev)) + cost.launch_seconds()
        steps = cdiv(shape.K, config["BK"] * split)   # each threadgroup's share of K
        return t + 2 * steps * cost.BARRIER_S * occ.waves(dev) + cost.launch_seconds()
