"""One forward pass's narrow view of the pool, in the spirit of mlx-lm's `update_and_fetch`.

A step is ragged: {sequence: n new tokens}, any mix of prompts and single tokens, laid out
sequence after sequence along one token axis. It knows each new token's position (the
sequences' stored positions), where its K/V go, which tokens need logits, and for attention
its groups: runs of one-token sequences decoded together, and each prompt on its own. The
write slots, block tables and read runs are found once per step and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Group:
    """Sequences attention serves together: `members` (indices into the step's sequences),
    each with `new` tokens (1 for a decode group, one member for a prompt), at `tokens` of the
    step's token axis."""

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
        self._where = slice(slots[0], slots[0] + len(slots)) if contiguous else mx.array(slots, dtype=mx.int32)
        self.groups = self._groups()
        self._tables: dict[tuple, tuple] = {}
        self._runs: dict[tuple, list] = {}

    def _groups(self) -> list[Group]:
        out, start = [], 0
        for b, n in enumerate(self.counts):
            last = out[-1] if out else None
            if n == 1 and last is not None and last.new == 1:
                out[-1] = Group(last.members + (b,), 1, slice(last.tokens.start, start + 1))
            else:
                out.append(Group((b,), n, slice(start, start + n)))
            start += n
        return out

    @property
    def longest(self) -> int:
        """Positions held by the step's longest sequence, new tokens included (a host number)."""
        return max(self.lengths)

    def runs(self, layer: int, b: int) -> list[tuple[int, int]]:
        """Sequence b's runs of consecutive slots that layer `layer` reads."""
        spec = self.pool.specs[layer]
        start = spec.first_visible(self.lengths[b])
        if (start, b) not in self._runs:
            self._runs[(start, b)] = self.pool.runs(self.sids[b], self.lengths[b], start)
        return self._runs[(start, b)]

    def update_and_fetch(self, layer: int, k: mx.array, v: mx.array) -> "LayerKV":
        """Write the new tokens' k, v (1, kv_heads, tokens, head_dim); return what attention reads."""
        self.pool.storage.write(layer, self._where, k[0], v[0])
        return LayerKV(self, layer)

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

    def pool_sizes(self) -> dict:
        """The pool's layout as attention's op sees it: block size, blocks, and the widest block
        table a sequence may need (in tokens)."""
        pool = self.kv.step.pool
        return dict(block_size=pool.block_size, num_blocks=pool.num_blocks, width=pool.max_blocks * pool.block_size)

    def paged(self, width: int) -> dict:
        """The inputs of our paged decode kernel: the pool (kv_heads, num_blocks, block_size,
        head_dim), the members' block table `width` blocks wide, and their lengths."""
        keys, values = self.kv.step.pool.storage.paged(self.kv.layer)
        table, lens = self.kv.step.block_table(self.group.members, width)
        return {"keys": keys, "values": values, "block_table": table, "seq_lens": lens}
