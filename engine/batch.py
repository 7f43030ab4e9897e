"""Many sequences at once: continuous batching over the engine's block pool.

Requests join (`add`) and leave (`cancel`, or when they stop) between steps. Each `step` first
prefills the requests that joined since the last one (one prompt at a time, chunked), then
decodes one token for every live request in a single forward pass through the pool. Each request
has its own sampler and stop conditions. A prompt sharing at least one block of leading tokens
with a kept prefix or another request's sequence starts as a fork of it: the shared blocks are
stored once and not prefilled again.

    batch = engine.batch()
    a = batch.add("Once upon", max_tokens=32)
    for rid, token in batch:            # (request id, Token) as they are produced
        if rid == a and token.id == 13:
            batch.add("Another prompt", temperature=0.7, seed=1)   # joins at the next step
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx

from metalforge.engine.generation import Stats, TextStream, Token
from metalforge.engine.kv_pool import PoolExhausted
from metalforge.errors import MetalforgeError


@dataclass
class Request:
    ids: list[int]
    sampler: object
    text: TextStream
    sid: int | None = None
    last: int | None = None      # the newest token, not yet fed to the model


class Batch:
    def __init__(self, engine):
        self.engine = engine
        self.requests: dict[int, Request] = {}   # live: joined and not finished
        self.finished: dict[int, Stats] = {}
        self._next_id = 0

    def add(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
            seed: int | None = None, stop=None) -> int:
        """Queue a prompt (text or ids) with its own settings; it joins at the next step. Returns
        its request id."""
        ids, sampler, stops = self.engine._request(prompt, max_tokens, temperature, top_p, top_k, seed, stop)
        rid = self._next_id
        self._next_id += 1
        self.requests[rid] = Request(ids, sampler, TextStream(self.engine.tokenizer, stops, Stats(prompt_tokens=len(ids)),
                                                                time.perf_counter()))
        return rid

    def cancel(self, rid: int) -> None:
        """Stop a request now; its sequence leaves the pool."""
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
        """End every live request and give its blocks back."""
        for rid in list(self.requests):
            self._finish(rid, "cancelled")

    def step(self) -> list[tuple[int, Token]]:
        """Prefill the requests that joined, decode one token for every other live one; return
        the (request id, Token) pairs produced, in request order."""
        events = []
        joined = [rid for rid, r in self.requests.items() if r.sid is None]
        for rid in joined:
            events += self._prefill(rid, others_live=len(self.requests) > len(joined))
        decoding = [rid for rid, r in self.requests.items() if r.last is not None and rid not in joined]
        if decoding:
            e = self.engine
            logits = e.step([self.requests[rid].sid for rid in decoding], [[self.requests[rid].last] for rid in decoding])
            chosen = mx.stack([self.requests[rid].sampler.sample(logits[b]) for b, rid in enumerate(decoding)]).tolist()
            for rid, token in zip(decoding, chosen):
                events.append(self._emit(rid, token))
        return sorted(events, key=lambda ev: ev[0])

    def _prefill(self, rid: int, others_live: bool) -> list[tuple[int, Token]]:
        """The request's prompt into a new sequence and its first token. When the pool has no room
        and other requests are decoding, it waits for them to free blocks (tried again next step)."""
        r = self.requests[rid]
        others = [o.sid for o in self.requests.values() if o.sid is not None]
        try:
            r.sid, logits = self.engine._open(r.ids, r.text.stats, others)
        except PoolExhausted:
            if others_live:
                return []
            self._finish(rid, "KV pool exhausted")
            raise
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
        r.text.stats.stop_reason = r.text.stats.stop_reason or reason
        self.finished[rid] = r.text.stats
        if r.sid is not None and r.sid in self.engine.pool.seqs:
            self.engine.pool.remove(r.sid)
