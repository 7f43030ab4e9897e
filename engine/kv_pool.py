"""A preallocated, block-structured KV cache shared by many sequences.

Per layer, K and V live in one array of `num_blocks` blocks of `block_size` tokens, laid out
(blocks, kv_heads, block_size, head_dim) as the decode attention kernel reads it through a
block table. Sequences own lists of blocks; a fork shares its parent's blocks copy-on-write.
Nothing is allocated per token: writes scatter into the existing arrays.
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

    @property
    def length(self) -> int:
        return len(self.tokens)


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 max_seq_len: int, dtype=mx.float16):
        if block_size < 1 or num_blocks < 1:
            raise MetalforgeError("the KV pool needs a positive block size and at least one block")
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.block_size, self.num_blocks, self.dtype = block_size, num_blocks, dtype
        self.max_blocks = cdiv(max_seq_len, block_size)
        rows = num_blocks * kv_heads * block_size
        self.k = [mx.zeros((rows, head_dim), dtype=dtype) for _ in range(layers)]
        self.v = [mx.zeros((rows, head_dim), dtype=dtype) for _ in range(layers)]
        mx.eval(self.k, self.v)
        self.refcount = [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))
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
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

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

    def fork(self, sid: int) -> int:
        """A new sequence sharing every block of `sid`; the first write to a shared block copies it."""
        parent = self.seq(sid)
        child = self.add_sequence()
        self.seqs[child] = Sequence(list(parent.blocks), list(parent.tokens))
        for b in parent.blocks:
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
        del s.tokens[start:]
        if start == 0:
            del self.seqs[sid]

    def clear(self) -> None:
        for sid in list(self.seqs):
            self.remove(sid)
        self.seqs.clear()

    def _release(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free.append(block)

    def _take(self) -> int:
        b = self.free.pop()
        self.refcount[b] = 1
        return b

    def reserve(self, sid: int, new_tokens: int) -> None:
        """Make room for `new_tokens` more tokens: new blocks, and a private copy of a shared
        partial block about to be written. All or nothing: on exhaustion nothing changes."""
        self.reserve_all([sid], [new_tokens])

    def reserve_all(self, sids: list[int], new_tokens: list[int]) -> None:
        """`reserve` for several sequences at once (a batched step), all or nothing: the blocks of
        every sequence are counted before any is taken, so a failure changes no sequence."""
        plans = [(sid, *self._needed(sid, n)) for sid, n in zip(sids, new_tokens)]
        total = sum(need + cow for _, need, cow in plans)
        if total > len(self.free):
            who = f"sequence {sids[0]}" if len(sids) == 1 else f"sequences {sids}"
            raise PoolExhausted(
                f"KV pool exhausted: {total} more blocks of {self.block_size} tokens needed for {who}, "
                f"{len(self.free)} free of {self.num_blocks} (budget {self.capacity_tokens} tokens, "
                f"{self.reserved_bytes / 2**20:.1f} MiB); remove sequences or load with a larger kv_tokens")
        for sid, need, cow in plans:
            s = self.seqs[sid]
            if cow:
                old = s.blocks[-1]
                new = self._take()
                for layer in range(self.layers):
                    src, dst = self._block_rows(old), self._block_rows(new)
                    self.k[layer][dst] = self.k[layer][src]
                    self.v[layer][dst] = self.v[layer][src]
                self._release(old)
                s.blocks[-1] = new
            for _ in range(need):
                s.blocks.append(self._take())

    def _needed(self, sid: int, new_tokens: int) -> tuple[int, bool]:
        """(new blocks, whether the last block must be copied first) to append `new_tokens`."""
        s = self.seq(sid)
        total = s.length + new_tokens
        if cdiv(total, self.block_size) > self.max_blocks:
            raise PoolExhausted(f"sequence {sid} would hold {total} tokens, over the engine's maximum sequence "
                                f"length of {self.max_blocks * self.block_size}")
        need = cdiv(total, self.block_size) - len(s.blocks)
        cow = bool(new_tokens) and bool(s.length % self.block_size) and self.refcount[s.blocks[-1]] > 1
        return need, cow

    def _block_rows(self, block: int) -> mx.array:
        n = self.kv_heads * self.block_size
        return mx.arange(block * n, (block + 1) * n)

    def rows(self, sid: int, start: int, count: int) -> mx.array:
        """Flat row indices (kv_heads, count) of positions [start, start + count) of a sequence."""
        s = self.seq(sid)
        pos = mx.arange(start, start + count)
        blocks = mx.array(s.blocks, dtype=mx.int32)[pos // self.block_size]
        heads = mx.arange(self.kv_heads)[:, None]
        return (blocks[None, :] * self.kv_heads + heads) * self.block_size + (pos % self.block_size)[None, :]

    def write(self, layer: int, rows: mx.array, k: mx.array, v: mx.array) -> None:
        """k, v: (kv_heads, count, head_dim) for the rows of `rows()`."""
        flat = rows.reshape(-1)
        self.k[layer][flat] = k.reshape(-1, self.head_dim).astype(self.dtype)
        self.v[layer][flat] = v.reshape(-1, self.head_dim).astype(self.dtype)

    def gather(self, layer: int, sid: int, length: int | None = None) -> tuple[mx.array, mx.array]:
        """A sequence's K and V as contiguous (1, kv_heads, length, head_dim) arrays."""
        length = self.seq(sid).length if length is None else length
        idx = self.rows(sid, 0, length).reshape(-1)
        shape = (1, self.kv_heads, length, self.head_dim)
        return self.k[layer][idx].reshape(shape), self.v[layer][idx].reshape(shape)

    def paged(self, layer: int) -> tuple[mx.array, mx.array]:
        shape = (self.num_blocks, self.kv_heads, self.block_size, self.head_dim)
        return self.k[layer].reshape(shape), self.v[layer].reshape(shape)

    def block_table(self, sids: list[int], lengths: list[int]) -> tuple[mx.array, mx.array]:
        table = [self.seq(s).blocks + [0] * (self.max_blocks - len(self.seq(s).blocks)) for s in sids]
        return mx.array(table, dtype=mx.int32), mx.array(lengths, dtype=mx.int32)
