"""One forward pass's narrow view of the pool, in the spirit of mlx-lm's `update_and_fetch`.

A step is ragged: {sequence: n new tokens}, any mix of prompts and single tokens, laid out
sequence after sequence along one token axis. It knows each new token's position (the
sequences' stored positions: RoPE rotates the whole step in one call), where its K/V go,
which tokens need logits, and its groups: runs of sequences with as many new tokens each, which
attention serves in one call (one token of each of B sequences decoded, or the drafts of several
sequences verified, k+1 tokens each). The write slots, block tables and read runs are found once
per step and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from metalforge.engine.kv import quantized
from metalforge.intmath import cdiv


@dataclass(frozen=True)
class Group:
    """Sequences attention serves together: `members` (indices into the step's sequences),
    each with `new` tokens (1 for a decode group, k+1 for a group verifying k drafts each), at
    `tokens` of the step's token axis, sequence after sequence."""

    members: tuple[int, ...]
    new: int
    tokens: slice


class Step:
    def __init__(self, pool, counts: dict[int, int], logits_at: dict[int, list[int]] | None = None):
        self.pool = pool
        self.sids, self.counts = list(counts), list(counts.values())
        self.starts = [pool.seq(s).length for s in self.sids]
        self.lengths = [s + n for s, n in zip(self.starts, self.counts)]
        positions, slots, rows, offset = [], [], [], 0
        for sid, n in zip(self.sids, self.counts):
            seq = pool.seq(sid)
            new = list(range(seq.next_position, seq.next_position + n))
            slots += pool.blocks.slots(seq.blocks, seq.length, n)
            seq.positions.extend(new)
            seq.pending += n
            positions += new
            rows += [offset + i for i in (logits_at or {}).get(sid, [n - 1])]
            offset += n
        self.tokens = offset
        self.positions = mx.array([positions], dtype=mx.int32)            # (1, tokens)
        self.logit_rows = rows
        contiguous = all(b - a == 1 for a, b in zip(slots, slots[1:]))
        self.where = slice(slots[0], slots[0] + len(slots)) if contiguous else mx.array(slots, dtype=mx.int32)
        self.groups = self._groups()   # attention's: runs of sequences with as many new tokens each
        self._tables: dict[tuple, tuple] = {}
        self._runs: dict[tuple, list] = {}
        self._masks: dict[tuple, mx.array] = {}

    def _groups(self) -> list[Group]:
        """Runs of consecutive sequences with as many new tokens each."""
        out, start = [], 0
        for b, n in enumerate(self.counts):
            last = out[-1] if out else None
            if last is not None and last.new == n:
                out[-1] = Group(last.members + (b,), n, slice(last.tokens.start, start + n))
            else:
                out.append(Group((b,), n, slice(start, start + n)))
            start += n
        return out

    @property
    def longest(self) -> int:
        """Positions held by the step's longest sequence, new tokens included (a host number)."""
        return max(self.lengths)

    def reads(self, layer: int, b: int) -> list[tuple[int, int]]:
        """The [start, end) position ranges layer `layer` reads of sequence b in this step."""
        return self.pool.spec(layer, self.sids[b]).reads(self.starts[b], self.lengths[b])

    def runs(self, layer: int, b: int) -> list[tuple[int, int]]:
        """Sequence b's runs of consecutive slots that layer `layer` reads."""
        key = (tuple(self.reads(layer, b)), b)
        if key not in self._runs:
            self._runs[key] = self.pool.ranges(self.sids[b], list(key[0]))
        return self._runs[key]

    def mask(self, layer: int, b: int, window: int | None = None) -> mx.array:
        """(new tokens, keys read) bool: which keys each of sequence b's new tokens sees; `window`:
        a layer's own sliding window besides (the latest `window` positions, its own included).
        Built on the host (numpy): a leaf array, no kernel; once per step for layers alike."""
        key = (self.pool.spec(layer, self.sids[b]), b, window)
        if key not in self._masks:
            keys = np.concatenate([np.arange(a, e) for a, e in self.reads(layer, b) if e > a])
            self._masks[key] = mx.array(self.visible(layer, b, keys, np.arange(self.starts[b], self.lengths[b]), window))
        return self._masks[key]

    def visible(self, layer: int, b: int, keys: np.ndarray, queries: np.ndarray, window: int | None) -> np.ndarray:
        """(queries, keys) bool of host positions: what sequence b's spec, its length and `window` let each query see."""
        seen = self.pool.spec(layer, self.sids[b]).visible(keys, queries) & (keys[None, :] < self.lengths[b])
        return seen if window is None else seen & (keys[None, :] > queries[:, None] - window)

    def update_and_fetch(self, layer: int, k: mx.array, v: mx.array, kv: mx.array | None = None) -> "LayerKV":
        """Write the new tokens' k, v (1, kv_heads, tokens, head_dim); return what attention reads.
        `kv`: the same as one (2, kv_heads, tokens, head_dim) array where the producer wrote them
        so (norm_qkv), which the storage writes without stacking them first."""
        self.pool.storage.write(layer, self.where, k.squeeze(0), v.squeeze(0), kv)   # a view: x[0] is a Gather
        return LayerKV(self, layer, k, v)

    def block_table(self, members: tuple[int, ...], width: int) -> tuple[mx.array, mx.array]:
        key = (members, width)
        if key not in self._tables:
            self._tables[key] = self.pool.block_table([self.sids[b] for b in members],
                                                      [self.lengths[b] for b in members], width)
        return self._tables[key]

    def commit(self, tokens: list[list[int]]) -> None:
        """Record the token ids written (one list per sequence). A step built on a token not yet
        sampled is not committed: its id stays pending until `KVPool.settle` names it."""
        for sid, ids in zip(self.sids, tokens):
            self.pool.settle(sid, ids)


@dataclass
class LayerKV:
    """One layer of a step, as attention reads it."""

    step: Step
    layer: int
    k: mx.array | None = None   # the step's new K/V as computed, before storage (see GroupKV.attend)
    v: mx.array | None = None

    def groups(self) -> list["GroupKV"]:
        return [GroupKV(self, g) for g in self.step.groups]


@dataclass
class GroupKV:
    """One attention group of a layer: its sequences' K/V, in place or through the block table."""

    kv: LayerKV
    group: Group

    @property
    def kv_heads(self) -> int:
        return self.kv.step.pool.storage.kv_heads

    @property
    def longest(self) -> int:
        return max(self.kv.step.lengths[b] for b in self.group.members)

    def sequence(self, i: int) -> tuple[mx.array, mx.array]:
        """Member i's K and V, (1, kv_heads, length, head_dim), a view when it is one run."""
        return self.kv.step.pool.read(self.kv.layer, self.kv.step.runs(self.kv.layer, self.group.members[i]))

    def contiguous(self) -> tuple[mx.array, mx.array]:
        """The one member's K and V as attention reads them, (1, kv_heads, length, head_dim): as
        computed where it reads them so (see as_computed), else as stored."""
        return (self.kv.k, self.kv.v) if self.as_computed else self.sequence(0)

    def mask(self, window: int | None = None) -> mx.array:
        """(new tokens, keys) bool mask of the group's one sequence: causal, its spec's window, and
        `window` (the layer's own) when given."""
        return self.kv.step.mask(self.kv.layer, self.group.members[0], window)

    @property
    def mlx_only(self) -> bool:
        """Whether only MLX's ops read it: some member's pool window has begun to rotate (it is
        longer than the window), so its queries see the window's sink positions (the first 4,
        as mlx-lm's RotatingKVCache keeps them) and then a gap before their latest keys. Neither
        kernel of ours reads that: their `window` is the latest keys only, and their `sinks` a
        learned logit per head (gpt-oss), not positions; serving it would take a second pass over
        the sink positions merged into the window's softmax. Until it rotates, a windowed
        sequence is read as full attention, which ours serve."""
        step = self.kv.step
        return any(not step.pool.spec(self.kv.layer, step.sids[b]).whole(step.lengths[b]) for b in self.group.members)

    @property
    def as_computed(self) -> bool:
        """Whether attention reads the step's K/V as computed, not as stored: a whole sequence's
        first step alone (a prompt). Quantized, as mlx-lm attends to its first prompt chunk
        before its cache is quantized; dense, the same values."""
        step, b = self.kv.step, self.group.members[0]
        return step.starts[b] == 0 and self.kv.k is not None and len(step.sids) == 1 and \
            step.reads(self.kv.layer, b) == [(0, step.lengths[b])]

    @property
    def quantization(self) -> dict | None:
        """{"bits", "group_size"} of a quantized pool, else None."""
        return getattr(self.kv.step.pool.storage, "quantization", None)

    def attend(self, q: mx.array, i: int, scale: float, mask=None, window: int | None = None,
               sdpa=mx.fast.scaled_dot_product_attention, **extra) -> mx.array:
        """MLX's attention of q (1, Hq, L, D) over member i's K/V: `sdpa` (the fused op unless the
        layer soft-caps), or products on the codes of a quantized pool (engine/kv/quantized.py).
        One query (no mask) reads only the latest `window` keys when given; `extra`: sinks."""
        step, b = self.kv.step, self.group.members[i]
        pool, runs = step.pool, step.runs(self.kv.layer, b)
        if self.as_computed:
            return sdpa(q, *self.contiguous(), scale=scale, mask=mask, **extra)
        latest = (lambda x: x[:, :, -window:]) if window is not None and mask is None else (lambda x: x)
        if self.quantization and sdpa is mx.fast.scaled_dot_product_attention and not extra:
            k, v = pool.storage.read_quantized(self.kv.layer, runs)
            return quantized.attention(q, [latest(x) for x in k], [latest(x) for x in v], scale, mask,
                                       **self.quantization)
        k, v = pool.read(self.kv.layer, runs)
        return sdpa(q, latest(k), latest(v), scale=scale, mask=mask, **extra)

    def attend_batch(self, q: mx.array, scale: float, window: int | None = None,
                     sdpa=mx.fast.scaled_dot_product_attention, **extra) -> mx.array:
        """MLX's attention of the new tokens of every member, q (B, Hq, L, D) (one token each
        decoding, k+1 verifying k drafts), in one call: the members' K/V gathered through their
        blocks into (B, kv_heads, S, D) (S: the longest member's blocks' slots) and a (B, 1, L,
        S) mask of the keys each new token sees (its spec, its position, `window`), both indices
        and mask built on the host. Dispatches: one Gather for K and one for V (for each of
        codes, scales and biases when quantized), then the attention, whatever B."""
        step, layer = self.kv.step, self.kv.layer
        pool, bs = step.pool, step.pool.block_size
        blocks = pool.blocks_of([step.sids[b] for b in self.group.members], cdiv(self.longest, bs))
        slots = mx.array((blocks[:, :, None] * bs + np.arange(bs)).reshape(len(blocks), -1))
        keys = np.arange(slots.shape[1])
        mask = mx.array(np.stack([step.visible(layer, b, keys, np.arange(step.starts[b], step.lengths[b]), window)
                                  for b in self.group.members]))[:, None]
        if self.quantization and sdpa is mx.fast.scaled_dot_product_attention and not extra:
            k, v = pool.storage.gather_quantized(layer, slots)
            return quantized.attention(q, k, v, scale, mask, **self.quantization)
        k, v = pool.storage.gather(layer, slots)
        return sdpa(q, k, v, scale=scale, mask=mask, **extra)

    def layout(self) -> dict:
        """How attention reads the K/V, as its op's shape values: through the pool (its block
        size, blocks and the widest block table a sequence may need, in tokens; kv_bits and
        kv_group_size where stored quantized), or nothing where it reads a quantized pool's
        step as computed (a lone first prompt: dense and contiguous, see as_computed)."""
        if self.quantization and self.as_computed:
            return {}
        pool = self.kv.step.pool
        out = dict(block_size=pool.block_size, num_blocks=pool.num_blocks, width=pool.max_blocks * pool.block_size)
        if self.quantization:
            out.update(kv_bits=self.quantization["bits"], kv_group_size=self.quantization["group_size"])
        return out

    def paged(self, width: int) -> dict:
        """The inputs of our paged decode kernel: the pool's K/V arrays (kv_heads, num_blocks,
        block_size, ...; codes, scales and biases when quantized), the members' block table
        `width` blocks wide, and their lengths."""
        table, lens = self.kv.step.block_table(self.group.members, width)
        return {**self.kv.step.pool.storage.paged(self.kv.layer), "block_table": table, "seq_lens": lens}
