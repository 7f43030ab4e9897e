"""decode_attention: one new query token per sequence against a KV cache (GQA, split-K).

The KV cache is either contiguous (B, Hkv, S, D) or the engine's block pool
(num_blocks, Hkv, block_size, D) read through a block table with per-sequence lengths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metalforge.kernels import dtypes
from metalforge.intmath import cdiv
from metalforge.kernels.family import Family, Launch, Param

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
    template = "decode_attention.metal.j2"
    bucketed = ("S",)
    shape_type = DecodeShape
    params = (
        Param("threads", (32, 64, 128, 256, 512, 1024), 256, "threads per threadgroup (32 per SIMD-group)"),
        Param("keys_per_step", (1, 2, 4, 8), 2, "keys each SIMD-group takes per step"),
        Param("splits", (1, 2, 4, 8, 16, 32), 1, "split-K partitions of the sequence (>1 adds a reduce kernel)"),
        Param("share_kv", (False, True), True, "one threadgroup serves all query heads of a KV head"),
    )

    def representative(self, shape):
        """The pool's size (num_blocks) does not change the kernel: a bucket serves any pool."""
        return self.shape({**super().representative(shape).__dict__, "num_blocks": 0})

    def shape_distance(self, a, b) -> float | None:
        if (a.D, a.Hq // a.Hkv, bool(a.block_size)) != (b.D, b.Hq // b.Hkv, bool(b.block_size)):
            return None
        return abs(math.log2(a.S / b.S)) + abs(math.log2(a.B / b.B)) + 0.1 * abs(math.log2(a.Hkv / b.Hkv))

    def shape_problems(self, s: DecodeShape) -> list[str]:
        out = []
        if s.D not in HEAD_DIMS:
            out.append(f"D={s.D} is not supported (valid: {', '.join(map(str, HEAD_DIMS))})")
        if min(s.B, s.Hq, s.Hkv, s.S) < 1:
            out.append("B, Hq, Hkv and S must be positive")
        elif s.Hq % s.Hkv:
            out.append(f"Hq={s.Hq} is not a multiple of Hkv={s.Hkv}")
        if s.block_size < 0 or (s.block_size and s.num_blocks and s.num_blocks < s.max_blocks):
            out.append("the block pool is too small for one sequence of S tokens")
        return out

    def buffer_elements(self, s: DecodeShape) -> dict[str, int]:
        cache = s.pool_blocks * s.Hkv * s.block_size * s.D if s.block_size else s.B * s.Hkv * s.S * s.D
        return {"queries": s.B * s.Hq * s.D, "keys": cache, "values": cache}

    def heads_per_group(self, c, s: DecodeShape) -> int:
        return s.Hq // s.Hkv if c["share_kv"] else 1

    def threads_per_threadgroup(self, c) -> int:
        return c["threads"]

    def threadgroup_memory_bytes(self, c, s: DecodeShape, dtype) -> int:
        rows = (c["threads"] // 32) * self.heads_per_group(c, s)
        return 4 * rows * (2 + s.D)   # max, sum and the D-wide output of each (SIMD-group, head)

    def config_problems(self, c, s: DecodeShape, dtype) -> list[str]:
        if c["splits"] > s.S:
            return [f"splits={c['splits']} exceeds the sequence length S={s.S}"]
        return []

    def launches(self, c, s: DecodeShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        sg = c["threads"] // 32
        heads = self.heads_per_group(c, s)
        splits = c["splits"]
        inputs = ["queries", "keys", "values", "scale"]
        if s.block_size:
            inputs += ["block_table", "seq_lens"]
        outputs = ["out"] if splits == 1 else ["partial_out", "partial_max", "partial_sum"]
        main = self._kernel(
            self.template, inputs, outputs,
            B=s.B, Hq=s.Hq, Hkv=s.Hkv, S=s.S, D=s.D, block_size=s.block_size, max_blocks=s.max_blocks,
            T=d.metal, SG=sg, KPS=c["keys_per_step"], SPLITS=splits, HEADS=heads, share_kv=c["share_kv"],
        )
        rows = s.B * (s.Hkv if c["share_kv"] else s.Hq)
        grid, tg = (32 * sg * splits, rows, 1), (32 * sg, 1, 1)
        if splits == 1:
            return [Launch(main, grid, tg, ((s.B, s.Hq, 1, s.D),), (d.mlx,))]
        partial = Launch(main, grid, tg,
                         ((s.B * s.Hq, splits, s.D), (s.B * s.Hq, splits), (s.B * s.Hq, splits)),
                         (mx.float32, mx.float32, mx.float32))
        reduce = self._kernel("decode_attention_reduce.metal.j2", outputs, ["out"],
                              rows=s.B * s.Hq, D=s.D, SPLITS=splits, T=d.metal)
        return [partial, Launch(reduce, (32, s.B * s.Hq, 1), (32, 1, 1), ((s.B, s.Hq, 1, s.D),), (d.mlx,))]

    def make_inputs(self, s: DecodeShape, dtype, seed=0):
        d = dtypes.get(dtype)
        kq, kk, kv, kp, kl = mx.random.split(mx.random.key(seed), 5)
        q = mx.random.normal((s.B, s.Hq, 1, s.D), key=kq).astype(d.mlx)
        scale = mx.array(1.0 / math.sqrt(s.D), dtype=mx.float32)
        if not s.block_size:
            k = mx.random.normal((s.B, s.Hkv, s.S, s.D), key=kk).astype(d.mlx)
            v = mx.random.normal((s.B, s.Hkv, s.S, s.D), key=kv).astype(d.mlx)
            return {"queries": q, "keys": k, "values": v, "scale": scale}
        # A shuffled pool: sequence b's blocks are scattered, as after many adds and removals.
        shape = (s.pool_blocks, s.Hkv, s.block_size, s.D)
        k = mx.random.normal(shape, key=kk).astype(d.mlx)
        v = mx.random.normal(shape, key=kv).astype(d.mlx)
        order = mx.random.permutation(s.pool_blocks, key=kp)[: s.B * s.max_blocks]
        table = order.reshape(s.B, s.max_blocks).astype(mx.int32)
        lens = mx.random.randint(1, s.S + 1, (s.B,), key=kl).astype(mx.int32)
        lens = mx.concatenate([mx.array([s.S], dtype=mx.int32), lens[1:]])  # one full-length sequence
        return {"queries": q, "keys": k, "values": v, "scale": scale, "block_table": table, "seq_lens": lens}

    def gather_kv(self, s: DecodeShape, inp, b: int):
        """Sequence b's K and V as contiguous (Hkv, len, D) arrays."""
        if not s.block_size:
            return inp["keys"][b], inp["values"][b], s.S
        n = int(inp["seq_lens"][b].item())
        blocks = inp["block_table"][b, : cdiv(n, s.block_size)]
        def gather(pool):
            x = pool[blocks].transpose(1, 0, 2, 3).reshape(s.Hkv, -1, s.D)
            return x[:, :n]
        return gather(inp["keys"]), gather(inp["values"]), n

    def reference(self, s: DecodeShape, dtype, inp):
        """Plain fp32 softmax attention per sequence, with K/V heads repeated for GQA."""
        outs = []
        g = s.Hq // s.Hkv
        scale = inp["scale"].item()
        for b in range(s.B):
            k, v, _ = self.gather_kv(s, inp, b)
            k = mx.repeat(k.astype(mx.float32), g, axis=0)
            v = mx.repeat(v.astype(mx.float32), g, axis=0)
            q = inp["queries"][b].astype(mx.float32)            # (Hq, 1, D)
            w = mx.softmax((q @ k.transpose(0, 2, 1)) * scale, axis=-1)
            outs.append(w @ v)
        return mx.stack(outs).astype(dtypes.get(dtype).mlx)

    def baseline(self, s: DecodeShape, dtype, inp):
        if s.block_size:
            return self.reference(s, dtype, inp)
        return mx.fast.scaled_dot_product_attention(inp["queries"], inp["keys"], inp["values"],
                                                    scale=inp["scale"].item())

    def bytes_moved(self, s: DecodeShape, dtype) -> int:
        d = dtypes.get(dtype)
        return (2 * s.B * s.Hkv * s.S * s.D + 2 * s.B * s.Hq * s.D) * d.size

    def flops(self, s: DecodeShape) -> int:
        return 4 * s.B * s.Hq * s.S * s.D
