"""prefill_attention: tiled causal attention over a prompt (Q/K/V tiles in threadgroup memory).

This is the family where the 32 KB threadgroup limit bites: D=128, BQ=BK=32 with fp32 staging
needs (32 + 2*32) * 128 * 4 = 49,152 bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metalforge import devices
from metalforge.intmath import cdiv
from metalforge.kernels import cost, dtypes
from metalforge.kernels.decode_attention import HEAD_DIMS
from metalforge.kernels.family import Family, Launch, Param, cut_keeping_tail

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
    bound = "compute"
    bucketed = ("L", "prefix")
    shape_type = PrefillShape
    params = (
        Param("BQ", (8, 16, 32, 64), 16, "query rows per threadgroup"),
        Param("BK", (8, 16, 32, 64), 32, "keys per staged tile"),
        Param("simdgroups", (1, 2, 4, 8), 4, "SIMD-groups per threadgroup"),
        Param("stage", ("float", "half"), "half", "element type of the staged tiles"),
    )

    def proxy_shape(self, shape):
        return self.shape({**shape.__dict__, "B": 1, "Hkv": 1, "Hq": shape.Hq // shape.Hkv,
                           "L": cut_keeping_tail(shape.L, 64, 64), "prefix": cut_keeping_tail(shape.prefix, 32, 32)})

    def shape_distance(self, a, b) -> float | None:
        if (a.D, a.Hq // a.Hkv) != (b.D, b.Hq // b.Hkv):
            return None
        return abs(math.log2(a.L / b.L)) + 0.1 * abs(math.log2(a.Hkv / b.Hkv))

    def shape_problems(self, shape: PrefillShape) -> list[str]:
        out = []
        if shape.D not in HEAD_DIMS:
            out.append(f"D={shape.D} is not supported (valid: {', '.join(map(str, HEAD_DIMS))})")
        if min(shape.B, shape.Hq, shape.Hkv, shape.L) < 1 or shape.prefix < 0:
            out.append("B, Hq, Hkv and L must be positive and prefix non-negative")
        elif shape.Hq % shape.Hkv:
            out.append(f"Hq={shape.Hq} is not a multiple of Hkv={shape.Hkv}")
        return out

    def buffer_elements(self, shape: PrefillShape) -> dict[str, int]:
        cache = shape.B * shape.Hkv * shape.LK * shape.D
        return {"queries": shape.B * shape.Hq * shape.L * shape.D, "keys": cache, "values": cache}

    def threads_per_threadgroup(self, config) -> int:
        return 32 * config["simdgroups"]

    def threadgroup_memory_bytes(self, config, shape: PrefillShape, dtype) -> int:
        return (config["BQ"] + 2 * config["BK"]) * shape.D * STAGE_SIZES[config["stage"]]

    def config_problems(self, config, shape: PrefillShape, dtype) -> list[str]:
        out = []
        if config["BQ"] % config["simdgroups"]:
            out.append(f"BQ={config['BQ']} is not a multiple of simdgroups={config['simdgroups']}")
        if config["stage"] == "half" and dtypes.get(dtype).name == "float32":
            out.append("half staging would lose float32 precision")
        return out

    def tolerance(self, config, dtype):
        d = dtypes.get(dtype)
        if config["stage"] == "half":
            return max(d.atol, 2e-2), max(d.rtol, 2e-2)
        return d.atol, d.rtol

    def launches(self, config, shape: PrefillShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        sg = config["simdgroups"]
        kernel = self._kernel(
            self.template, ("queries", "keys", "values", "scale"), ("out",),
            B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv, LQ=shape.L, LK=shape.LK, D=shape.D, T=d.metal,
            BQ=config["BQ"], BK=config["BK"], SG=sg, ST=config["stage"],
        )
        grid = (32 * sg * cdiv(shape.L, config["BQ"]), shape.B * shape.Hq, 1)
        return [Launch(kernel, grid, (32 * sg, 1, 1), ((shape.B, shape.Hq, shape.L, shape.D),), (d.mlx,))]

    def make_inputs(self, shape: PrefillShape, dtype, seed=0):
        d = dtypes.get(dtype)
        kq, kk, kv = mx.random.split(mx.random.key(seed), 3)
        return {
            "queries": mx.random.normal((shape.B, shape.Hq, shape.L, shape.D), key=kq).astype(d.mlx),
            "keys": mx.random.normal((shape.B, shape.Hkv, shape.LK, shape.D), key=kk).astype(d.mlx),
            "values": mx.random.normal((shape.B, shape.Hkv, shape.LK, shape.D), key=kv).astype(d.mlx),
            "scale": mx.array(1.0 / math.sqrt(shape.D), dtype=mx.float32),
        }

    def reference(self, shape: PrefillShape, dtype, inp):
        g = shape.Hq // shape.Hkv
        q = inp["queries"].astype(mx.float32)
        k = mx.repeat(inp["keys"].astype(mx.float32), g, axis=1)
        v = mx.repeat(inp["values"].astype(mx.float32), g, axis=1)
        scores = (q @ k.transpose(0, 1, 3, 2)) * inp["scale"].item()
        qpos = mx.arange(shape.L)[:, None] + shape.prefix
        kpos = mx.arange(shape.LK)[None, :]
        scores = mx.where(kpos <= qpos, scores, -mx.inf)
        return (mx.softmax(scores, axis=-1) @ v).astype(dtypes.get(dtype).mlx)

    def baseline(self, shape: PrefillShape, dtype, inp):
        mask = mx.arange(shape.LK)[None, :] <= (mx.arange(shape.L)[:, None] + shape.prefix)
        return mx.fast.scaled_dot_product_attention(inp["queries"], inp["keys"], inp["values"],
                                                    scale=inp["scale"].item(), mask=mask)

    mlx_uses_simdgroup_matrices = True

    def mlx_config(self, shape) -> dict:
        # steel attention: 32 x 16 tiles, 4 SIMD-groups, half staging
        return {"BQ": 32, "BK": 16, "simdgroups": 4, "stage": "half"}

    def cost(self, config, shape, dtype, device) -> float:
        """Modelled seconds for one call (kernels/cost.py says how)."""
        dev = devices.get(device)
        dtype = dtypes.get(dtype)
        sg = config["simdgroups"]
        qtiles = cdiv(shape.L, config["BQ"])
        tgs = shape.B * shape.Hq * qtiles
        occ = cost.occupancy(32 * sg, self.threadgroup_memory_bytes(config, shape, dtype), tgs)
        stage = 2 if config["stage"] == "half" else 4
        q_bytes = shape.B * shape.Hq * shape.L * shape.D * dtype.size
        # every query tile streams the keys it can see (causal: about half on average)
        visible = shape.prefix + (shape.L + config["BQ"]) / 2
        kv_bytes = 2 * shape.B * shape.Hq * qtiles * visible * shape.D * dtype.size * 0.5  # half served by the cache
        out_bytes = q_bytes
        pairs = shape.B * shape.Hq * (shape.L * shape.prefix + shape.L * (shape.L + 1) / 2)
        # one simd_sum (5 shuffles) per (row, key) pair plus D/32 FMAs per lane; fp32 staging reads
        # twice the threadgroup-memory bytes of half staging
        lane_ops = pairs * 32 * (2 * shape.D / 32 * (1 + 0.25 * (stage == 4)) + 10)
        parallel = occ.parallel_fraction(dev, ilp=min(2.0, config["BQ"] / sg / 2))
        t = cost.roofline(q_bytes + kv_bytes + out_bytes, lane_ops, dev, parallel)
        ktiles = cdiv(int(visible), config["BK"])
        t += 2 * ktiles * cost.BARRIER_S * occ.waves(dev)
        return t + cost.launch_seconds()
