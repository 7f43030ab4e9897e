"""qmm: quantized matrix-matrix product for prompts (M > 8), MLX's affine `mx.quantize` layout."""
from __future__ import annotations

from metalforge import devices
from metalforge.intmath import cdiv
from metalforge.kernels import cost, dtypes
from metalforge.kernels.family import Launch, Param
from metalforge.kernels.qmv import Qmv, QmvShape, quantization_problems


class Qmm(Qmv):
    """y = x @ dequant(w_q).T for prompts: BM x BN output tiles, x and w staged per K step.
    Shares qmv's inputs, reference, baseline and cost inputs; differs in tiling and shapes."""

    name = "qmm"
    bound = "compute"
    shape_type = QmvShape   # the same fields: M, N, K, bits, group_size
    params = (
        Param("BM", (16, 32, 64), 32, "output rows per threadgroup"),
        Param("BN", (16, 32, 64), 32, "output columns per threadgroup"),
        Param("BK", (16, 32, 64), 32, "K values staged per step"),
        Param("threads", (64, 128, 256), 128, "threads per threadgroup"),
    )

    def shape_problems(self, shape) -> list[str]:
        # the prompt kernel unpacks whole words: 4 and 8 bits (other widths run MLX's op)
        return quantization_problems(shape, bits=(4, 8)) + ([] if shape.M >= 1 else [f"M={shape.M} must be positive"])

    def threads_per_threadgroup(self, config) -> int:
        return config["threads"]

    def threadgroup_memory_bytes(self, config, shape, dtype) -> int:
        return 4 * config["BK"] * (config["BM"] + config["BN"])

    def config_problems(self, config, shape, dtype) -> list[str]:
        out = []
        if config["BM"] * config["BN"] < config["threads"]:
            out.append(f"a {config['BM']}x{config['BN']} tile has fewer outputs than threads={config['threads']}")
        if shape.K % config["BK"]:
            out.append(f"K={shape.K} is not a multiple of BK={config['BK']}")
        return out

    def launches(self, config, shape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        kernel = self._kernel(
            self.template, ("x", "w", "scales", "biases"), ("y",),
            M=shape.M, N=shape.N, K=shape.K, bits=shape.bits, group_size=shape.group_size, T=d.metal,
            BM=config["BM"], BN=config["BN"], BK=config["BK"], THREADS=config["threads"],
        )
        grid = (config["threads"] * cdiv(shape.N, config["BN"]), cdiv(shape.M, config["BM"]), 1)
        return [Launch(kernel, grid, (config["threads"], 1, 1), ((shape.M, shape.N),), (d.mlx,))]

    mlx_uses_simdgroup_matrices = True

    def mlx_config(self, shape) -> dict:
        # steel qmm: 32 x 32 tiles, BK 32, 128 threads
        return {"BM": 32, "BN": 32, "BK": 32, "threads": 128}

    def cost(self, config, shape, dtype, device) -> float:
        """Modelled seconds for one call (kernels/cost.py says how)."""
        dev = devices.get(device)
        dtype = dtypes.get(dtype)
        tiles_n, tiles_m = cdiv(shape.N, config["BN"]), cdiv(shape.M, config["BM"])
        occ = cost.occupancy(config["threads"], self.threadgroup_memory_bytes(config, shape, dtype), tiles_n * tiles_m)
        weights = shape.N * shape.K * shape.bits / 8 + 2 * shape.N * (shape.K / shape.group_size) * dtype.size
        # each row of tiles re-streams the weights and each column of tiles re-streams x (cache helps)
        moved = weights * (1 + 0.3 * (tiles_m - 1)) + shape.M * shape.K * dtype.size * (1 + 0.3 * (tiles_n - 1))
        outputs = tiles_m * config["BM"] * tiles_n * config["BN"]
        flops = 2 * outputs * shape.K + 4 * tiles_m * tiles_n * config["BN"] * shape.K
        # threadgroup-memory reads per FMA: small tiles per thread re-read more (1/BK amortises loads)
        per_thread = config["BM"] * config["BN"] / config["threads"]
        parallel = occ.parallel_fraction(dev, ilp=min(2.0, per_thread / 8)) * min(1.0, config["BK"] / 32) ** 0.25
        t = cost.roofline(moved, flops * 1.5, dev, parallel)
        return t + 2 * cdiv(shape.K, config["BK"]) * cost.BARRIER_S * occ.waves(dev) + cost.launch_seconds()
