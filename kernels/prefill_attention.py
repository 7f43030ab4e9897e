"""prefill_attention: tiled causal attention over a prompt (Q/K/V tiles in threadgroup memory).

This is the family where the 32 KB threadgroup limit bites: D=128, BQ=BK=32 with fp32 staging
needs (32 + 2*32) * 128 * 4 = 49,152 bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metalforge.kernels import dtypes
from metalforge.kernels.decode_attention import HEAD_DIMS
from metalforge.intmath import cdiv
from metalforge.kernels.family import Family, Launch, Param

STAGE_SIZES = {"float": 4, "half": 2}


@dataclass(frozen=True)
class PrefillShape:
    B: int
    Hq: int
    Hkv: int
    L: int        # new query tokens
    D: int
    prefix: int = 0  # cached tokens before them (keys = prefix + L)

    @property
    def LK(self) -> int:
        return self.prefix + self.L


class PrefillAttention(Family):
    """Causal flash-style attention over L prompt tokens (optionally after a cached prefix)."""

    name = "prefill_attention"
    template = "prefill_attention.metal.j2"
    bucketed = ("L", "prefix")
    shape_type = PrefillShape
    params = (
        Param("BQ", (8, 16, 32, 64), 16, "query rows per threadgroup"),
        Param("BK", (8, 16, 32, 64), 32, "keys per staged tile"),
        Param("simdgroups", (1, 2, 4, 8), 4, "SIMD-groups per threadgroup"),
        Param("stage", ("float", "half"), "half", "element type of the staged tiles"),
    )

    def shape_distance(self, a, b) -> float | None:
        if (a.D, a.Hq // a.Hkv) != (b.D, b.Hq // b.Hkv):
            return None
        return abs(math.log2(a.L / b.L)) + 0.1 * abs(math.log2(a.Hkv / b.Hkv))

    def shape_problems(self, s: PrefillShape) -> list[str]:
        out = []
        if s.D not in HEAD_DIMS:
            out.append(f"D={s.D} is not supported (valid: {', '.join(map(str, HEAD_DIMS))})")
        if min(s.B, s.Hq, s.Hkv, s.L) < 1 or s.prefix < 0:
            out.append("B, Hq, Hkv and L must be positive and prefix non-negative")
        elif s.Hq % s.Hkv:
            out.append(f"Hq={s.Hq} is not a multiple of Hkv={s.Hkv}")
        return out

    def buffer_elements(self, s: PrefillShape) -> dict[str, int]:
        return {"queries": s.B * s.Hq * s.L * s.D, "keys": s.B * s.Hkv * s.LK * s.D, "values": s.B * s.Hkv * s.LK * s.D}

    def threads_per_threadgroup(self, c) -> int:
        return 32 * c["simdgroups"]

    def threadgroup_memory_bytes(self, c, s: PrefillShape, dtype) -> int:
        return (c["BQ"] + 2 * c["BK"]) * s.D * STAGE_SIZES[c["stage"]]

    def config_problems(self, c, s: PrefillShape, dtype) -> list[str]:
        out = []
        if c["BQ"] % c["simdgroups"]:
            out.append(f"BQ={c['BQ']} is not a multiple of simdgroups={c['simdgroups']}")
        if c["stage"] == "half" and dtypes.get(dtype).name == "float32":
            out.append("half staging would lose float32 precision")
        return out

    def tolerance(self, c, dtype):
        d = dtypes.get(dtype)
        if c["stage"] == "half":
            return max(d.atol, 2e-2), max(d.rtol, 2e-2)
        return d.atol, d.rtol

    def launches(self, c, s: PrefillShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        sg = c["simdgroups"]
        kernel = self._kernel(
            self.template, ("queries", "keys", "values", "scale"), ("out",),
            B=s.B, Hq=s.Hq, Hkv=s.Hkv, LQ=s.L, LK=s.LK, D=s.D, T=d.metal,
            BQ=c["BQ"], BK=c["BK"], SG=sg, ST=c["stage"],
        )
        grid = (32 * sg * cdiv(s.L, c["BQ"]), s.B * s.Hq, 1)
        return [Launch(kernel, grid, (32 * sg, 1, 1), ((s.B, s.Hq, s.L, s.D),), (d.mlx,))]

    def make_inputs(self, s: PrefillShape, dtype, seed=0):
        d = dtypes.get(dtype)
        kq, kk, kv = mx.random.split(mx.random.key(seed), 3)
        return {
            "queries": mx.random.normal((s.B, s.Hq, s.L, s.D), key=kq).astype(d.mlx),
            "keys": mx.random.normal((s.B, s.Hkv, s.LK, s.D), key=kk).astype(d.mlx),
            "values": mx.random.normal((s.B, s.Hkv, s.LK, s.D), key=kv).astype(d.mlx),
            "scale": mx.array(1.0 / math.sqrt(s.D), dtype=mx.float32),
        }

    def reference(self, s: PrefillShape, dtype, inp):
        g = s.Hq // s.Hkv
        q = inp["queries"].astype(mx.float32)
        k = mx.repeat(inp["keys"].astype(mx.float32), g, axis=1)
        v = mx.repeat(inp["values"].astype(mx.float32), g, axis=1)
        scores = (q @ k.transpose(0, 1, 3, 2)) * inp["scale"].item()
        qpos = mx.arange(s.L)[:, None] + s.prefix
        kpos = mx.arange(s.LK)[None, :]
        scores = mx.where(kpos <= qpos, scores, -mx.inf)
        return (mx.softmax(scores, axis=-1) @ v).astype(dtypes.get(dtype).mlx)

    def baseline(self, s: PrefillShape, dtype, inp):
        mask = mx.arange(s.LK)[None, :] <= (mx.arange(s.L)[:, None] + s.prefix)
        return mx.fast.scaled_dot_product_attention(inp["queries"], inp["keys"], inp["values"],
                                                    scale=inp["scale"].item(), mask=mask)

    def bytes_moved(self, s: PrefillShape, dtype) -> int:
        d = dtypes.get(dtype)
        return (2 * s.B * s.Hq * s.L * s.D + 2 * s.B * s.Hkv * s.LK * s.D) * d.size

    def flops(self, s: PrefillShape) -> int:
        # causal: about half of the L x LK score matrix, twice (QK^T and PV)
        visible = s.L * s.prefix + s.L * (s.L + 1) // 2
        return 4 * s.B * s.Hq * visible * s.D
