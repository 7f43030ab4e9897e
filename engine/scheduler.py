"""The one decode loop, for one sequence (`Engine.generate`) and for many (`Engine.batch`).

Requests join (`add`) and leave (`cancel`, or when they stop) between steps. A request that does
not fit waits in a bounded first-come queue until blocks free: it is admitted when the pool has
room for its whole run (prompt plus max_tokens, up to max_seq_len; at most the whole pool)
beside the room every admitted request may still take, so admitted requests never starve each
other. A prompt sharing at least one block of leading tokens with a kept prefix or another
request's sequence starts as a fork of it: the shared blocks are stored once and not prefilled
again.

Each `step` admits and prefills what fits, then queues one forward pass (a ragged step) that
decodes a token for every plain request and verifies the drafts of every speculative one
(engine/speculative.py: its last token and k drafts, logits after each), and only then reads
back the tokens sampled by the previous pass (as mlx-lm's loop does: building a step overlaps
computing the last one); the verify passes' tokens are judged once it is computed. Stop
conditions are judged when a token is read, so a plain request that stops has one token computed
in vain. A request that reaches max_seq_len, or finds the pool full (blocks held outside the
loop), ends alone with that reason; the others go on. Drafts the pool cannot hold beside the
plain requests' tokens are dropped for the pass, the oldest requests' kept first.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import mlx.core as mx

from metalforge import arguments
from metalforge.engine.generation import LONGEST, POOL_FULL, Stats, Stops, TextStream, Token
from metalforge.engine.kv import PoolExhausted
from metalforge.engine import speculative
from metalforge.engine.kv.spec import SinkWindow, sink_window
from metalforge.engine.sampling import Sampler, log_probabilities
from metalforge.engine.speculative import NUM_DRAFT, Speculation
from metalforge.errors import MetalforgeError

MAX_WAITING = 1024


def run_blocks(pool, prompt_tokens: int, max_tokens: int) -> int:
    """The most blocks a request's whole run can hold: its prompt and every token it samples but
    the last (never fed back), up to max_seq_len; at most the whole pool."""
    longest = min(prompt_tokens + max_tokens - 1, pool.max_seq_len)
    return min(pool.blocks.blocks_for(longest), pool.num_blocks)


@dataclass
class Request:
    ids: list[int]
    sampler: Sampler
    text: TextStream
    max_tokens: int
    blocks: int                    # the most blocks its whole run can hold (see Scheduler._fits)
    keep: bool = False             # the sequence stays in the pool afterwards (see Engine.generate)
    logprobs: int | None = None    # fill each Token's logprob and this many top_logprobs
    sid: int | None = None
    sampled: int = 0               # tokens sampled, read back or not
    ending: str | None = None      # why no more tokens will be fed, once its last is read
    error: PoolExhausted | None = None
    speculation: object = None     # engine/speculative.py's Speculation: decoded a verify pass at a time
    first: mx.array | None = None  # a speculative request's first token, sampled at prefill
    window: SinkWindow | None = None   # its own sliding window (max_kv_size)


class Scheduler:
    def __init__(self, engine, max_waiting: int = MAX_WAITING):
        arguments.positive_int("max_waiting", max_waiting)
        self.engine, self.pool, self.max_waiting = engine, engine.pool, max_waiting
        self.requests: dict[int, Request] = {}   # not finished: waiting or admitted
        self.waiting: deque[int] = deque()       # not admitted yet, first come first served
        self.finished: dict[int, Stats] = {}
        self._ended: dict[int, tuple] = {}             # request -> (its sequence, its error)
        self._queued: list[tuple] = []   # (request, its sampled token not read yet, its log-probabilities)
        self._next_id = 0

    # ---- requests ---------------------------------------------------------------------------------
    def request(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                seed: int | None = None, stop=None, keep: bool = False, logprobs: int | None = None, draft=None,
                num_draft: int = NUM_DRAFT, prompt_lookup: int = 0, max_kv_size: int | None = None) -> int:
        """Queue a prompt (text or ids) with its own settings; it joins at the next step with room
        for it. Returns its request id. Every argument is checked first; a full queue or a prompt
        over max_seq_len is refused. `draft` or `prompt_lookup`: decoded speculatively (see
        engine/speculative.py), `num_draft` tokens verified per forward pass. `max_kv_size`: this
        request's own sliding window (as engine.load's, for the layers that attend to everything)."""
        window = None if max_kv_size is None else sink_window(max_kv_size, self.pool.capacity_tokens)
        speculation = None
        if (draft is not None or prompt_lookup) and logprobs is not None:
            raise MetalforgeError("logprobs are not reported with speculative decoding (draft=, prompt_lookup=) yet")
        if draft is not None or prompt_lookup:
            speculation = Speculation(speculative.drafter(self.engine, draft, num_draft, prompt_lookup), num_draft,
                                      seed)
        try:
            return self._request(prompt, max_tokens, temperature, top_p, top_k, seed, stop, keep, logprobs, speculation,
                                 window)
        except BaseException:
            if speculation:
                speculation.close()
            raise

    def _request(self, prompt, max_tokens, temperature, top_p, top_k, seed, stop, keep, logprobs, speculation,
                 window) -> int:
        e = self.engine
        arguments.positive_int("max_tokens", max_tokens)
        if logprobs is not None:
            arguments.positive_int("logprobs", logprobs, minimum=0)
        ids = e.encode(prompt)
        if not ids:
            raise MetalforgeError("the prompt is empty")
        if len(ids) > self.pool.max_seq_len:
            raise MetalforgeError(f"the prompt has {len(ids)} tokens, over the engine's maximum sequence length of "
                                  f"{self.pool.max_seq_len} (load with a larger max_seq_len)")
        sampler = Sampler(temperature, top_p, top_k, seed)
        stop_ids, stop_texts = set(e.args.eos_token_id), []
        if e.tokenizer:
            stop_ids |= e.tokenizer.eos_ids
        for s in stop or []:
            (stop_ids.add(s) if isinstance(s, int) else stop_texts.append(s))
        if len(self.waiting) >= self.max_waiting:
            raise MetalforgeError(f"the queue is full: {len(self.waiting)} requests wait for KV blocks "
                                  f"(max_waiting={self.max_waiting}); add again after some finish")
        text = TextStream(e.tokenizer, Stops(stop_ids, stop_texts, max_tokens), Stats(prompt_tokens=len(ids)),
                          time.perf_counter())
        rid = self._next_id
        self._next_id += 1
        extra = speculation.num_draft if speculation else 0   # a verify pass holds drafts until rejected ones go
        blocks = run_blocks(self.pool, len(ids), max_tokens + extra)
        self.requests[rid] = Request(ids, sampler, text, max_tokens, blocks, keep, logprobs, speculation=speculation,
                                     window=window)
        self.waiting.append(rid)
        return rid

    def cancel(self, rid: int) -> None:
        """Stop a request now (waiting or admitted); its sequence leaves the pool."""
        if rid not in self.requests:
            raise MetalforgeError(f"no live request {rid}")
        self._finish(rid, "cancelled")

    def stats(self, rid: int) -> Stats:
        r = self.requests.get(rid)
        if r is not None:
            return r.text.stats
        if rid in self.finished:
            return self.finished[rid]
        raise MetalforgeError(f"no request {rid}")

    def forget(self, rid: int) -> None:
        """Drop what is remembered of a finished request (its stats, sequence and error): a batch
        that lives as long as a server would otherwise grow with every request."""
        if rid in self.requests:
            raise MetalforgeError(f"request {rid} has not finished")
        self.finished.pop(rid, None)
        self._ended.pop(rid, None)

    def sequence(self, rid: int) -> int | None:
        """The pool sequence a request holds (None until admitted)."""
        r = self.requests.get(rid)
        return r.sid if r is not None else self._ended[rid][0]

    def error(self, rid: int) -> PoolExhausted | None:
        """Why a request ended before its first token: its prompt did not fit the pool."""
        r = self.requests.get(rid)
        return r.error if r is not None else self._ended[rid][1]

    def start_clock(self, rid: int) -> None:
        """Time the request from now: a generation starts when it is iterated, not when made."""
        self.requests[rid].text.start = time.perf_counter()

    def close(self) -> None:
        """End every request, waiting or admitted, and give its blocks back."""
        for rid in list(self.requests):
            self._finish(rid, "cancelled")

    # ---- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[tuple[int, Token]]:
        """Admit and prefill the waiting requests that fit, queue the next token of every
        admitted request, read back the tokens sampled before; return the (request id, Token)
        pairs read, in request order."""
        ready = [queued for queued in self._queued if queued[0] in self.requests]
        while self.waiting and self._fits(self.requests[self.waiting[0]]):
            rid = self.waiting.popleft()
            sampled = self._prefill(rid)
            if sampled is not None and self.requests[rid].speculation:
                self.requests[rid].first = sampled[0]
            elif sampled is not None:
                ready.append((rid, *sampled))
        fed = self._feedable([rid for rid, *_ in ready])
        verifying = self._verifiable(fed)
        self._queued, verified = self._decode(fed, {rid: y for rid, y, _ in ready}, verifying) \
            if fed or verifying else ([], {})
        events = []
        tokens = mx.stack([y for _, y, _ in ready]).tolist() if ready else []
        for (rid, _, scores), token in zip(ready, tokens):
            r = self.requests[rid]
            if rid in fed:
                self.pool.settle(r.sid, [token])
            out, reason = r.text.add(token)
            if scores is not None:
                chosen, top, top_logp = scores
                out.logprob, out.top_logprobs = chosen.item(), list(zip(top.tolist(), top_logp.tolist()))
            events.append((rid, out))
            if reason or rid not in fed:
                self._finish(rid, reason or r.ending)
        for rid, logits in verified.items():
            r = self.requests[rid]
            events += self._emit(rid, r.speculation.verify(self.engine, r, logits))
        for rid in [rid for rid, r in self.requests.items() if r.speculation and r.sid is not None and
                    r.speculation.history is None]:
            r = self.requests[rid]
            events += self._emit(rid, r.speculation.first(r))
        return sorted(events, key=lambda ev: ev[0])

    def _emit(self, rid: int, tokens: list[int]) -> list[tuple[int, Token]]:
        """A speculative request's tokens, read: the events they make, up to one that stops it."""
        r = self.requests[rid]
        events = []
        for token in tokens:
            out, reason = r.text.add(token)
            events.append((rid, out))
            if reason:
                self._finish(rid, reason)
                break
        return events

    def _verifiable(self, fed: list[int]) -> dict[int, list[int]]:
        """The speculative requests' verify passes, {request: the tokens it feeds}, oldest
        first, each with the drafts that fit the pool beside the plain requests' tokens (`fed`)
        and the passes before it, else its token alone; a request whose token does not fit, or
        whose sequence is at max_seq_len, ends."""
        free = self.pool.free_blocks - sum(sum(self.pool.needed(self.requests[rid].sid, 1)) for rid in fed)
        out = {}
        for rid, r in list(self.requests.items()):
            if not r.speculation or r.sid is None or r.speculation.history is None:
                continue
            tokens = r.speculation.plan(self.engine, r)
            if tokens is None:
                self._finish(rid, LONGEST)
                continue
            need = sum(self.pool.needed(r.sid, len(tokens)))
            if need > free and len(tokens) > 1:
                r.speculation.drop_drafts()
                tokens = tokens[:1]
                need = sum(self.pool.needed(r.sid, 1))
            if need > free:
                self._finish(rid, POOL_FULL)
                continue
            free -= need
            out[rid] = tokens
        return out

    def _decode(self, fed: list[int], tokens: dict[int, mx.array], verifying: dict[int, list[int]]) -> tuple:
        """Queue one forward pass feeding each plain request its sampled token and each
        speculative one its verify pass's tokens: ((request, next token, its log-probabilities
        or None) of each plain one, {speculative request: its logits (k+1, vocab)})."""
        order = sorted(verifying, key=lambda rid: len(verifying[rid]))   # equal lengths side by side: attended together
        counts = {self.requests[rid].sid: 1 for rid in fed}
        counts.update({self.requests[rid].sid: len(verifying[rid]) for rid in order})
        step = self.pool.begin(counts, {self.requests[rid].sid: list(range(len(verifying[rid]))) for rid in order})
        ids = ([mx.stack([tokens[rid] for rid in fed]).astype(mx.int32)] if fed else []) + \
            ([mx.array([t for rid in order for t in verifying[rid]], dtype=mx.int32)] if order else [])
        logits = self.engine.model.forward(step, ids[0] if len(ids) == 1 else mx.concatenate(ids))
        out, verified, row = [], {}, len(fed)
        for b, rid in enumerate(fed):
            self.requests[rid].sampled += 1
            out.append((rid, *self._sample(self.requests[rid], logits[b])))
        for rid in order:
            self.pool.settle(self.requests[rid].sid, verifying[rid])
            verified[rid] = logits[row:row + len(verifying[rid])]
            row += len(verifying[rid])
        mx.async_eval([a for _, y, scores in out for a in (y, *(scores or ()))])
        return out, verified

    @staticmethod
    def _sample(r: Request, logits: mx.array) -> tuple[mx.array, tuple | None]:
        """r's next token from `logits` (vocab,) and, when asked for, its log-probabilities (lazy)."""
        y = r.sampler.sample(logits)
        return y, (log_probabilities(logits, y, r.logprobs) if r.logprobs is not None else None)

    def _feedable(self, rids: list[int]) -> list[int]:
        """The requests whose sampled token is fed back: not at max_tokens or max_seq_len, and,
        while the pool cannot hold a token for each, not the newest needing a block (it ends
        once its token is read)."""
        out = []
        for rid in rids:
            r = self.requests[rid]
            if r.sampled >= r.max_tokens:
                continue
            if self.pool.seq(r.sid).length >= self.pool.max_seq_len:
                r.ending = LONGEST
                continue
            out.append(rid)
        while out:
            needs = {rid: sum(self.pool.needed(self.requests[rid].sid, 1)) for rid in out}
            if sum(needs.values()) <= self.pool.free_blocks:
                break
            newest = max(rid for rid in out if needs[rid])
            self.requests[newest].ending = POOL_FULL
            out.remove(newest)
        return out

    def _fits(self, r: Request) -> bool:
        """Whether the pool holds r's whole run beside what every admitted request may still take.
        With none admitted it is tried whatever blocks are held outside the loop (kept prefixes,
        other generations): waiting could then last forever, and it ends alone if the pool runs out."""
        admitted = [o for o in self.requests.values() if o.sid is not None]
        if not admitted:
            return True
        return r.blocks <= self.pool.free_blocks - sum(self._growth(o) for o in admitted)

    def _growth(self, r: Request) -> int:
        """Blocks an admitted request may still take: the rest of its run, plus a private copy of a
        shared last block."""
        seq = self.pool.seq(r.sid)
        shared = bool(seq.blocks) and self.pool.blocks.shared(seq.blocks[-1])
        return max(0, r.blocks - len(seq.blocks)) + shared

    def _prefill(self, rid: int) -> tuple | None:
        """The request's prompt into a new sequence, forked from the longest cached prefix, and
        its first token sampled; a prompt the pool cannot hold ends the request alone."""
        r = self.requests[rid]
        others = [o.sid for o in self.requests.values() if o.sid is not None]
        parent, cached = self._longest_cached_prefix(r.ids, others, r.window)
        cached = min(cached, len(r.ids) - 1)   # the last prompt token is recomputed for its logits
        sid = self.pool.add_sequence(r.window) if parent is None else self.pool.fork(parent, cached, r.window)
        r.text.stats.cached_tokens = cached    # 0 without a parent
        try:
            logits = self.engine.prefill(sid, r.ids[cached:])
        except PoolExhausted as e:
            self.pool.remove(sid)
            r.error = e
            self._finish(rid, POOL_FULL)
            return None
        except BaseException:
            self.pool.remove(sid)
            raise
        r.sid, r.sampled = sid, 1
        return self._sample(r, logits[0])

    def _longest_cached_prefix(self, ids: list[int], candidates=(), window=None) -> tuple[int | None, int]:
        """The kept prefix that is a whole prefix of `ids`, or among `candidates` the sequence
        sharing the most leading tokens (at least one block: less is not worth a fork)."""
        best, best_len = None, 0
        for sid in self.engine.prefixes:
            cached = self.pool.seq(sid).tokens
            n = len(cached)
            if best_len < n < len(ids) + 1 and ids[:n] == cached and \
                    self.pool.can_fork(sid, min(n, len(ids) - 1), window):
                best, best_len = sid, n
        for sid in candidates:
            n = len(os.path.commonprefix([ids, self.pool.seq(sid).tokens]))   # works on any sequences
            if n > max(best_len, self.pool.block_size - 1) and \
                    self.pool.can_fork(sid, min(n, len(ids) - 1), window):
                best, best_len = sid, n
        return best, best_len

    def _finish(self, rid: int, reason: str) -> None:
        r = self.requests.pop(rid)
        if rid in self.waiting:
            self.waiting.remove(rid)
        r.text.stats.stop_reason = r.text.stats.stop_reason or reason
        if r.speculation:
            r.speculation.close()
        self.finished[rid] = r.text.stats
        self._ended[rid] = (r.sid, r.error)
        if r.sid is None or r.sid not in self.pool.seqs:
            return
        if r.keep:   # the prompt and every token read but the last (a queued one may follow it)
            held = len(r.ids) + max(r.text.stats.generated_tokens - 1, 0)
            self.pool.remove(r.sid, min(held, self.pool.seq(r.sid).length))
        else:
            self.pool.remove(r.sid)
