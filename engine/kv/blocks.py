"""Which KV blocks are free, who holds each, and where a new one goes: bookkeeping only, no tensors.

The allocator keeps sequences consecutive where it can (a sequence grows into the block after
its last; a new one starts where the most room is), because storage reads a sequence stored in
consecutive blocks in place. A fork shares its parent's blocks (a reference each), and a block
goes back when its last holder lets go. A sequence's list of blocks may hold None where a
sliding window gave a block back (see KVPool.reserve_all): those are skipped here.
"""
from __future__ import annotations

from metalforge.intmath import cdiv


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refcount = [0] * num_blocks

    @property
    def free_blocks(self) -> int:
        return self.refcount.count(0)

    def blocks_for(self, tokens: int) -> int:
        return cdiv(tokens, self.block_size)

    def shared(self, block: int) -> bool:
        return self.refcount[block] > 1

    def share(self, blocks: list[int | None]) -> None:
        for b in blocks:
            if b is not None:
                self.refcount[b] += 1

    def release(self, blocks: list[int | None]) -> None:
        for b in blocks:
            if b is not None:
                self.refcount[b] -= 1

    def take(self, after: int | None) -> int:
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

    def runs(self, blocks: list[int], length: int) -> list[tuple[int, int]]:
        """(first slot, token count) of each consecutive run of `blocks` covering `length` tokens."""
        out, left = [], length
        for b in blocks[:cdiv(length, self.block_size)]:
            n = min(self.block_size, left)
            if out and out[-1][0] + out[-1][1] == b * self.block_size:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((b * self.block_size, n))
            left -= n
        return out

    def slots(self, blocks: list[int], start: int, count: int) -> list[int]:
        """Slots (positions along storage's token axis) of a sequence's tokens [start, start + count)."""
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, start + count)]

    def span(self, block: int) -> slice:
        return slice(block * self.block_size, (block + 1) * self.block_size)
