"""prefill_attention: causal flash attention over a prompt on 8x8 SIMD-group matrices.

This is the family where the 32 KB threadgroup limit bites: D=128, BK=64 with fp32 staging and
double-buffered K/V tiles needs 2 * 2 * 64 * (128 * 4 + 16) = 135,168 bytes (rows padded by 16).
Head-dim blocking (d_block, as metal-flash-attention) stages K and V a chunk of columns at a time
in one buffer: BK=128 at D=256 in half with d_block=32 stages 128 * (64 + 16) = 10,240 bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from metalforge.intmath import cdiv
from metalforge.kernels import dtypes
from metalforge.kernels.dtypes import vector_of
from metalforge.kernels.decode_attention import HEAD_DIMS, MAX_QUERY_TOKENS, attention_call
from metalforge.kernels.family import (TILE_PAD_BYTES, Family, Geometry, Launch, Param, allowed, cut_keeping_tail,
                                       fragment_problems, mlx_choice, stage_dtype, stage_problems)
from metalforge.kernels.timing.traces import cut
from metalforge.kernels.work import SECTOR, Tally, passes


@dataclass(frozen=True)
class PrefillShape:
    B: int
    Hq: int
    Hkv: int
    L: int        # new query tokens (passed at run time)
    D: int
    prefix: int = 0  # cached tokens before them (keys = prefix + L; passed at run time)
    window: int = 0  # sliding window: a query sees its last `window` keys, itself included (0: all)
    sinks: int = 0   # 1: a learned sink logit per query head (input `sinks`, Hq values) joins the softmax

    @property
    def LK(self) -> int:
        return self.prefix + self.L


class PrefillAttention(Family):
    """Causal flash-style attention over L prompt tokens (optionally after a cached prefix)."""

    name = "prefill_attention"
    bound = "compute"
    bucketed = ("L", "prefix")
    variant_fields = ("window", "sinks")
    shape_type = PrefillShape
    params = (
        Param("BQ", (8, 16, 32, 64, 128), 32, "query rows per threadgroup"),
        Param("BK", (8, 16, 32, 64, 128), 32, "keys per staged tile"),
        Param("heads", (1, 2, 4, 8), 1, "query heads of one KV head per threadgroup (BQ rows: BQ/heads positions "
              "of each), reading each K/V tile once for all of them"),
        Param("simdgroups", (1, 2, 4, 8), 4, "SIMD-groups per threadgroup (each owns BQ/simdgroups rows)"),
        Param("stage", ("input", "float"), "input", "element type of the staged tiles: the input's, or fp32"),
        Param("double_buffer", (False, True), False, "stream the next K/V tile while this one is used"),
        Param("q_source", ("threadgroup", "registers"), "threadgroup", "where Q's fragments are read from"),
        Param("load_width", (1, 2, 4), 4, "elements per device load when staging K/V"),
        Param("pad", (True, False), True, "tile rows padded by 16 bytes, fp32 rows swizzled (fragment reads without bank conflicts), "
              "or packed (room for 128-key tiles at D=64)"),
        Param("d_block", (0, 16, 32, 64), 0, "head-dimension columns of K, then V, staged at a time in one buffer "
              "(S summed over the chunks; 0: all D, K and V together)"),
        Param("score_type", ("float", "half"), "float", "S and P fragments (and the Q, K, V operands) in fp32 or "
              "half; running max, sum and O in fp32 (M3 and later issue the two in parallel)"),
    )

    op = "attention"
    mlx_op = "prefill"
    trace_groups = (("B",), ("Hq", "Hkv"), ("L", "prefix"))

    def mlx_sizes(self, fields: dict) -> dict:
        """mlx-lm's prompt attention is causal."""
        return {"prefix": 0, **fields, "causal": True}

    def trace_proxy(self, fields: dict, config) -> dict:
        """prefill_proxy of the config's tiles: BQ / heads positions by BK keys."""
        return prefill_proxy(fields, config["BQ"] // config["heads"], config["BK"], fields.get("window", 0))

    def op_shape(self, values: dict) -> dict | None:
        """A prompt of one sequence: its `new` tokens after `context - new` cached ones."""
        call = attention_call(values, self.variant_fields)
        if call is None or values["B"] != 1:
            return None
        heads, variant = call
        return dict(heads, L=values["new"], prefix=values["context"] - values["new"], **variant)

    def proxy_shape(self, shape):
        return self.shape({**shape.__dict__, "B": 1, "Hkv": 1, "Hq": shape.Hq // shape.Hkv,
                           "L": cut_keeping_tail(shape.L, 64, 64), "prefix": cut_keeping_tail(shape.prefix, 32, 32)})

    def mlx_regime(self, shape) -> str:
        """MLX's sdpa_vector up to MAX_QUERY_TOKENS query tokens, steel attention past them (a
        128-token bucket's gain taken as evidence at one token once routed decode attention to
        this family, priced 8x MLX's kernel at 4,096 keys)."""
        return "vector" if shape.L <= MAX_QUERY_TOKENS else "matrix"

    def shape_distance(self, a, b) -> float | None:
        if (a.D, a.Hq // a.Hkv, a.window, a.sinks) != (b.D, b.Hq // b.Hkv, b.window, b.sinks):
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
        if shape.window < 0:
            out.append(f"window={shape.window} must be 0 (no window) or positive")
        if shape.sinks not in (0, 1):
            out.append(f"sinks={shape.sinks} must be 0 or 1")
        return out

    def buffer_elements(self, shape: PrefillShape) -> dict[str, int]:
        cache = shape.B * shape.Hkv * shape.LK * shape.D
        return {"queries": shape.B * shape.Hq * shape.L * shape.D, "keys": cache, "values": cache}

    def geometry(self, config, shape: PrefillShape, dtype) -> tuple[Geometry, ...]:
        threads = 32 * config["simdgroups"]
        q_rows = config["BQ"] if config["q_source"] == "threadgroup" else 0
        q_row = shape.D * stage_dtype(config, dtype).size + (TILE_PAD_BYTES if config["pad"] else 0)
        kv_rows = config["BK"] * (1 if self.chunked(config, shape) else 2 * (2 if config["double_buffer"] else 1))
        tile_bytes = q_rows * q_row + kv_rows * self.tile_row_bytes(config, shape, dtype)
        return (Geometry((threads * cdiv(shape.L, config["BQ"] // config["heads"]), shape.B * shape.Hq // config["heads"], 1),
                         (threads, 1, 1), tile_bytes,
                         registers=2 * self.fragments(config, shape)),)

    @staticmethod
    def chunked(config, shape: PrefillShape) -> bool:
        return config["d_block"] > 0

    def columns(self, config, shape: PrefillShape) -> int:
        """Head-dimension columns a K/V tile row holds."""
        return config["d_block"] if self.chunked(config, shape) else shape.D

    def tile_row_bytes(self, config, shape: PrefillShape, dtype) -> int:
        """A staged K/V tile row."""
        return self.columns(config, shape) * stage_dtype(config, dtype).size + (TILE_PAD_BYTES if config["pad"] else 0)

    @staticmethod
    def swizzled(config, dtype) -> bool:
        """fp32 tile rows padded by 16 bytes start 4 banks apart: a fragment read along rows then
        meets 16 banks only, unless odd rows swap their column pairs (the template's SW)."""
        return config["pad"] and stage_dtype(config, dtype).size == 4

    def fragments(self, config, shape: PrefillShape) -> int:
        """8x8 fp32 fragments a SIMD-group holds: O, S, Q (in registers) and the K/V operand; S, Q
        and the operand as half take half as many registers."""
        tq, tk, td = config["BQ"] // config["simdgroups"] // 8, config["BK"] // 8, shape.D // 8
        operands = tq * tk + (tq * td if config["q_source"] == "registers" else 0) + 1
        return tq * td + (cdiv(operands, 2) if config["score_type"] == "half" else operands)

    def config_problems(self, config, shape: PrefillShape, dtype) -> list[str]:
        out = []
        if config["BQ"] % (8 * config["simdgroups"]):
            out.append(f"BQ={config['BQ']} over simdgroups={config['simdgroups']} is not a whole number of "
                       "8-row fragments")
        else:
            out += fragment_problems(self.fragments(config, shape))
        if (shape.Hq // shape.Hkv) % config["heads"]:
            out.append(f"heads={config['heads']} does not divide the {shape.Hq // shape.Hkv} query heads of a KV head")
        if config["simdgroups"] % config["heads"]:
            out.append(f"heads={config['heads']} over simdgroups={config['simdgroups']}: each SIMD-group's rows must be "
                       "of one head")
        if config["d_block"] >= shape.D:
            out.append(f"d_block={config['d_block']} is all of D={shape.D} (d_block=0 stages whole rows)")
        elif config["d_block"] and shape.D % config["d_block"]:
            out.append(f"d_block={config['d_block']} does not divide D={shape.D}")
        if config["d_block"] and config["double_buffer"]:
            out.append("double_buffer streams whole K/V tiles; d_block stages a chunk at a time (set one of them)")
        if config["score_type"] == "half" and (dtypes.get(dtype).name != "float16" or config["stage"] != "input"):
            out.append("score_type=half reads half tiles as half fragments (float16 inputs staged as input)")
        return out + stage_problems(config, dtype)

    def tolerance(self, config, dtype):
        d = dtypes.get(dtype)
        return d.atol, d.rtol

    def launches(self, config, shape: PrefillShape, dtype) -> list[Launch]:
        d = dtypes.get(dtype)
        sg = config["simdgroups"]
        kernel = self._kernel(
            self.template, ("queries", "keys", "values", "scale", "lengths") + (("sinks",) if shape.sinks else ()),
            ("out",),
            Hq=shape.Hq, Hkv=shape.Hkv, D=shape.D, window=shape.window, sinks=bool(shape.sinks),
            T=d.metal, BQ=config["BQ"], BK=config["BK"], SG=sg, HP=config["heads"],
            ST=stage_dtype(config, dtype).metal, vector=vector_of, TV=d.vector,
            PAD=TILE_PAD_BYTES // stage_dtype(config, dtype).size if config["pad"] else 0,
            SW=int(self.swizzled(config, dtype)),
            DB=config["double_buffer"], QS=config["q_source"],
            W=config["load_width"], DC=self.columns(config, shape), SP=config["score_type"],
        )
        g, = self.geometry(config, shape, dtype)
        return [Launch(kernel, g.grid, g.threadgroup, ((shape.B, shape.Hq, shape.L, shape.D),), (d.mlx,),
                       lengths=(shape.L, shape.LK))]

    def make_inputs(self, shape: PrefillShape, dtype, seed=0):
        d = dtypes.get(dtype)
        kq, kk, kv, ks = mx.random.split(mx.random.key(seed), 4)
        inputs = {
            "queries": mx.random.normal((shape.B, shape.Hq, shape.L, shape.D), key=kq).astype(d.mlx),
            "keys": mx.random.normal((shape.B, shape.Hkv, shape.LK, shape.D), key=kk).astype(d.mlx),
            "values": mx.random.normal((shape.B, shape.Hkv, shape.LK, shape.D), key=kv).astype(d.mlx),
            "scale": mx.array(1.0 / math.sqrt(shape.D), dtype=mx.float32),
        }
        if shape.sinks:   # logits of the size scores have, so a sink takes a real share
            inputs["sinks"] = mx.random.normal((shape.Hq,), key=ks).astype(d.mlx)
        return inputs

    def reference(self, shape: PrefillShape, dtype, inp):
        g = shape.Hq // shape.Hkv
        q = inp["queries"].astype(mx.float32)
        k = mx.repeat(inp["keys"].astype(mx.float32), g, axis=1)
        v = mx.repeat(inp["values"].astype(mx.float32), g, axis=1)
        scores = mx.where(self.visible(shape), (q @ k.transpose(0, 1, 3, 2)) * inp["scale"].item(), -mx.inf)
        if shape.sinks:   # one more column, the head's sink logit, that adds no value
            sink = mx.broadcast_to(inp["sinks"].astype(mx.float32)[None, :, None, None], (*scores.shape[:3], 1))
            w = mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1)[..., : shape.LK]
        else:
            w = mx.softmax(scores, axis=-1)
        return (w @ v).astype(dtypes.get(dtype).mlx)

    @staticmethod
    def visible(shape: PrefillShape) -> mx.array:
        """(L, LK): query i (at position prefix + i) sees keys at or before it, within its window."""
        position = mx.arange(shape.L)[:, None] + shape.prefix
        key = mx.arange(shape.LK)[None, :]
        seen = key <= position
        return seen & (key > position - shape.window) if shape.window else seen

    def baseline(self, shape: PrefillShape, dtype, inp):
        """As mlx-lm calls it: mask="causal" (MLX aligns the queries to the last keys, so cached
        keys before them are all visible), which runs steel_attention's causal path with no mask
        array; a sliding window needs its boolean mask (visible)."""
        return mx.fast.scaled_dot_product_attention(inp["queries"], inp["keys"], inp["values"],
                                                    scale=inp["scale"].item(),
                                                    mask=self.visible(shape) if shape.window else "causal",
                                                    sinks=inp["sinks"] if shape.sinks else None)

    def work(self, config, shape: PrefillShape, dtype) -> list:
        """The launch's counters (kernels/work.py) as the template runs: per query tile the key
        tiles it stages (causal, windowed), per SIMD-group the tiles it is active on. ASSUMED: a
        SIMD-group's lanes take one path (the trace splits an instruction whose lanes straddle
        the last key or query, which a GPU issues once; tests/test_work.py bounds it)."""
        d = dtypes.get(dtype)
        g, = self.geometry(config, shape, d)
        tally = Tally(self.name, g)
        _count_prefill(tally, self, config, shape, d)
        return [tally.counted()]

    def mlx_config(self, shape, dtype, device):
        """MLX's steel_attention tile: its BQ and BK (32 and 32, 16 keys from D = 128), WM x WN
        SIMD-groups of BQ / WM rows, Q staged in threadgroup memory, K/V tiles in the input's
        type and padded by 16 bytes, one buffer each, loaded 4 elements at a time, S in fp32.
        None where MLX runs no steel kernel (a head dim it runs unfused, NAX on M5)."""
        choice = mlx_choice(self, shape, dtype, device)
        if choice is None or choice.launches[0].function != "attention":
            return None
        tile = dict(choice.launches[0].template)
        return allowed(self, {"BQ": tile["BQ"], "BK": tile["BK"], "heads": 1, "simdgroups": tile["WM"] * tile["WN"],
                              "stage": "float" if dtypes.get(dtype).name == "float32" else "input",
                              "double_buffer": False, "q_source": "threadgroup", "load_width": 4, "pad": True,
                              "d_block": 0, "score_type": "float"}, shape, dtype, device)


def prefill_proxy(fields: dict, rows: int, keys: int, window: int) -> dict:
    """The trace proxy of a causal prefill tiled `rows` query positions by `keys` keys (ours:
    BQ / heads by BK; MLX's steel attention: its BQ by BK): one sequence, one KV head and its
    query heads; L an even number of the larger tile and the prefix whole key tiles, in the real
    ratio (each query tile's key tiles then grow by whole tiles, and a threadgroup's average
    barriers, which the trace rounds down, stay whole at all three points); with a window, L and
    a prefix past it (the counts then grow linearly)."""
    tile = 2 * max(rows, keys)
    out = cut(cut(fields, {"B": 1}), {"Hq": fields["Hq"] // fields["Hkv"], "Hkv": 1})
    least = {"L": tile * (cdiv(window, tile) + 1), "prefix": cdiv(window, keys) * keys} if window else {}
    return cut(out, {"L": tile, "prefix": keys}, least)


def _count_prefill(tally: Tally, fam: PrefillAttention, config, shape: PrefillShape, d) -> None:
    """prefill_attention.metal.j2, instruction by instruction: what a tile's staging and an active
    SIMD-group's tile cost is alike in every tile (rows start on whole sectors; a shifted
    threadgroup access meets the banks alike), so each is counted once and multiplied."""
    BQ, BK, HP, SG, W = (config[k] for k in ("BQ", "BK", "heads", "simdgroups", "load_width"))
    D, L, LK, size = shape.D, shape.L, shape.LK, d.size
    st = stage_dtype(config, d).size
    pad = TILE_PAD_BYTES // st if config["pad"] else 0
    sw = int(fam.swizzled(config, d))
    DC = fam.columns(config, shape)
    CS, DS, T = DC + pad, D + pad, 32 * SG
    RQ, QP = BQ // SG, BQ // HP
    TQ, TK, TD = RQ // 8, BK // 8, D // 8
    chunks = D // DC
    packs = shape.B * shape.Hq // HP            # threadgroups per query tile, each moving alike
    qtiles = cdiv(L, QP)
    lanes = [(((lane // 4) & 4) + (lane // 2) % 4, ((lane // 4) & 2) * 2 + (lane % 2) * 2) for lane in range(32)]

    # a tile's staging stores (K and V, every chunk, every SIMD-group): W stores a lane and pair
    stores = 0
    for sg in range(SG):
        for i0 in range(sg * 32 * W, BK * DC, T * W):
            idx = [i0 + lane * W for lane in range(32)]
            for c in range(W):
                stores += passes(tuple(((i // DC) * CS + ((i % DC + c) ^ ((i // DC) & sw))) * st for i in idx))
    stage_passes = 2 * chunks * stores
    # an active SIMD-group's tile: K^T, Q and V fragment reads (two an operand), the MMAs, the shuffles
    k_read = sum(passes(tuple(((fn + c) * CS + (fm ^ ((fn + c) & sw))) * st for fm, fn in lanes)) for c in range(2))
    row_read = sum(passes(tuple((fm * CS + ((fn + c) ^ (fm & sw))) * st for fm, fn in lanes)) for c in range(2))
    q_read = sum(passes(tuple((fm * DS + ((fn + c) ^ (fm & sw))) * st for fm, fn in lanes)) for c in range(2))
    active_passes = TK * TD * (k_read + row_read + (TQ * q_read if config["q_source"] == "threadgroup" else 0))

    offset, window = shape.prefix, shape.window
    tiles = active = kv_keys = valid_rows = q_rows = barriers = 0
    per_tile_barriers = 4 * chunks if fam.chunked(config, shape) else 1 if config["double_buffer"] else 2
    for qt in range(qtiles):
        q0 = qt * QP
        k_end = min(LK, q0 + QP + offset)
        k_first = max(0, q0 + offset - window + 1) // BK * BK if window else 0
        n = max(0, cdiv(k_end - k_first, BK))
        tiles += n
        barriers += n * per_tile_barriers
        kv_keys += min(k_first + n * BK, LK) - k_first   # keys at or past LK are not read
        q_rows += HP * min(QP, L - q0)
        for sg in range(SG):
            row0 = q0 + sg * RQ % QP
            last = min(k_first + (n - 1) * BK, row0 + RQ - 1 + offset)   # the last tile it is active on
            first = k_first
            if window:   # ... from the first whose keys reach its rows' windows
                first = max(first, k_first + max(0, cdiv(row0 + offset - window - BK + 2 - k_first, BK)) * BK)
            active += max(0, (last - first) // BK + 1) if n and last >= first else 0
            valid_rows += sum(max(0, min(8, L - (row0 + tq * 8))) for tq in range(TQ))
    tally.barriers_per_threadgroup += barriers // qtiles   # (the trace's whole barriers a threadgroup)
    tally.device("lengths", ((0, 4),), 2 * SG * qtiles * packs)
    for buffer in ("keys", "values"):   # rows of DC values start on sectors; an instruction covers whole rows or a run of one
        tally.whole_sectors(buffer, packs * kv_keys * D * size)
    tally.threadgroup_passes += packs * (tiles * stage_passes + active * active_passes)
    tally.matrix_multiplies += packs * active * 2 * TQ * TK * TD
    tally.simd_functions += packs * active * 4 * TQ
    if config["q_source"] == "threadgroup":
        tally.whole_sectors("queries", packs * q_rows * D * size)
        q_stores = sum(passes(tuple(((i // D) * DS + ((i % D) ^ ((i // D) & sw))) * st for i in range(i0, i0 + 32)))
                       for i0 in range(0, BQ * D, 32))
        tally.threadgroup_passes += packs * qtiles * q_stores
    else:   # each lane its rows' two elements of each fragment: a sector a row (8 values)
        tally.whole_sectors("queries", packs * valid_rows * TD * 2 * SECTOR)
    tally.whole_sectors("out", packs * valid_rows * TD * 2 * SECTOR)
    if shape.sinks:
        tally.device("sinks", ((0, size),), packs * qtiles * SG * TQ)
        tally.footprint("sinks", shape.Hq * size)
    k_first0 = max(0, offset - window + 1) // BK * BK if window else 0
    tally.footprint("lengths", 8)
    tally.footprint("queries", shape.B * shape.Hq * L * D * size)
    for buffer in ("keys", "values"):
        tally.footprint(buffer, shape.B * shape.Hkv * (LK - k_first0) * D * size)
    tally.footprint("out", shape.B * shape.Hq * L * D * size)
