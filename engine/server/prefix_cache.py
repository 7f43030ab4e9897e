"""The prefix cache (OpenAI's "prompt caching"): finished conversations stay in the pool as kept
prefixes (Engine.keep_prefix), so the next turn of a chat forks them and prefills only its new tokens.
Bounded by a block budget, least recently used first out. Used by the engine thread only."""
from __future__ import annotations

import os
from collections import OrderedDict

from metalforge.intmath import cdiv


class PrefixCache:
    def __init__(self, engine, budget_blocks: int):
        self.engine, self.budget = engine, budget_blocks
        self.block_size = engine.pool.block_size
        self.entries: OrderedDict[int, list[int]] = OrderedDict()   # kept sequence -> its tokens, oldest first

    @property
    def blocks(self) -> int:
        """Blocks the kept prefixes hold (blocks shared with live requests counted too)."""
        return sum(cdiv(len(t), self.block_size) for t in self.entries.values())

    def keep(self, seq: int) -> None:
        """Take a finished request's kept sequence (offered to later prompts); an identical older
        entry goes."""
        self.engine.keep_prefix(seq)
        tokens = self.engine.tokens(seq)
        for old, held in list(self.entries.items()):
            if held == tokens:
                self._drop(old)
        self.entries[seq] = tokens
        while self.entries and self.blocks > self.budget:
            self.evict()

    def prepare(self, ids: list[int]) -> None:
        """Before `ids` joins the batch: mark the entry sharing most of its leading tokens as used
        (a whole entry before a part of one). When only part of an entry is shared (another
        conversation with the same system prompt, a reply re-tokenized differently, a stop string
        cut off), that part becomes an entry of its own, which the engine's rule (a kept prefix is
        used whole) then forks."""
        best, best_key = None, (0, False)
        for seq, tokens in self.entries.items():
            n = len(os.path.commonprefix([ids, tokens]))
            if (n, n == len(tokens)) > best_key:
                best, best_key = seq, (n, n == len(tokens))
        if best is None:
            return
        self.entries.move_to_end(best)
        shared, whole = best_key
        if not whole and shared >= self.block_size:
            part = self.engine.fork(best)
            self.engine.remove(part, shared)
            self.engine.keep_prefix(part)
            self.entries[part] = self.entries[best][:shared]
            while self.blocks > self.budget and len(self.entries) > 1:
                self.evict()

    def evict(self) -> bool:
        """Drop the least recently used entry; False when there is none."""
        if not self.entries:
            return False
        self._drop(next(iter(self.entries)))
        return True

    def clear(self) -> None:
        while self.evict():
            pass

    def _drop(self, seq: int) -> None:
        del self.entries[seq]
        self.engine.remove(seq)
