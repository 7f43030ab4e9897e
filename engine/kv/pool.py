"""A preallocated, block-structured KV cache shared by many sequences: the allocator's blocks
(engine/kv/blocks.py), the storage's tensors (engine/kv/storage.py) and each layer's spec
(engine/kv/spec.py), with the sequences that hold them. A fork shares its parent's blocks
copy-on-write; a forward pass sees the pool only through a `Step` (`KVPool.begin`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from metalforge.engine.kv.blocks import BlockAllocator
from metalforge.engine.kv.spec import FullAttention, SinkWindow
from metalforge.engine.kv.step import Step
from metalforge.engine.kv.storage import Storage
from metalforge.errors import MetalforgeError
from metalforge.intmath import cdiv


# Tokens per block unless engine.load(block_size=) says otherwise (the op plan's paged layout too).
BLOCK_SIZE = 16


class PoolExhausted(MetalforgeError):
    """The KV pool has no free block for a request; no sequence was changed."""


@dataclass
class Sequence:
    blocks: list[int | None] = field(default_factory=list)   # None: given back, out of every layer's window
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)   # each held token's position (RoPE's), pending ones too
    pending: int = 0     # tokens written by a step whose ids the host has not read yet (see KVPool.settle)
    window: SinkWindow | None = None   # its own sliding window (a request's max_kv_size), see KVPool.spec

    @property
    def length(self) -> int:
        return len(self.positions)

    @property
    def next_position(self) -> int:
        return self.positions[-1] + 1 if self.positions else 0


class KVPool:
    def __init__(self, storage: Storage, block_size: int, num_blocks: int, max_seq_len: int, specs=None):
        if block_size < 1 or num_blocks < 1:
            raise MetalforgeError("the KV pool needs a positive block size and at least one block")
        self.storage, self.blocks = storage, BlockAllocator(num_blocks, block_size)
        self.specs = list(specs or [FullAttention()] * storage.layers)
        self.block_size, self.num_blocks, self.max_seq_len = block_size, num_blocks, max_seq_len
        self.max_blocks = self.blocks.blocks_for(max_seq_len)
        self.seqs: dict[int, Sequence] = {}
        self._next_id = 0

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return self.storage.layers

    @property
    def dtype(self):
        return self.storage.dtype

    @property
    def block_bytes(self) -> int:
        return self.storage.block_bytes

    @property
    def reserved_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def free_blocks(self) -> int:
        return self.blocks.free_blocks

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    # ---- sequences -----------------------------------------------------------------------------
    def add_sequence(self, window: SinkWindow | None = None) -> int:
        sid = self._next_id
        self._next_id += 1
        self.seqs[sid] = Sequence(window=window)
        return sid

    def seq(self, sid: int) -> Sequence:
        try:
            return self.seqs[sid]
        except KeyError:
            raise MetalforgeError(f"no sequence {sid} in the KV pool (have: {sorted(self.seqs)})") from None

    def fork(self, sid: int, length: int | None = None, window: SinkWindow | None = None) -> int:
        """A new sequence sharing the blocks of `sid`'s first `length` tokens (all by default),
        with its own `window`; the first write to a shared block copies it."""
        parent = self.seq(sid)
        length = parent.length if length is None else length
        if parent.pending or not 0 <= length <= parent.length:
            raise MetalforgeError(f"fork({sid}, {length}): the sequence holds {parent.length} settled tokens")
        blocks = parent.blocks[:self.blocks.blocks_for(length)]
        if not self.can_fork(sid, length, window):
            raise MetalforgeError(f"fork({sid}, {length}): the sequence gave back blocks a fork of that length "
                                  "reads (they fell out of its window)")
        child = self.add_sequence()
        self.seqs[child] = Sequence(list(blocks), list(parent.tokens[:length]), list(parent.positions[:length]),
                                    window=window)
        self.blocks.share(blocks)
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
        keep = self.blocks.blocks_for(start)
        self.blocks.release(s.blocks[keep:])
        del s.blocks[keep:], s.positions[start:]
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

    # ---- windows ---------------------------------------------------------------------------------
    def spec(self, layer: int, sid: int):
        """What `layer` reads of sequence `sid`: the layer's spec, or the sequence's own window
        where the layer attends to everything."""
        return self._spec(layer, self.seqs[sid].window)

    def _spec(self, layer: int, window: SinkWindow | None):
        spec = self.specs[layer]
        return window if window is not None and isinstance(spec, FullAttention) else spec

    def dead(self, first: int, window: SinkWindow | None = None) -> tuple[int, int]:
        """[start, end) of positions no layer reads for queries at `first` or later."""
        ranges = [self._spec(layer, window).dead(first) for layer in range(self.layers)]
        start, end = max(r[0] for r in ranges), min(r[1] for r in ranges)
        return (start, end) if start < end else (0, 0)

    def can_fork(self, sid: int, length: int, window: SinkWindow | None = None) -> bool:
        """Whether a fork of `sid`'s first `length` tokens with `window` finds every block it reads."""
        s = self.seq(sid)
        start, end = self.dead(length, window)
        bs = self.block_size
        return all(b is not None or start <= i * bs < (i + 1) * bs <= end
                   for i, b in enumerate(s.blocks[:self.blocks.blocks_for(length)]))

    def _drop_dead(self, sid: int) -> None:
        """Give back the blocks of `sid` wholly out of every layer's window for its next token:
        memory stays flat however long a windowed sequence grows."""
        s = self.seqs[sid]
        start, end = self.dead(s.length, s.window)
        for i in range(cdiv(start, self.block_size), min(end // self.block_size, len(s.blocks))):
            if s.blocks[i] is not None:
                self.blocks.release([s.blocks[i]])
                s.blocks[i] = None

    # ---- room ----------------------------------------------------------------------------------
    def needed(self, sid: int, new_tokens: int) -> tuple[int, bool]:
        """(new blocks, whether the last block must be copied first) to append `new_tokens`."""
        s = self.seq(sid)
        total = s.length + new_tokens
        if total > self.max_seq_len:
            raise PoolExhausted(f"sequence {sid} would hold {total} tokens, over the engine's maximum sequence "
                                f"length of {self.max_seq_len}")
        need = self.blocks.blocks_for(total) - len(s.blocks)
        cow = bool(new_tokens) and bool(s.length % self.block_size) and self.blocks.shared(s.blocks[-1])
        return need, cow

    def reserve_all(self, counts: dict[int, int]) -> None:
        """Make room for `counts[sid]` more tokens in each sequence: new blocks, and a private copy
        of a shared partial block about to be written. All or nothing: the blocks of every
        sequence are counted before any is taken, so a failure changes no sequence."""
        for sid in counts:
            self._drop_dead(sid)
        plans = [(sid, *self.needed(sid, n)) for sid, n in counts.items()]
        total = sum(need + cow for _, need, cow in plans)
        free = self.free_blocks
        if total > free:
            sids = list(counts)
            who = f"sequence {sids[0]}" if len(sids) == 1 else f"sequences {sids}"
            raise PoolExhausted(
                f"KV pool exhausted: {total} more blocks of {self.block_size} tokens needed for {who}, "
                f"{free} free of {self.num_blocks} (budget {self.capacity_tokens} tokens, "
                f"{self.reserved_bytes / 2**20:.1f} MiB); remove sequences or load with a larger kv_tokens")
        for sid, need, cow in plans:
            s = self.seqs[sid]
            if cow:
                old = s.blocks[-1]
                new = self.blocks.take(s.blocks[-2] if len(s.blocks) > 1 else None)
                self.storage.copy(self.blocks.span(old), self.blocks.span(new))
                self.blocks.release([old])
                s.blocks[-1] = new
            for _ in range(need):
                s.blocks.append(self.blocks.take(s.blocks[-1] if s.blocks else None))

    # ---- reading -------------------------------------------------------------------------------
    def runs(self, sid: int, length: int, start: int = 0) -> list[tuple[int, int]]:
        """(first slot, token count) of each consecutive run holding positions [start, length)."""
        s = self.seq(sid)
        first = start // self.block_size
        runs = self.blocks.runs(s.blocks[first:], length - first * self.block_size)
        skip = start - first * self.block_size
        if runs and skip:
            runs[0] = (runs[0][0] + skip, runs[0][1] - skip)
        return runs

    def ranges(self, sid: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The runs holding each [start, end) of `ranges`, in order."""
        return [run for start, end in ranges if end > start for run in self.runs(sid, end, start)]

    def read(self, layer: int, runs: list[tuple[int, int]]):
        return self.storage.read(layer, runs)

    def block_table(self, sids: list[int], lengths: list[int], width: int):
        """Each sequence's blocks padded to `width` columns (int32), and the lengths."""
        return mx.array(self.blocks_of(sids, width), dtype=mx.int32), mx.array(lengths, dtype=mx.int32)

    def blocks_of(self, sids: list[int], width: int) -> np.ndarray:
        """(sequences, width) host array of each sequence's blocks, 0 past its end and where a
        window gave one back (what reads them masks those keys)."""
        rows = [[b or 0 for b in self.seq(s).blocks[:width]] for s in sids]
        return np.array([row + [0] * (width - len(row)) for row in rows], dtype=np.int32).reshape(len(sids), width)

    # ---- a forward pass -------------------------------------------------------------------------
    def begin(self, counts: dict[int, int], logits_at: dict[int, list[int]] | None = None) -> Step:
        """Reserve room for `counts[sid]` new tokens of each sequence (all or nothing) and return
        the step that writes and reads them: any mix of prompts and single tokens. `logits_at`:
        which of each sequence's new tokens need logits (indices; default: its last)."""
        if not counts or min(counts.values()) < 1:
            raise MetalforgeError("a step needs at least one new token for each of its sequences")
        self.reserve_all(counts)
        return Step(self, counts, logits_at)
