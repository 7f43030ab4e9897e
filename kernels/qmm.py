"""qmm: quantized matrix-matrix product for prompts (M > 8), MLX's affine `mx.quantize` layout."""
from __future__ import annotations

from metalforge.kernels import dtypes
from metalforge.intmath import cdiv
from metalforge.kernels.family import Launch, Param
from metalforge.kernels.qmv import Qmv, QmvShape, quantization_problems


class Qmm(Qmv):
    """y = x @ dequant(w_q).T for prompts: BM x BN output tiles, x and w staged per K step.
    Shares qmv's inputs, reference, baseline and cost inputs; differs in tiling and shapes."""

    name = "qmm"
    shape_type = QmvShape   # the same fields: M, N, K, bits, group_size
    params = (
        Param("BM", (16, 32, 64), 32, "output rows per threadgroup"),
        Param("BN", (16, 32, 64), 32, "output columns per threadgroup"),
        Param("BK", (16, 32, 64), 32, "K values staged per step"),
        Param("threads", (64, 128, 256), 128, "threads per threadgroup"),
    )

    def shape_problems(self, shape) -> list[str]:
        return quantization_problems(shape) + ([] if shape.M >= 1 else [f"M={shape.M} must be positive"])

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
