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

from metalforge import arguments
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
    logprobs: int | None = None  # report the chosen id's log-probability and this many alternatives
    keep: bool = False           # on finishing (not cancelled), keep the sequence as a prefix


class Batch:
    def __init__(self, engine):
        self.engine = engine
        self.requests: dict[int, Request] = {}   # live: joined and not finished
        self.finished: dict[int, Stats] = {}
        self.kept: dict[int, int] = {}           # finished with keep=True: request id -> kept sequence
        self._next_id = 0

    def add(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
            seed: int | None = None, stop=None, logprobs: int | None = None, keep: bool = False) -> int:
        """Queue a prompt (text or ids) with its own settings; it joins at the next step. Returns
        its request id. logprobs=k fills each Token's `logprob` and its k `top_logprobs`; with
        keep=True a request that finishes (not cancelled) leaves its sequence in the pool as a
        kept prefix (see Engine.keep_prefix), its id in `kept`: the prompt and every generated
        token but the last."""
        ids, sampler, stops = self.engine._request(prompt, max_tokens, temperature, top_p, top_k, seed, stop)
        if logprobs is not None:
            arguments.positive_int("logprobs", logprobs, minimum=0)
        rid = self._next_id
        self._next_id += 1
        self.requests[rid] = Request(ids, sampler, TextStream(self.engine.tokenizer, stops, Stats(prompt_tokens=len(ids)),
                                                                time.perf_counter()), logprobs=logprobs, keep=keep)
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
            for b, (rid, token) in enumerate(zip(decoding, chosen)):
                events.append(self._emit(rid, token, logits[b]))
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
        return [self._emit(rid, r.sampler.sample(logits[0]).item(), logits[0])]

    def _emit(self, rid: int, token: int, logits: mx.array) -> tuple[int, Token]:
        r = self.requests[rid]
        out, reason = r.text.add(token)
        if r.logprobs is not None:
            out.logprob, out.top_logprobs = log_probabilities(logits, token, r.logprobs)
        r.last = token
        if reason:
            self._finish(rid, reason)
        return rid, out

    def _finish(self, rid: int, reason: str) -> None:
        r = self.requests.pop(rid)
        r.text.stats.stop_reason = r.text.stats.stop_reason or reason
        self.finished[rid] = r.text.stats
        if r.sid is not None and r.sid in self.engine.pool.seqs:
            if r.keep and reason != "cancelled":
                self.engine.keep_prefix(r.sid)
                self.kept[rid] = r.sid
            else:
                self.engine.pool.remove(r.sid)


def log_probabilities(logits: mx.array, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability under `logits` (vocab,) and the k most likely (id, log-probability)
    pairs, best first."""
    logp = logits.astype(mx.float32)
    logp = logp - mx.logsumexp(logp)
    k = min(k, logp.shape[0])
    if not k:
        return logp[token].item(), []
    top = mx.argpartition(-logp, kth=k - 1)[:k]
    pairs = sorted(zip(top.tolist(), logp[top].tolist()), key=lambda p: -p[1])
    return logp[token].item(), pairs
