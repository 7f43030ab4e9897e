"""A preallocated, block-structured KV cache shared by many sequences.

Per layer, K and V are each one (kv_heads, num_blocks * block_size, head_dim) array: block b holds
positions [b * block_size, (b + 1) * block_size) of every head. Head-major, because a sequence whose
blocks are consecutive is then one strided slice per head, which MLX's attention reads in place:
nothing per decoded token copies the sequence. Our decode kernel reads any block order through a
block table. The allocator keeps sequences consecutive where it can (a sequence grows into the
block after its last; a new one starts where the most room is); a fork shares its parent's blocks
copy-on-write, and only a sequence left in several runs is copied together to be read by MLX.
Nothing is allocated per token: writes go into the existing arrays.

A forward pass sees the pool only through a `Step` (`KVPool.begin`): its sequences, where the new
tokens go, per layer `update_and_fetch`, and `commit`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from metalforge.errors import MetalforgeError
from metalforge.intmath import cdiv


class PoolExhausted(MetalforgeError):
    """The KV pool has no free block for a request; no sequence was changed."""


@dataclass
class Sequence:
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    pending: int = 0     # tokens written by a step whose ids the host has not read yet (see KVPool.settle)

    @property
    def length(self) -> int:
        return len(self.tokens) + self.pending


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 max_seq_len: int, dtype=mx.float16):
        if block_size < 1 or num_blocks < 1:
            raise MetalforgeError("the KV pool needs a positive block size and at least one block")
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.block_size, self.num_blocks, self.dtype = block_size, num_blocks, dtype
        self.max_seq_len = max_seq_len
        self.max_blocks = cdiv(max_seq_len, block_size)
        shape = (kv_heads, num_blocks * block_size, head_dim)
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]
        mx.eval(self.k, self.v)
        self.refcount = [0] * num_blocks
        self.seqs: dict[int, Sequence] = {}
        self._next_id = 0

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.block_size * self.head_dim * self.dtype.size

    @property
    def reserved_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def free_blocks(self) -> int:
        return self.refcount.count(0)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    # ---- sequences -----------------------------------------------------------------------------
    def add_sequence(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self.seqs[sid] = Sequence()
        return sid

    def seq(self, sid: int) -> Sequence:
        try:
            return self.seqs[sid]
        except KeyError:
            raise MetalforgeError(f"no sequence {sid} in the KV pool (have: {sorted(self.seqs)})") from None

    def fork(self, sid: int, length: int | None = None) -> int:
        """A new sequence sharing the blocks of `sid`'s first `length` tokens (all by default); the
        first write to a shared block copies it."""
        parent = self.seq(sid)
        length = parent.length if length is None else length
        if parent.pending or not 0 <= length <= parent.length:
            raise MetalforgeError(f"fork({sid}, {length}): the sequence holds {parent.length} settled tokens")
        child = self.add_sequence()
        blocks = parent.blocks[:cdiv(length, self.block_size)]
        self.seqs[child] = Sequence(list(blocks), list(parent.tokens[:length]))
        for b in blocks:
            self.refcount[b] += 1
        return child

    def remove(self, sid: int, start: int = 0, end: int | None = None) -> None:
        """Drop tokens [start, end) of a sequence: the whole sequence (start=0, end=None) or a
        suffix. A middle range is refused: later tokens were rotated for their old positions."""
        s = self.seq(sid)
        end = s.length if end is None else end
        if not 0 <= start <= end <= s.length:
            raise MetalforgeError(f"remove({sid}, {start}, {end}): range outside the sequence's {s.length} tokens")
        if end != s.length:
            raise MetalforgeError(f"remove({sid}, {start}, {end}): only a suffix (end={s.length}) or the whole "
                                  "sequence can be removed; RoPE positions of later tokens would be wrong")
        keep = cdiv(start, self.block_size)
        for b in s.blocks[keep:]:
            self._release(b)
        del s.blocks[keep:]
        s.pending = max(0, start - len(s.tokens))
        del s.tokens[start:]
        if start == 0:
            del self.seqs[sid]

    def clear(self) -> None:
        for sid in list(self.seqs):
            self.remove(sid)

    def settle(self, sid: int, ids: list[int]) -> None:
        """Name the ids of a sequence's pending tokens, oldest first (see Step.commit)."""
        s = self.seq(sid)
        if len(ids) > s.pending:
            raise MetalforgeError(f"sequence {sid}: {len(ids)} token ids for {s.pending} pending positions")
        s.tokens.extend(ids)
        s.pending -= len(ids)

    # ---- blocks --------------------------------------------------------------------------------
    def _release(self, block: int) -> None:
        self.refcount[block] -= 1

    def _take(self, after: int | None) -> int:
        """A free block: the one right after `after` when free (the sequence stays one run), else
        one in the largest free run: its start when nothing before it may grow into it, else its
        middle, leaving room for the sequence that ends before it."""
        if after is not None and after + 1 < self.num_blocks and self.refcount[after + 1] == 0:
            b = after + 1
        else:
            best, best_len, start = 0, 0, None
            for i, c in enumerate(self.refcount + [1]):
                if c == 0 and start is None:
                    start = i
                elif c and start is not None:
                    if i - start > best_len:
                        best, best_len = start, i - start
                    start = None
            b = best if best == 0 or self.refcount[best - 1] == 0 else best + best_len // 2
        self.refcount[b] = 1
        return b

    def reserve_all(self, sids: list[int], new_tokens: list[int]) -> None:
        """Make room for `new_tokens[i]` more tokens in sequence `sids[i]`: new blocks, and a private
        copy of a shared partial block about to be written. All or nothing: the blocks of every
        sequence are counted before any is taken, so a failure changes no sequence."""
        plans = [(sid, *self.needed(sid, n)) for sid, n in zip(sids, new_tokens)]
        total = sum(need + cow for _, need, cow in plans)
        free = self.free_blocks
        if total > free:
            who = f"sequence {sids[0]}" if len(sids) == 1 else f"sequences {sids}"
            raise PoolExhausted(
                f"KV pool exhausted: {total} more blocks of {self.block_size} tokens needed for {who}, "
                f"{free} free of {self.num_blocks} (budget {self.capacity_tokens} tokens, "
                f"{self.reserved_bytes / 2**20:.1f} MiB); remove sequences or load with a larger kv_tokens")
        for sid, need, cow in plans:
            s = self.seqs[sid]
            if cow:
                old = s.blocks[-1]
                new = self._take(s.blocks[-2] if len(s.blocks) > 1 else None)
                src, dst = self._span(old), self._span(new)
                for layer in range(self.layers):
                    self.k[layer][:, dst] = self.k[layer][:, src]
                    self.v[layer][:, dst] = self.v[layer][:, src]
                self._release(old)
                s.blocks[-1] = new
            for _ in range(need):
                s.blocks.append(self._take(s.blocks[-1] if s.blocks else None))

    def needed(self, sid: int, new_tokens: int) -> tuple[int, bool]:
        """(new blocks, whether the last block must be copied first) to append `new_tokens`."""
        s = self.seq(sid)
        total = s.length + new_tokens
        if total > self.max_seq_len:
            raise PoolExhausted(f"sequence {sid} would hold {total} tokens, over the engine's maximum sequence "
                                f"length of {self.max_seq_len}")
        need = cdiv(total, self.block_size) - len(s.blocks)
        cow = bool(new_tokens) and bool(s.length % self.block_size) and self.refcount[s.blocks[-1]] > 1
        return need, cow

    def _span(self, block: int) -> slice:
        return slice(block * self.block_size, (block + 1) * self.block_size)

    def runs(self, sid: int, length: int) -> list[tuple[int, int]]:
        """(first slot, token count) of each consecutive run of blocks covering `length` tokens."""
        out, left = [], length
        for b in self.seq(sid).blocks[:cdiv(length, self.block_size)]:
            n = min(self.block_size, left)
            if out and out[-1][0] + out[-1][1] == b * self.block_size:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((b * self.block_size, n))
            left -= n
        return out

    def slots(self, sid: int, start: int, count: int) -> list[int]:
        """Slots (positions along the pool's token axis) of positions [start, start + count)."""
        blocks, bs = self.seq(sid).blocks, self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, start + count)]

    # ---- reading -------------------------------------------------------------------------------
    def read(self, layer: int, runs: list[tuple[int, int]]) -> tuple[mx.array, mx.array]:
        """The K and V of `runs` (see `runs`) as (1, kv_heads, length, head_dim): a view of the pool
        when the sequence is one run, else the runs copied together."""
        if not runs:
            empty = mx.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
            return empty, empty

        def take(x):
            parts = [x[:, a:a + n] for a, n in runs]
            return (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1))[None]
        return take(self.k[layer]), take(self.v[layer])

    def paged(self, layer: int) -> tuple[mx.array, mx.array]:
        shape = (self.kv_heads, self.num_blocks, self.block_size, self.head_dim)
        return self.k[layer].reshape(shape), self.v[layer].reshape(shape)

    def block_table(self, sids: list[int], lengths: list[int], width: int) -> tuple[mx.array, mx.array]:
        """Each sequence's blocks padded to `width` columns, and the lengths."""
        table = [self.seq(s).blocks[:width] + [0] * (width - len(self.seq(s).blocks[:width])) for s in sids]
        return mx.array(table, dtype=mx.int32), mx.array(lengths, dtype=mx.int32)

    # ---- a forward pass -------------------------------------------------------------------------
    def begin(self, sids: list[int], counts: list[int]) -> "Step":
        """Reserve room for `counts[i]` new tokens of each sequence (all or nothing) and return the
        step that writes and reads them: any number of tokens for one sequence (a prompt), or one
        for each of several (batched decode)."""
        if len(sids) > 1 and set(counts) != {1}:
            raise MetalforgeError("a batched step takes exactly one new token per sequence")
        self.reserve_all(sids, counts)
        return Step(self, list(sids), counts[0])


class Step:
    """One forward pass's narrow view of the pool, in the spirit of mlx-lm's `update_and_fetch`:
    its sequences, the new tokens' positions, per layer the write of their K/V and what attention
    reads, and `commit` of the token ids once known. The write slots, block table and read runs are
    computed once per step and shared by every layer."""

    def __init__(self, pool: KVPool, sids: list[int], new: int):
        self.pool, self.sids, self.new = pool, sids, new
        self.starts = [pool.seq(s).length for s in sids]
        self.lengths = [s + new for s in self.starts]
        self.positions = mx.array([[s + i for i in range(new)] for s in self.starts], dtype=mx.int32)
        slots = [x for sid, start in zip(sids, self.starts) for x in pool.slots(sid, start, new)]
        contiguous = all(b - a == 1 for a, b in zip(slots, slots[1:]))
        self._where = slice(slots[0], slots[0] + len(slots)) if contiguous else mx.array(slots, dtype=mx.int32)
        for sid in sids:
            pool.seq(sid).pending += new
        self._tables: dict[int, tuple] = {}
        self._runs: dict[int, list] = {}

    def runs(self, b: int) -> list[tuple[int, int]]:
        """Sequence b's runs of consecutive slots, found once per step for every layer."""
        if b not in self._runs:
            self._runs[b] = self.pool.runs(self.sids[b], self.lengths[b])
        return self._runs[b]

    def update_and_fetch(self, layer: int, k: mx.array, v: mx.array) -> "LayerKV":
        """Write the new tokens' k, v (B, kv_heads, new, head_dim) and return what attention reads."""
        pool = self.pool
        flat = lambda x: x.transpose(1, 0, 2, 3).reshape(pool.kv_heads, -1, pool.head_dim).astype(pool.dtype)
        pool.k[layer][:, self._where] = flat(k)
        pool.v[layer][:, self._where] = flat(v)
        return LayerKV(self, layer)

    def block_table(self, width: int) -> tuple[mx.array, mx.array]:
        if width not in self._tables:
            self._tables[width] = self.pool.block_table(self.sids, self.lengths, width)
        return self._tables[width]

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

    def sequence(self, b: int) -> tuple[mx.array, mx.array]:
        """Sequence b's K and V, (1, kv_heads, length, head_dim), a view when it is one run."""
        return self.step.pool.read(self.layer, self.step.runs(b))

    @property
    def kv_heads(self) -> int:
        return self.step.pool.kv_heads

    @property
    def longest(self) -> int:
        """Keys of the step's longest sequence, new tokens included (a host number)."""
        return max(self.step.lengths)

    def pool_sizes(self) -> dict:
        """The pool's layout as attention's op sees it: block size, blocks, and the widest block
        table a sequence may need (in tokens)."""
        pool = self.step.pool
        return dict(block_size=pool.block_size, num_blocks=pool.num_blocks, width=pool.max_blocks * pool.block_size)

    def paged(self, width: int) -> dict:
        """The inputs of our paged decode kernel: the pool (kv_heads, num_blocks, block_size,
        head_dim), the block table `width` blocks wide, and the lengths."""
        keys, values = self.step.pool.paged(self.layer)
        table, lens = self.step.block_table(width)
        return {"keys": keys, "values": values, "block_table": table, "seq_lens": lens}
