"""decode_attention: 1 to 8 new query tokens per sequence against a KV cache (GQA, split-K).

The KV cache is either contiguous (B, Hkv, S, D) or the engine's block pool
(Hkv, num_blocks, block_size, D) read through a block table with per-sequence lengths (head-major,
so that MLX's attention can read a sequence stored in consecutive blocks in place). Several query
tokens (what speculative decoding verifies) are causal among them: token i of L sits at position
len - L + i. Model variants are shape fields whose defaults are plain attention: a sliding window,
a logit soft-cap (gemma2), per-head attention sinks (gpt-oss) and K/V stored as 8- or 4-bit values
in MLX's mx.quantize layout (a scale and bias per group along D), dequantised in the kernel.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import mlx.core as mx

from metalforge.intmath import cdiv, pow2_bucket
from metalforge.kernels import dtypes
from metalforge.kernels.dtypes import vector_of
from metalforge.kernels.family import Family, Geometry, Launch, Param, allowed, cut_keeping_tail, mlx_choice
from metalforge.kernels.mlx_dispatch import SDPA_2PASS_KEYS, SDPA_VECTOR_THREADS, parse_version
from metalforge.kernels.timing.traces import cut
from metalforge.kernels.work import SECTOR, Tally

HEAD_DIMS = (64, 80, 96, 128, 256)
MAX_QUERY_TOKENS = 8   # MLX's sdpa_vector serves up to 8 query tokens too; more is a prompt
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)   # what mx.quantize accepts


@dataclass(frozen=True)
class DecodeShape:
    B: int
    Hq: int
    Hkv: int
    S: int
    D: int
    block_size: int = 0   # 0: contiguous cache; else the pool's block size
    num_blocks: int = 0   # pool size (paged layout only; 0 = exactly enough for B sequences of S)
    L: int = 1            # query tokens per sequence, causal among them (speculative decoding: 2-8)
    window: int = 0       # sliding window: a token sees its last `window` keys, itself included (0: all)
    sinks: int = 0        # 1: a learned sink logit per query head (input `sinks`, Hq values) joins the softmax
    softcap: int = 0      # 1: scores pass through tanh(s / cap) * cap, cap given at run time (input `softcap`)
    kv_bits: int = 0      # 0: K/V in the activation dtype; 4 or 8: mx.quantize's layout (keys, keys_scales, ...)
    kv_group_size: int = 64   # values per scale and bias along D (quantized K/V only)

    @property
    def max_blocks(self) -> int:
        return cdiv(self.S, self.block_size) if self.block_size else 0

    @property
    def pool_blocks(self) -> int:
        return self.num_blocks or self.B * self.max_blocks


def attention_call(values: dict, variant_fields: tuple) -> tuple[dict, dict] | None:
    """An attention call's (engine/ops.py: B sequences of `new` tokens, the longest holding
    `context` keys) batch and heads, and its variant (the model's window, soft-cap and sinks, the
    pool's kv_bits and kv_group_size) as shape fields; None where the family lacks a field the
    call sets (then MLX's op runs it)."""
    variant = {k: int(bool(values[k])) if k in ("softcap", "sinks") else values[k]
               for k in ("window", "softcap", "sinks", "kv_bits", "kv_group_size") if values.get(k)}
    if any(k not in variant_fields for k in variant):
        return None
    return dict(B=values["B"], Hq=values["Hq"], Hkv=values["Hkv"], D=values["D"]), variant


class DecodeAttention(Family):
    """softmax(q K^T * scale) V for 1-8 query tokens per sequence, GQA, split-K, paged KV."""

    name = "decode_attention"
    bucketed = ("S",)
    variant_fields = ("L", "window", "sinks", "softcap", "kv_bits", "kv_group_size")
    shape_type = DecodeShape
    params = (
        Param("threads", (32, 64, 128, 256, 512, 1024), 256, "threads per threadgroup (32 per SIMD-group)"),
        Param("keys_per_step", (1, 2, 4, 8), 2, "keys each lane group takes per step"),
        Param("keys_per_simdgroup", (1, 2, 4), 1, "lane groups of a SIMD-group, each on its own key (32 / it lanes a key)"),
        Param("splits", (1, 2, 4, 8, 16, 32, 64, 128, 256), 1, "split-K partitions of the sequence (>1 adds a reduce "
              "kernel; up to MLX's 2-pass block counts to 32k keys, so its tiling is in the space)"),
        Param("share_kv", (False, True), True, "one threadgroup serves all query heads of a KV head"),
        Param("load_width", (1, 2, 4), 1, "consecutive K/V elements each lane loads at once"),
        Param("prefetch", (False, True), False, "load the next step's keys before this step's scores"),
    )

    op = "attention"
    mlx_op = "decode"
    trace_groups = (("B",), ("Hq", "Hkv"), ("S",))

    def mlx_sizes(self, fields: dict) -> dict:
        """MLX reads a contiguous cache (as mlx-lm keeps it), never a paged pool."""
        return {k: v for k, v in fields.items() if k not in ("block_size", "num_blocks")}

    def mlx_op_shape(self, values: dict) -> dict | None:
        """mlx-lm's contiguous cache holds the context's keys, not the pool's power-of-two bucket."""
        fields = self.op_shape(values)
        return None if fields is None else dict(fields, S=values["context"])

    def trace_proxy(self, fields: dict, config) -> dict:
        """One sequence (a pool exactly its size), one KV head and its query heads, and S a whole
        number of splits x key groups (keys_per_step x keys_per_simdgroup; with prefetch, a step
        of every SIMD-group, whose first keys it loads before its loop) in whole periods of the
        rows' sector phases (the block table's 8 entries a sector, quantized rows): each split
        then reads whole groups from the same phase at all three points. With a window, S past
        it (a full window: the counts no longer grow)."""
        group = config["keys_per_step"] * config["keys_per_simdgroup"] * \
            (config["threads"] // 32 if config["prefetch"] else 1)
        period = math.lcm(8 * fields.get("block_size", 0) or 1, SECTOR if fields.get("kv_bits") else 1)
        out = cut(cut(fields, {"B": 1}), {"Hq": fields["Hq"] // fields["Hkv"], "Hkv": 1})
        window = fields.get("window", 0)
        least = {"S": fields.get("L", 1) + window} if window else {}
        return {**cut(out, {"S": config["splits"] * math.lcm(group, period)}, least), "num_blocks": 0}

    def op_shape(self, values: dict) -> dict | None:
        """A decode step's group on the engine's pool: B sequences of 1 to MAX_QUERY_TOKENS new
        tokens each (one decoding; k+1 verifying k drafts), over dense or quantized K/V. It reads
        the pool through a table as wide as the context's power-of-two bucket, so the engine's
        shape is the tuned bucket's (at most `width`, the block table's tokens)."""
        call = attention_call(values, self.variant_fields)
        new = values["new"]
        if call is None or not values.get("block_size") or not 1 <= new <= MAX_QUERY_TOKENS:
            return None
        heads, variant = call
        S = min(pow2_bucket(values["context"]), values.get("width") or pow2_bucket(values["context"]))
        tokens = {"L": new} if new > 1 else {}
        return dict(heads, S=S, block_size=values["block_size"], num_blocks=values.get("num_blocks", 0),
                    **tokens, **variant)

    def representative(self, shape):
        """The pool's size (num_blocks) does not change the kernel: a bucket serves any pool."""
        return super().representative({**self.shape(shape).__dict__, "num_blocks": 0})

    def proxy_shape(self, shape):
        group, kv_heads = shape.Hq // shape.Hkv, min(shape.Hkv, 2)
        return self.shape({**shape.__dict__, "B": min(shape.B, 2), "Hkv": kv_heads, "Hq": kv_heads * group,
                           "S": cut_keeping_tail(shape.S, 256, 256), "num_blocks": 0})

    def shape_distance(self, a, b) -> float | None:
        if self.structure(a) != self.structure(b):
            return None
        return abs(math.log2(a.S / b.S)) + abs(math.log2(a.B / b.B)) + 0.1 * abs(math.log2(a.Hkv / b.Hkv))

    @staticmethod
    def structure(shape: DecodeShape) -> tuple:
        """What a config is specialised to beyond sizes: a config of one says nothing of another."""
        return (shape.D, shape.Hq // shape.Hkv, bool(shape.block_size), shape.L, shape.window, shape.sinks,
                shape.softcap, shape.kv_bits, shape.kv_group_size if shape.kv_bits else 0)

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
        if not 1 <= shape.L <= MAX_QUERY_TOKENS:
            out.append(f"L={shape.L} is outside 1..{MAX_QUERY_TOKENS} (longer runs of query tokens are a prompt)")
        if shape.window < 0:
            out.append(f"window={shape.window} must be 0 (no window) or positive")
        for flag in ("sinks", "softcap"):
            if getattr(shape, flag) not in (0, 1):
                out.append(f"{flag}={getattr(shape, flag)} must be 0 or 1")
        if shape.kv_bits:
            if shape.kv_bits not in KV_BITS:
                out.append(f"kv_bits={shape.kv_bits} is not supported (valid: 0, {', '.join(map(str, KV_BITS))})")
            if shape.kv_group_size not in KV_GROUP_SIZES:
                out.append(f"kv_group_size={shape.kv_group_size} is not supported (valid: "
                           f"{', '.join(map(str, KV_GROUP_SIZES))})")
            elif shape.D % shape.kv_group_size:
                out.append(f"D={shape.D} is not a multiple of kv_group_size={shape.kv_group_size}")
        return out

    def buffer_elements(self, shape: DecodeShape) -> dict[str, int]:
        rows = shape.pool_blocks * shape.block_size if shape.block_size else shape.B * shape.S
        cache = rows * shape.Hkv * shape.D
        return {"queries": shape.B * shape.Hq * shape.L * shape.D, "keys": cache, "values": cache}

    def heads_per_group(self, config, shape: DecodeShape) -> int:
        return shape.Hq // shape.Hkv if config["share_kv"] else 1

    def geometry(self, config, shape: DecodeShape, dtype) -> tuple[Geometry, ...]:
        """The attention pass; with splits, the reduce pass (a SIMD-group per query head) after it."""
        threads = config["threads"]
        rows = shape.B * (shape.Hkv if config["share_kv"] else shape.Hq)
        # max, sum and the D-wide output of each (SIMD-group, head)
        query_rows = self.heads_per_group(config, shape) * shape.L
        merge = 4 * (threads // 32) * query_rows * (2 + shape.D)
        # q and the accumulator per query row, KPS key rows (twice when prefetching), KPS scores a row
        kps = config["keys_per_step"]
        registers = self.lane_elements(config, shape) * (2 * query_rows + kps * (2 if config["prefetch"] else 1)) \
            + kps * query_rows
        main = Geometry((threads * config["splits"], rows, 1), (threads, 1, 1), merge, registers)
        if config["splits"] == 1:
            return (main,)
        return main, Geometry((32, shape.B * shape.Hq * shape.L, 1), (32, 1, 1), registers=cdiv(shape.D, 32))

    def lane_elements(self, config, shape: DecodeShape) -> int:
        """Elements of a K/V row a lane holds: W-wide slots, 32 / keys_per_simdgroup lanes a key."""
        lanes = 32 // config["keys_per_simdgroup"]
        return cdiv(shape.D, lanes * config["load_width"]) * config["load_width"]

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
        if shape.kv_bits:
            inputs += [f"{n}_{part}" for n in ("keys", "values") for part in ("scales", "biases")]
        if shape.softcap:
            inputs.append("softcap")
        if shape.block_size:
            inputs += ["block_table", "seq_lens"]
        sinks = ["sinks"] if shape.sinks else []   # read where the output is normalised
        outputs = ["out"] if splits == 1 else ["partial_out", "partial_max", "partial_sum"]
        main = self._kernel(
            self.template, inputs + (sinks if splits == 1 else []), outputs,
            B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv, S=shape.S, D=shape.D, L=shape.L, block_size=shape.block_size,
            max_blocks=shape.max_blocks, pool_blocks=shape.pool_blocks, window=shape.window,
            sinks=bool(shape.sinks), softcap=bool(shape.softcap), kv_bits=shape.kv_bits, kv_group=shape.kv_group_size,
            T=d.metal, SG=sg, KPS=config["keys_per_step"], KG=config["keys_per_simdgroup"], SPLITS=splits,
            HEADS=heads, share_kv=config["share_kv"],
            W=config["load_width"], prefetch=config["prefetch"], TV=d.vector, vector=vector_of,
        )
        geometry = self.geometry(config, shape, dtype)
        out_shape = (shape.B, shape.Hq, shape.L, shape.D)
        if splits == 1:
            return [Launch(main, geometry[0].grid, geometry[0].threadgroup, (out_shape,), (d.mlx,))]
        rows_out = shape.B * shape.Hq * shape.L   # one partial result per query row and split
        partial = Launch(main, geometry[0].grid, geometry[0].threadgroup,
                         ((rows_out, splits, shape.D), (rows_out, splits), (rows_out, splits)),
                         (mx.float32, mx.float32, mx.float32))
        reduce = self._kernel("decode_attention_reduce.metal.j2", outputs + sinks, ["out"],
                              rows=rows_out, Hq=shape.Hq, L=shape.L, D=shape.D, SPLITS=splits,
                              sinks=bool(shape.sinks), T=d.metal)
        return [partial, Launch(reduce, geometry[1].grid, geometry[1].threadgroup, (out_shape,), (d.mlx,))]

    def make_inputs(self, shape: DecodeShape, dtype, seed=0):
        d = dtypes.get(dtype)
        kq, kk, kv, kp, kl, ks = mx.random.split(mx.random.key(seed), 6)
        q = mx.random.normal((shape.B, shape.Hq, shape.L, shape.D), key=kq).astype(d.mlx)
        variants = {"scale": mx.array(1.0 / math.sqrt(shape.D), dtype=mx.float32)}
        if shape.sinks:   # logits of the size scores have, so a sink takes a real share
            variants["sinks"] = mx.random.normal((shape.Hq,), key=ks).astype(d.mlx)
        if shape.softcap:   # small enough to bend the scores of these inputs (gemma2 uses 50)
            variants["softcap"] = mx.array(2.0, dtype=mx.float32)
        rows = (shape.Hkv, shape.pool_blocks, shape.block_size) if shape.block_size else (shape.B, shape.Hkv, shape.S)
        cache = {"keys": mx.random.normal((*rows, shape.D), key=kk).astype(d.mlx),
                 "values": mx.random.normal((*rows, shape.D), key=kv).astype(d.mlx)}
        if shape.kv_bits:   # stored as mx.quantize writes them, along D
            for name in ("keys", "values"):
                packed, scales, biases = mx.quantize(cache[name], group_size=shape.kv_group_size, bits=shape.kv_bits)
                cache.update({name: packed, f"{name}_scales": scales.astype(d.mlx),
                              f"{name}_biases": biases.astype(d.mlx)})
        if not shape.block_size:
            return {"queries": q, **cache, **variants}
        # A shuffled pool: sequence b's blocks are scattered, as after many adds and removals.
        order = mx.random.permutation(shape.pool_blocks, key=kp)[: shape.B * shape.max_blocks]
        table = order.reshape(shape.B, shape.max_blocks).astype(mx.int32)
        lens = mx.random.randint(1, shape.S + 1, (shape.B,), key=kl).astype(mx.int32)
        lens = mx.concatenate([mx.array([shape.S], dtype=mx.int32), lens[1:]])  # one full-length sequence
        return {"queries": q, **cache, **variants, "block_table": table, "seq_lens": lens}

    def trace_inputs(self, shape: DecodeShape, dtype) -> dict:
        """Every sequence of the pool full (S tokens), as Family.work counts a bucket: make_inputs'
        random lengths would make a proxy of B=2 and 4 sequences read less than twice and four
        times one."""
        inputs = self.make_inputs(shape, dtype, 0)
        if shape.block_size:
            inputs["seq_lens"] = mx.full((shape.B,), shape.S, dtype=mx.int32)
        return inputs

    def cache(self, shape: DecodeShape, inp, name: str) -> mx.array:
        """The keys or values as values: quantized ones through MLX's own mx.dequantize."""
        if not shape.kv_bits:
            return inp[name]
        return mx.dequantize(inp[name], inp[f"{name}_scales"], inp[f"{name}_biases"],
                             group_size=shape.kv_group_size, bits=shape.kv_bits)

    def gather_kv(self, shape: DecodeShape, inp, b: int):
        """Sequence b's K and V as contiguous (Hkv, len, D) arrays."""
        keys, values = self.cache(shape, inp, "keys"), self.cache(shape, inp, "values")
        if not shape.block_size:
            return keys[b], values[b], shape.S
        n = int(inp["seq_lens"][b].item())
        blocks = inp["block_table"][b, : cdiv(n, shape.block_size)]
        def gather(pool):
            x = pool[:, blocks].reshape(shape.Hkv, -1, shape.D)
            return x[:, :n]
        return gather(keys), gather(values), n

    def reference(self, shape: DecodeShape, dtype, inp):
        """Plain fp32 softmax attention per sequence in MLX ops, K/V heads repeated for GQA: the
        soft-cap, the causal and window mask and the sink column written out as their papers do."""
        outs = []
        g = shape.Hq // shape.Hkv
        scale = inp["scale"].item()
        for b in range(shape.B):
            k, v, n = self.gather_kv(shape, inp, b)
            k = mx.repeat(k.astype(mx.float32), g, axis=0)
            v = mx.repeat(v.astype(mx.float32), g, axis=0)
            q = inp["queries"][b].astype(mx.float32)            # (Hq, L, D)
            scores = (q @ k.transpose(0, 2, 1)) * scale
            if shape.softcap:
                cap = inp["softcap"].item()
                scores = mx.tanh(scores / cap) * cap
            visible = self.visible(shape, n)
            scores = mx.where(visible, scores, -mx.inf)
            if shape.sinks:   # one more column, the head's sink logit, that adds no value
                sink = mx.broadcast_to(inp["sinks"].astype(mx.float32)[:, None, None], (shape.Hq, shape.L, 1))
                w = mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1)[..., :n]
            else:
                w = mx.softmax(scores, axis=-1)
            # a token that sees no key: zeros (MLX's sdpa_vector guard), where softmax gives NaN
            outs.append(mx.where(visible.any(axis=-1)[None, :, None], w @ v, 0.0))
        return mx.stack(outs).astype(dtypes.get(dtype).mlx)

    @staticmethod
    def visible(shape: DecodeShape, n: int) -> mx.array:
        """(L, n): token i (at position n - L + i) sees keys at or before it, within its window."""
        position = mx.arange(shape.L)[:, None] + n - shape.L
        key = mx.arange(n)[None, :]
        seen = key <= position
        return seen & (key > position - shape.window) if shape.window else seen

    def baseline_inputs(self, shape: DecodeShape, dtype, inp) -> dict:
        """MLX's decode reads a contiguous cache, as mlx-lm keeps it: a paged pool becomes each
        sequence's own (1, Hkv, len, D) K and V, gathered before any timing."""
        if not shape.block_size or "caches" in inp:
            return inp
        caches = [self.gather_kv(shape, inp, b)[:2] for b in range(shape.B)]
        mx.eval(caches)
        return {**inp, "caches": caches}

    def baseline(self, shape: DecodeShape, dtype, inp):
        """MLX's fused attention (sdpa_vector for up to 8 tokens) over the contiguous cache
        (baseline_inputs): one call, or one per sequence of a paged batch, each over its own cache;
        the plain-ops reference where MLX has no fused variant (soft-cap, quantized K/V)."""
        if shape.softcap or shape.kv_bits:
            return self.reference(shape, dtype, inp)
        scale = inp["scale"].item()
        sinks = inp["sinks"] if shape.sinks else None

        def attend(q, k, v, n):
            mask = self.visible(shape, n) if shape.window else "causal" if shape.L > 1 else None
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)

        inp = self.baseline_inputs(shape, dtype, inp)
        if "caches" not in inp:
            return attend(inp["queries"], inp["keys"], inp["values"], shape.S)
        return mx.concatenate([attend(inp["queries"][b:b + 1], k[None], v[None], k.shape[1])
                               for b, (k, v) in enumerate(inp["caches"])])

    def work(self, config, shape: DecodeShape, dtype) -> list:
        """Each launch's counters (kernels/work.py) as the template runs. ASSUMED: every sequence
        holds S tokens (a bucket's length; the pool's lengths are known only at run time), every
        (sequence, head) threadgroup moves what the first does, quantized K/V rows lie as in a
        contiguous cache."""
        d = dtypes.get(dtype)
        geometry = self.geometry(config, shape, d)
        main = Tally(self.name, geometry[0])
        _count_attention(main, config, shape, d.size)
        if config["splits"] == 1:
            return [main.counted()]
        reduce = Tally(self.name + "_reduce", geometry[1])
        _count_reduce(reduce, config["splits"], shape, d.size)
        return [main.counted(), reduce.counted()]

    def mlx_config(self, shape, dtype, device):
        """MLX's sdpa_vector tiling: a 1,024-thread threadgroup a query head, each SIMD-group on
        one key at a time, 32 lanes across D; or its 2-pass pass 1: a threadgroup a KV head and
        block (splits = MLX's blocks), a SIMD-group a query head (our power of two at or above the
        GQA factor), TK keys loaded a step. Lanes load D/32 consecutive elements (the widest load
        of ours dividing them). None where MLX runs no fused kernel (soft-cap, quantized K/V, a
        head dim it runs unfused), its block count passes our splits, or the tiling passes a limit
        of ours (32 SIMD-groups' merge states of several query tokens or D = 256 over 32 KB)."""
        shape = self.shape(shape)
        choice = None if shape.softcap or shape.kv_bits else mlx_choice(self, shape, dtype, device)
        if choice is None:
            return None
        first = choice.launches[0]
        two_pass = len(choice.launches) == 2
        splits = first.grid[2] if two_pass else 1
        if splits not in self.param("splits").domain:
            return None
        version = parse_version(choice.mlx_version)
        keys = [k for since, k in SDPA_2PASS_KEYS if version >= since][-1] if two_pass else 1
        width = max(w for w in self.param("load_width").domain if (shape.D // 32) % w == 0)
        return allowed(self, {"threads": min(pow2_bucket(math.prod(first.threadgroup)), SDPA_VECTOR_THREADS),
                              "keys_per_step": keys, "keys_per_simdgroup": 1, "splits": splits,
                              "share_kv": first.grid[0] * first.grid[1] == shape.B * shape.Hkv,
                              "load_width": width, "prefetch": False}, shape, dtype, device)


def _rows_read(shape: DecodeShape) -> tuple[int, int]:
    """The first key any token of a full sequence sees, and the sequence's length."""
    first = max(0, shape.S - shape.L - shape.window + 1) if shape.window else 0
    return first, shape.S


def _count_attention(tally: Tally, config, shape: DecodeShape, size: int) -> None:
    """decode_attention.metal.j2, one threadgroup a split (the others alike), SIMD-group by SIMD-group."""
    SG, KPS, KG, W, splits = (config["threads"] // 32, config["keys_per_step"], config["keys_per_simdgroup"],
                              config["load_width"], config["splits"])
    LPK, D, L = 32 // KG, shape.D, shape.L
    slots, step = cdiv(D, LPK * W), SG * KPS * KG
    rows = (shape.Hq // shape.Hkv if config["share_kv"] else 1) * L
    alike = shape.B * (shape.Hkv if config["share_kv"] else shape.Hq)   # threadgroups a split
    first, length = _rows_read(shape)
    chunk = cdiv(length - first, splits)
    bits = shape.kv_bits
    scale_row = D // shape.kv_group_size * size if bits else 0

    loads: Counter = Counter()   # (buffer, live keys of the SIMD-group's KG, row phase) -> instructions

    def load_rows(src: str, s: int, n: int, end: int) -> None:
        """n load_rows of keys s, s + step, ...: their instructions depend on how many of the KG
        keys are live and, where rows are not whole sectors, on the row's place (the table's
        entries, quantized rows): counted by phase over the progression's period."""
        full = max(0, min(n, (end - KG - s) // step + 1))
        periods = [(src, SECTOR if bits else 1)] + ([("block_table", 8 * shape.block_size)] if shape.block_size else [])
        for kind, period in periods:
            cycle = period // math.gcd(step, period)
            for k in range(min(full, cycle)):
                loads[kind, KG, (s + k * step) % period] += len(range(k, full, cycle))
            for k in range(full, n):   # the last steps: some keys past the end
                live = max(0, min(KG, end - s - k * step))
                if live:
                    loads[kind, live, (s + k * step) % period] += 1

    def row_instructions(src: str, live: int, phase: int) -> list:
        """(buffer, lanes' accesses) of a load_row of keys phase..phase + live - 1."""
        if src == "block_table":
            return [(src, tuple({(4 * ((phase + g) // shape.block_size), 4) for g in range(live)}))]
        out = []
        for e in range(slots):
            lanes = [(phase + g, (t + LPK * e) * W) for g in range(live) for t in range(LPK) if (t + LPK * e) * W < D]
            if not bits:
                out.append((src, tuple(((row * D + c) * size, W * size) for row, c in lanes)))
                continue
            for c in range(W):
                out.append((src, tuple((4 * (row * D * bits // 32 + (c0 + c) * bits // 32), 4) for row, c0 in lanes)))
                out += [(f"{src}_{part}", tuple((row * scale_row + (c0 + c) // shape.kv_group_size * size, size)
                                                for row, c0 in lanes)) for part in ("scales", "biases")]
        return out

    for split in range(splits):
        start = first + split * chunk
        end = min(length, start + chunk)
        for sg in range(SG):
            s0 = start + sg * KPS * KG
            iterations = max(0, cdiv(end - s0, step))
            for j in range(KPS):
                if config["prefetch"]:   # the first step's keys before the loop, then each next step's
                    load_rows("keys", s0 + j * KG, 1, end)
                load_rows("keys", s0 + j * KG + (step if config["prefetch"] else 0), iterations, end)
                load_rows("values", s0 + j * KG, iterations, end)
            tally.simd_functions += alike * iterations * KPS * rows * (1 if KG == 1 else int(math.log2(LPK)))
    # the rest is alike for every SIMD-group, and for every row (rows start on whole sectors, and
    # a shifted threadgroup access meets the banks alike)
    groups = splits * SG * alike
    if shape.block_size:
        tally.device("seq_lens", ((0, 4),), groups)
    for e in range(slots * W):
        dims = ((lane % LPK + LPK * (e // W)) * W + e % W for lane in range(32))
        tally.device("queries", ((c * size, size) for c in dims if c < D), groups * rows)
    tally.simd_functions += groups * int(math.log2(KG)) * rows * (2 + slots * W)
    tally.threadgroup((0,), groups * 2 * rows)   # lane 0 stores its max and sum
    for e in range(slots * W):                   # lane group 0 its output
        dims = ((t + LPK * (e // W)) * W + e % W for t in range(LPK))
        tally.threadgroup((4 * c for c in dims if c < D), groups * rows)
    merged = splits * alike * rows               # each row merged once a threadgroup
    _count_merge(tally, SG, rows, D, merged, sinks=bool(shape.sinks) and splits == 1, size=size, threadgroup=True)
    if splits == 1:
        _count_out(tally, "out", D, size, merged)
    else:
        _count_out(tally, "partial_out", D, 4, merged)
        for name in ("partial_max", "partial_sum"):
            tally.device(name, ((0, 4),), merged)
    for (src, live, phase), times in loads.items():
        for buffer, accesses in row_instructions(src, live, phase):
            tally.device(buffer, accesses, alike * times)
    tally.barriers_per_threadgroup += 1
    read = shape.B * shape.Hkv * (length - first)
    tally.footprint("queries", shape.B * shape.Hq * L * D * size)
    for src in ("keys", "values"):
        tally.footprint(src, read * (D * bits // 8 if bits else D * size))
        if bits:
            tally.footprint(f"{src}_scales", read * scale_row)
            tally.footprint(f"{src}_biases", read * scale_row)
    if shape.block_size:
        tally.footprint("block_table", 4 * shape.B * ((length - 1) // shape.block_size - first // shape.block_size + 1))
        tally.footprint("seq_lens", 4 * shape.B)
    if splits > 1:
        _partial_footprints(tally, shape.B * shape.Hq * L, splits, D)
        return
    tally.footprint("out", shape.B * shape.Hq * L * D * size)
    if shape.sinks:
        tally.footprint("sinks", shape.Hq * size)


def _count_out(tally: Tally, buffer: str, D: int, size: int, times: int) -> None:
    """Rows of D values written across the lanes, 32 apart (each row starting a sector)."""
    for e in range(cdiv(D, 32)):
        tally.device(buffer, ((c * size, size) for c in range(32 * e, min(D, 32 * e + 32))), times)


def _partial_footprints(tally: Tally, rows: int, splits: int, D: int) -> None:
    tally.footprint("partial_out", rows * splits * D * 4)
    tally.footprint("partial_max", rows * splits * 4)
    tally.footprint("partial_sum", rows * splits * 4)


def _count_merge(tally: Tally, parts: int, stride: int, D: int, times: int, sinks: bool, size: int,
                 threadgroup: bool) -> None:
    """softmax_merge.j2's reads, `times` rows each merging `parts` partial states (part i at
    i x stride) read by every lane, the output's values across lanes 32 apart: the SIMD-groups'
    states in threadgroup memory, or the splits' partials in device memory; with a sink, its logit."""
    if sinks:
        tally.device("sinks", ((0, size),), times)

    def read(name: str, at: list) -> None:
        if threadgroup:
            tally.threadgroup(at, times)
        else:
            tally.device(f"partial_{name}", ((a, 4) for a in at), times)
    for i in range(parts):
        read("max", [4 * i * stride])
    for i in range(parts):
        read("max", [4 * i * stride])
        read("sum", [4 * i * stride])
        for e in range(cdiv(D, 32)):
            read("out", [4 * (i * stride * D + c) for c in range(32 * e, min(D, 32 * e + 32))])


def _count_reduce(tally: Tally, splits: int, shape: DecodeShape, size: int) -> None:
    """decode_attention_reduce.metal.j2: a SIMD-group a query row merging its splits' partials."""
    rows, D = shape.B * shape.Hq * shape.L, shape.D
    _count_merge(tally, splits, 1, D, rows, sinks=bool(shape.sinks), size=size, threadgroup=False)
    _count_out(tally, "out", D, size, rows)
    _partial_footprints(tally, rows, splits, D)
    tally.footprint("out", rows * D * size)
    if shape.sinks:
        tally.footprint("sinks", shape.Hq * size)
