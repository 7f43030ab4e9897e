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
    template = "qmm.metal.j2"
    shape_type = QmvShape   # the same fields: M, N, K, bits, group_size
    params = (
        Param("BM", (16, 32, 64), 32, "output rows per threadgroup"),
        Param("BN", (16, 32, 64), 32, "output columns per threadgroup"),
        Param("BK", (16, 32, 64), 32, "K values staged per step"),
        Param("threads", (64, 128, 256), 128, "threads per threadgroup"),
    )

    def shape_problems(self, s) -> list[str]:
        return quantization_problems(s) + ([] if s.M >= 1 else [f"M={s.M} must be positive"])

    def threads_per_threadgroup(self, c) -> int:
        return c["threads"]

    def threadgroup_memory_bytes(self, c, s, dtype) -> int:
        return 4 * c["BK"] * (c["BM"] + c["BN"])

    def config_problems(self, c, s, dtype) -> list[str]:
        out = []
        if c["BM"] * c["BN"] < c["threads"]:
            out.append(f"a {c['BM']}x{c['BN']} tile has fewer outputs than threads={c['threads']}")
        if s.K % c["BK"]:
            out.append(f"K={s.K} is not a multiple of BK={c['BK']}")
        return out

    def launches(self, c, s, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        kernel = self._kernel(
            self.template, ("x", "w", "scales", "biases"), ("y",),
            M=s.M, N=s.N, K=s.K, bits=s.bits, group_size=s.group_size, T=d.metal,
            BM=c["BM"], BN=c["BN"], BK=c["BK"], THREADS=c["threads"],
        )
        grid = (c["threads"] * cdiv(s.N, c["BN"]), cdiv(s.M, c["BM"]), 1)
        return [Launch(kernel, grid, (c["threads"], 1, 1), ((s.M, s.N),), (d.mlx,))]
