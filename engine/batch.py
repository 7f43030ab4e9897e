"""Many sequences at once: continuous batching over the engine's block pool.

Requests join (`add`) and leave (`cancel`, or when they stop) between steps. A request that does
not fit waits in a bounded first-come queue until blocks free: it is admitted when the pool has
room for its whole run (prompt plus max_tokens, up to max_seq_len; at most the whole pool) beside
the room every admitted request may still take, so admitted requests never starve each other.
Each `step` first prefills the requests admitted since the last one (one prompt at a time,
chunked), then decodes one token for every live request in a single forward pass through the
pool. A request that reaches max_seq_len, or finds the pool full (blocks held outside the batch),
ends alone with that reason; the others go on. Each request has its own sampler and stop
conditions. A prompt sharing at least one block of leading tokens with a kept prefix or another
request's sequence starts as a fork of it: the shared blocks are stored once and not prefilled again.

    batch = engine.batch()
    a = batch.add("Once upon", max_tokens=32)
    for rid, token in batch:            # (request id, Token) as they are produced
        if rid == a and token.id == 13:
            batch.add("Another prompt", temperature=0.7, seed=1)   # joins at the next step
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import mlx.core as mx

from metalforge.engine.generation import Stats, TextStream, Token
from metalforge.engine.kv import PoolExhausted
from metalforge.errors import MetalforgeError
from metalforge.intmath import cdiv

MAX_WAITING = 1024
POOL_FULL = "KV pool exhausted"
LONGEST = "max_seq_len"


@dataclass
class Request:
    ids: list[int]
    sampler: object
    text: TextStream
    blocks: int                  # the most blocks its whole run can hold (see Batch._fits)
    sid: int | None = None
    last: int | None = None      # the newest token, not yet fed to the model


class Batch:
    def __init__(self, engine, max_waiting: int = MAX_WAITING):
        self.engine = engine
        self.max_waiting = max_waiting
        self.requests: dict[int, Request] = {}   # not finished: waiting or admitted
        self.waiting: deque[int] = deque()       # not admitted yet, first come first served
        self.finished: dict[int, Stats] = {}
        self._next_id = 0

    def add(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
            seed: int | None = None, stop=None) -> int:
        """Queue a prompt (text or ids) with its own settings; it joins at the next step with room
        for it. Returns its request id. A full queue or a prompt over max_seq_len is refused."""
        ids, sampler, stops = self.engine._request(prompt, max_tokens, temperature, top_p, top_k, seed, stop)
        if len(self.waiting) >= self.max_waiting:
            raise MetalforgeError(f"the batch's queue is full: {len(self.waiting)} requests wait for KV blocks "
                                  f"(max_waiting={self.max_waiting}); add again after some finish")
        pool = self.engine.pool
        longest = min(len(ids) + max_tokens - 1, pool.max_seq_len)   # the last token is never fed back
        rid = self._next_id
        self._next_id += 1
        self.requests[rid] = Request(ids, sampler, TextStream(self.engine.tokenizer, stops, Stats(prompt_tokens=len(ids)),
                                                                time.perf_counter()),
                                     min(cdiv(longest, pool.block_size), pool.num_blocks))
        self.waiting.append(rid)
        return rid

    def cancel(self, rid: int) -> None:
        """Stop a request now (waiting or admitted); its sequence leaves the pool."""
        if rid not in self.requests:
            raise MetalforgeError(f"no live request {rid} in this batch")
        self._finish(rid, "cancelled")

    def stats(self, rid: int) -> Stats:
        r = self.requests.get(rid)
        if r is not None:
            return r.text.stats
        if rid in self.finished:
            return self.finished[rid]
        raise MetalforgeError(f"no request {rid} in this batch")

    def __iter__(self):
        try:
            while self.requests:
                yield from self.step()
        finally:
            self.close()

    def close(self) -> None:
        """End every request, waiting or admitted, and give its blocks back."""
        for rid in list(self.requests):
            self._finish(rid, "cancelled")

    def step(self) -> list[tuple[int, Token]]:
        """Admit and prefill the waiting requests that fit, decode one token for every other
        admitted one; return the (request id, Token) pairs produced, in request order."""
        events = []
        decoding = [rid for rid, r in self.requests.items() if r.last is not None]
        while self.waiting and self._fits(self.requests[self.waiting[0]]):
            events += self._prefill(self.waiting.popleft())
        decoding = self._room_for(decoding)
        if decoding:
            e = self.engine
            logits = e.step([self.requests[rid].sid for rid in decoding], [[self.requests[rid].last] for rid in decoding])
            chosen = mx.stack([self.requests[rid].sampler.sample(logits[b]) for b, rid in enumerate(decoding)]).tolist()
            for rid, token in zip(decoding, chosen):
                events.append(self._emit(rid, token))
        return sorted(events, key=lambda ev: ev[0])

    def _fits(self, r: Request) -> bool:
        """Whether the pool holds r's whole run beside what every admitted request may still take.
        With none admitted it is tried whatever blocks are held outside the batch (kept prefixes,
        other generations): waiting could then last forever, and it ends alone if the pool runs out."""
        admitted = [o for o in self.requests.values() if o.sid is not None]
        if not admitted:
            return True
        pool = self.engine.pool
        return r.blocks <= pool.free_blocks - sum(self._growth(o) for o in admitted)

    def _growth(self, r: Request) -> int:
        """Blocks an admitted request may still take: the rest of its run, plus a private copy of a
        shared last block."""
        pool = self.engine.pool
        seq = pool.seq(r.sid)
        shared = bool(seq.blocks) and pool.blocks.shared(seq.blocks[-1])
        return max(0, r.blocks - len(seq.blocks)) + shared

    def _room_for(self, decoding: list[int]) -> list[int]:
        """The requests that can take one more token: those at max_seq_len end, then, while the
        pool cannot hold a token for each of the rest, the newest needing a block ends."""
        pool = self.engine.pool
        for rid in [rid for rid in decoding if pool.seq(self.requests[rid].sid).length >= pool.max_seq_len]:
            self._finish(rid, LONGEST)
        decoding = [rid for rid in decoding if rid in self.requests]
        while decoding:
            needs = {rid: sum(pool.needed(self.requests[rid].sid, 1)) for rid in decoding}
            if sum(needs.values()) <= pool.free_blocks:
                break
            self._finish(max(rid for rid in decoding if needs[rid]), POOL_FULL)
            decoding = [rid for rid in decoding if rid in self.requests]
        return decoding

    def _prefill(self, rid: int) -> list[tuple[int, Token]]:
        """The request's prompt into a new sequence and its first token; a prompt the pool
        cannot hold ends the request alone."""
        r = self.requests[rid]
        others = [o.sid for o in self.requests.values() if o.sid is not None]
        try:
            r.sid, logits = self.engine._open(r.ids, r.text.stats, others)
        except PoolExhausted:
            self._finish(rid, POOL_FULL)
            return []
        return [self._emit(rid, r.sampler.sample(logits[0]).item())]

    def _emit(self, rid: int, token: int) -> tuple[int, Token]:
        r = self.requests[rid]
        out, reason = r.text.add(token)
        r.last = token
        if reason:
            self._finish(rid, reason)
        return rid, out

    def _finish(self, rid: int, reason: str) -> None:
        r = self.requests.pop(rid)
        if rid in self.waiting:
            self.waiting.remove(rid)
        r.text.stats.stop_reason = r.text.stats.stop_reason or reason
        self.finished[rid] = r.text.stats
        if r.sid is not None and r.sid in self.engine.pool.seqs:
            self.engine.pool.remove(r.sid)
