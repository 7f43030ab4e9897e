"""decode_attention: one new query token per sequence against a KV cache (GQA, split-K).

The KV cache is either contiguous (B, Hkv, S, D) or the engine's block pool
(Hkv, num_blocks, block_size, D) read through a block table with per-sequence lengths (head-major,
so that MLX's attention can read a sequence stored in consecutive blocks in place).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metalforge import devices
from metalforge.intmath import cdiv
from metalforge.kernels import cost, dtypes
from metalforge.kernels.dtypes import vector_of
from metalforge.kernels.family import Family, Geometry, Launch, Param, cut_keeping_tail

HEAD_DIMS = (64, 80, 96, 128, 256)


@dataclass(frozen=True)
class DecodeShape:
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    block_size: int = 0   # 0: contiguous cache; else the pool's block size
    num_blocks: int = 0   # pool size (paged layout only; 0 = exactly enough for B sequences of S)

    @property
    def max_blocks(self) -> int:
        return cdiv(self.S, self.block_size) if self.block_size else 0

    @property
    def pool_blocks(self) -> int:
        return self.num_blocks or self.B * self.max_blocks


class DecodeAttention(Family):
    """softmax(q K^T * scale) V for one query token per sequence, GQA, split-K, paged KV."""

    name = "decode_attention"
    bucketed = ("S",)
    shape_type = DecodeShape
    params = (
        Param("threads", (32, 64, 128, 256, 512, 1024), 256, "threads per threadgroup (32 per SIMD-group)"),
        Param("keys_per_step", (1, 2, 4, 8), 2, "keys each SIMD-group takes per step"),
        Param("splits", (1, 2, 4, 8, 16, 32, 64), 1, "split-K partitions of the sequence (>1 adds a reduce kernel)"),
        Param("share_kv", (False, True), True, "one threadgroup serves all query heads of a KV head"),
        Param("load_width", (1, 2, 4), 1, "consecutive K/V elements each lane loads at once"),
        Param("prefetch", (False, True), False, "load the next step's keys before this step's scores"),
    )

    def representative(self, shape):
        """The pool's size (num_blocks) does not change the kernel: a bucket serves any pool."""
        return super().representative({**self.shape(shape).__dict__, "num_blocks": 0})

    def proxy_shape(self, shape):
        group, kv_heads = shape.Hq // shape.Hkv, min(shape.Hkv, 2)
        return self.shape({**shape.__dict__, "B": min(shape.B, 2), "Hkv": kv_heads, "Hq": kv_heads * group,
                           "S": cut_keeping_tail(shape.S, 256, 256), "num_blocks": 0})

    def shape_distance(self, a, b) -> float | None:
        if (a.D, a.Hq // a.Hkv, bool(a.block_size)) != (b.D, b.Hq // b.Hkv, bool(b.block_size)):
            return None
        return abs(math.log2(a.S / b.S)) + abs(math.log2(a.B / b.B)) + 0.1 * abs(math.log2(a.Hkv / b.Hkv))

    def shape_problems(self, shape: DecodeShape) -> list[str]:
        out = []
        if shape.D not in HEAD_DIMS:
            out.append(f"D={shape.D} is not supported (valid: {', '.join(map(str, HEAD_DIMS))})")
        if min(shape.B, shape.Hq, shape.Hkv, shape.S) < 1:
            out.append("B, Hq, Hkv and S must be positive")
        elif shape.Hq % shape.Hkv:
            out.append(f"Hq={shape.Hq} is not a multiple of Hkv={shape.Hkv}")
        if shape.block_size < 0 or (shape.block_size and shape.num_blocks and shape.num_blocks < shape.max_blocks):
            out.append("the block pool is too small for one sequence of S tokens")
        return out

    def buffer_elements(self, shape: DecodeShape) -> dict[str, int]:
        rows = shape.pool_blocks * shape.block_size if shape.block_size else shape.B * shape.S
        cache = rows * shape.Hkv * shape.D
        return {"queries": shape.B * shape.Hq * shape.D, "keys": cache, "values": cache}

    def heads_per_group(self, config, shape: DecodeShape) -> int:
        return shape.Hq // shape.Hkv if config["share_kv"] else 1

    def geometry(self, config, shape: DecodeShape, dtype) -> tuple[Geometry, ...]:
        """The attention pass; with splits, the reduce pass (a SIMD-group per query head) after it."""
        threads = config["threads"]
        rows = shape.B * (shape.Hkv if config["share_kv"] else shape.Hq)
        # max, sum and the D-wide output of each (SIMD-group, head)
        merge = 4 * (threads // 32) * self.heads_per_group(config, shape) * (2 + shape.D)
        main = Geometry((threads * config["splits"], rows, 1), (threads, 1, 1), merge)
        if config["splits"] == 1:
            return (main,)
        return main, Geometry((32, shape.B * shape.Hq, 1), (32, 1, 1))

    def config_problems(self, config, shape: DecodeShape, dtype) -> list[str]:
        if config["splits"] > shape.S:
            return [f"splits={config['splits']} exceeds the sequence length S={shape.S}"]
        return []

    def launches(self, config, shape: DecodeShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        sg = config["threads"] // 32
        heads = self.heads_per_group(config, shape)
        splits = config["splits"]
        inputs = ["queries", "keys", "values", "scale"]
        if shape.block_size:
            inputs += ["block_table", "seq_lens"]
        outputs = ["out"] if splits == 1 else ["partial_out", "partial_max", "partial_sum"]
        main = self._kernel(
            self.template, inputs, outputs,
            B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv, S=shape.S, D=shape.D, block_size=shape.block_size,
            max_blocks=shape.max_blocks, pool_blocks=shape.pool_blocks,
            T=d.metal, SG=sg, KPS=config["keys_per_step"], SPLITS=splits, HEADS=heads, share_kv=config["share_kv"],
            W=config["load_width"], prefetch=config["prefetch"], TV=d.vector, vector=vector_of,
        )
        geometry = self.geometry(config, shape, dtype)
        if splits == 1:
            return [Launch(main, geometry[0].grid, geometry[0].threadgroup, ((shape.B, shape.Hq, 1, shape.D),), (d.mlx,))]
        rows_out = shape.B * shape.Hq   # one partial result per query head and split
        partial = Launch(main, geometry[0].grid, geometry[0].threadgroup,
                         ((rows_out, splits, shape.D), (rows_out, splits), (rows_out, splits)),
                         (mx.float32, mx.float32, mx.float32))
        reduce = self._kernel("decode_attention_reduce.metal.j2", outputs, ["out"],
                              rows=rows_out, D=shape.D, SPLITS=splits, T=d.metal)
        return [partial, Launch(reduce, geometry[1].grid, geometry[1].threadgroup, ((shape.B, shape.Hq, 1, shape.D),),
                                (d.mlx,))]

    def make_inputs(self, shape: DecodeShape, dtype, seed=0):
        d = dtypes.get(dtype)
        kq, kk, kv, kp, kl = mx.random.split(mx.random.key(seed), 5)
        q = mx.random.normal((shape.B, shape.Hq, 1, shape.D), key=kq).astype(d.mlx)
        scale = mx.array(1.0 / math.sqrt(shape.D), dtype=mx.float32)
        if not shape.block_size:
            k = mx.random.normal((shape.B, shape.Hkv, shape.S, shape.D), key=kk).astype(d.mlx)
            v = mx.random.normal((shape.B, shape.Hkv, shape.S, shape.D), key=kv).astype(d.mlx)
            return {"queries": q, "keys": k, "values": v, "scale": scale}
        # A shuffled pool: sequence b's blocks are scattered, as after many adds and removals.
        pool = (shape.Hkv, shape.pool_blocks, shape.block_size, shape.D)
        k = mx.random.normal(pool, key=kk).astype(d.mlx)
        v = mx.random.normal(pool, key=kv).astype(d.mlx)
        order = mx.random.permutation(shape.pool_blocks, key=kp)[: shape.B * shape.max_blocks]
        table = order.reshape(shape.B, shape.max_blocks).astype(mx.int32)
        lens = mx.random.randint(1, shape.S + 1, (shape.B,), key=kl).astype(mx.int32)
        lens = mx.concatenate([mx.array([shape.S], dtype=mx.int32), lens[1:]])  # one full-length sequence
        return {"queries": q, "keys": k, "values": v, "scale": scale, "block_table": table, "seq_lens": lens}

    def gather_kv(self, shape: DecodeShape, inp, b: int):
        """Sequence b's K and V as contiguous (Hkv, len, D) arrays."""
        if not shape.block_size:
            return inp["keys"][b], inp["values"][b], shape.S
        n = int(inp["seq_lens"][b].item())
        blocks = inp["block_table"][b, : cdiv(n, shape.block_size)]
        def gather(pool):
            x = pool[:, blocks].reshape(shape.Hkv, -1, shape.D)
            return x[:, :n]
        return gather(inp["keys"]), gather(inp["values"]), n

    def reference(self, shape: DecodeShape, dtype, inp):
        """Plain fp32 softmax attention per sequence, with K/V heads repeated for GQA."""
        outs = []
        g = shape.Hq // shape.Hkv
        scale = inp["scale"].item()
        for b in range(shape.B):
            k, v, _ = self.gather_kv(shape, inp, b)
            k = mx.repeat(k.astype(mx.float32), g, axis=0)
            v = mx.repeat(v.astype(mx.float32), g, axis=0)
            q = inp["queries"][b].astype(mx.float32)            # (Hq, 1, D)
            w = mx.softmax((q @ k.transpose(0, 2, 1)) * scale, axis=-1)
            outs.append(w @ v)
        return mx.stack(outs).astype(dtypes.get(dtype).mlx)

    def baseline_inputs(self, shape: DecodeShape, dtype, inp) -> dict:
        """MLX's decode reads a contiguous cache, as mlx-lm keeps it: a paged pool becomes each
        sequence's own (1, Hkv, len, D) K and V, gathered before any timing."""
        if not shape.block_size:
            return inp
        caches = [self.gather_kv(shape, inp, b)[:2] for b in range(shape.B)]
        mx.eval(caches)
        return {**inp, "caches": caches}

    def baseline(self, shape: DecodeShape, dtype, inp):
        """mx.fast.scaled_dot_product_attention over the contiguous cache (baseline_inputs): one
        call, or one per sequence of a paged batch (each over its own cache, no mask)."""
        scale = inp["scale"].item()
        if "caches" not in inp:
            return mx.fast.scaled_dot_product_attention(inp["queries"], inp["keys"], inp["values"], scale=scale)
        return mx.concatenate([mx.fast.scaled_dot_product_attention(inp["queries"][b:b + 1], k[None], v[None], scale=scale)
                               for b, (k, v) in enumerate(inp["caches"])])

    def cost(self, config, shape, dtype, device) -> float:
        """Modelled seconds for one call (kernels/cost.py says how)."""
        dev = devices.get(device)
        dtype = dtypes.get(dtype)
        sg = config["threads"] // 32
        g = shape.Hq // shape.Hkv
        heads = g if config["share_kv"] else 1
        main = self.geometry(config, shape, dtype)[0]
        # registers a lane holds: q and the accumulator per head, KPS key rows (twice when prefetching)
        elements = cdiv(shape.D, 32 * config["load_width"]) * config["load_width"]
        registers = elements * (2 * heads + config["keys_per_step"] * (2 if config["prefetch"] else 1))
        occ = cost.occupancy(main.threads, main.threadgroup_memory_bytes, main.threadgroups, registers=registers)
        kv = 2 * shape.B * shape.Hkv * shape.S * shape.D * dtype.size
        # without sharing, the G query heads of a KV head each stream it (partly from cache)
        kv_reads = kv * (1 if config["share_kv"] else 1 + (g - 1) * 0.35)
        partials = 2 * shape.B * shape.Hq * config["splits"] * (shape.D + 2) * 4 if config["splits"] > 1 else 0
        # SIMD-groups left without keys (short slices) keep nothing in flight but still merge
        keys_per_tg = cdiv(shape.S, config["splits"])
        busy = min(1.0, keys_per_tg / (sg * config["keys_per_step"]))
        # loads in flight: KPS rows per step, and the next step's keys too when prefetching
        ilp = config["keys_per_step"] / 2 * (2 if config["prefetch"] else 1)
        parallel = occ.parallel_fraction(dev, ilp=ilp * busy) * cost.load_efficiency(config["load_width"] * dtype.size)
        flops = 4 * shape.B * shape.Hq * shape.S * shape.D + 6 * shape.B * shape.Hq * shape.S  # dot products, softmax
        t = cost.roofline(kv_reads + partials, flops, dev, parallel)
        steps = cdiv(keys_per_tg, sg * config["keys_per_step"])
        t += steps * heads * config["keys_per_step"] * cost.SIMD_REDUCE_S * occ.waves(dev)
        merge_on_one_core = cost.memory_seconds(sg * heads * shape.D * 4 * dev.gpu_cores, dev)
        t += (cost.BARRIER_S + merge_on_one_core * 0.05) * occ.waves(dev)
        return t + cost.launch_seconds() * (2 if config["splits"] > 1 else 1)
