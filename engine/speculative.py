"""Speculative decoding of one sequence: a cheap drafter proposes k tokens, the target checks
all of them in ONE forward pass (a ragged step of k+1 tokens with logits after each), and the
pool drops what was rejected by truncating the sequence (whole blocks past the kept length go
back to the pool; nothing is copied).

Drafters: another engine with the same tokenizer (`draft=`), or prompt lookup
(`prompt_lookup=n`: the tokens that followed the latest earlier occurrence of the last n tokens
of the prompt and output so far, trying shorter n-grams down to one; no second model).

Acceptance is the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): a draft
token d drawn with probability q(d) is kept with probability min(1, p(d) / q(d)), p being the
target's distribution there; at the first rejection the token is drawn from
norm(max(0, p - q)) instead, and when all k are kept a bonus token is drawn from the target's
distribution after them. Every token is thus distributed as the target's own (temperature,
top-k and top-p applied to both). Prompt lookup's draft is deterministic: q is a point mass.
Greedy keeps a draft token iff it is the target's argmax, so the output is plain greedy's.
"""
from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from metalforge import arguments
from metalforge.engine.kv import PoolExhausted
from metalforge.engine.generation import LONGEST, POOL_FULL
from metalforge.errors import MetalforgeError

NUM_DRAFT = 3   # mlx-lm's default number of draft tokens is 2; one more pays off on an agreeing draft


def _fit(row: mx.array, vocab: int) -> mx.array:
    """A draft model's logits over the target's vocabulary (checkpoints of one tokenizer often
    pad their embedding tables to different sizes): cut, or padded with -inf."""
    n = row.shape[-1]
    if n >= vocab:
        return row[:vocab]
    return mx.concatenate([row, mx.full((vocab - n,), -mx.inf, dtype=row.dtype)])


def _probs(sampler, logits: mx.array) -> np.ndarray:
    """The sampler's distribution over each row, in float64 so numpy's choice sums it to one."""
    p = np.array(mx.softmax(sampler.filtered(logits), axis=-1), dtype=np.float64)
    return p / p.sum(axis=-1, keepdims=True)


class PromptLookup:
    """Drafts copied from earlier in the sequence: after the latest earlier occurrence of its
    last n tokens (n, then shorter n-grams down to one), the tokens that followed."""

    def __init__(self, n: int):
        self.n = n

    def room(self, history: list[int]) -> int:
        return len(history)

    def propose(self, history: list[int], k: int, sampler, rng) -> tuple[list[int], None]:
        for size in range(min(self.n, len(history) - 1), 0, -1):
            tail = history[-size:]
            for start in range(len(history) - size - 1, -1, -1):
                if history[start:start + size] == tail:
                    return history[start + size:start + size + k], None
        return [], None

    def close(self) -> None:
        pass


class DraftModel:
    """Drafts sampled from a second engine, which holds the sequence so far in its own pool and
    is cut back to what the target kept after each verify pass."""

    def __init__(self, engine, vocab: int, owned: bool):
        self.engine, self.vocab, self.owned = engine, vocab, owned
        self.sid: int | None = None

    def room(self, history: list[int]) -> int:
        """Draft tokens its pool can hold after `history` (it holds all but the last draft)."""
        return self.engine.pool.max_seq_len - len(history) + 1

    def propose(self, history: list[int], k: int, sampler, rng) -> tuple[list[int], list[np.ndarray] | None]:
        e = self.engine
        if self.sid is None:
            self.sid = e.add_sequence()
        held = e.pool.seq(self.sid).tokens
        common = min(len(os.path.commonprefix([held, history])), len(history) - 1)
        if common < len(held):
            e.remove(self.sid, common)   # common == 0 removes the whole sequence
            if not common:
                self.sid = e.add_sequence()
        feed, tokens, qs = history[common:], [], []
        for _ in range(k):
            row = _fit(e.prefill(self.sid, feed)[0], self.vocab)
            if sampler.greedy:
                tokens.append(int(mx.argmax(row).item()))
            else:
                qs.append(_probs(sampler, row))
                tokens.append(int(rng.choice(self.vocab, p=qs[-1])))
            feed = tokens[-1:]
        return tokens, (qs if qs else None)

    def close(self) -> None:
        if self.sid is not None and self.sid in self.engine.pool.seqs:
            self.engine.remove(self.sid)
        if self.owned:
            self.engine.close()


def accept(sampler, logits: mx.array, drafts: list[int], qs, rng) -> tuple[int, int]:
    """(draft tokens kept, the token after them) from the target's logits (k+1, vocab) after
    the fed token and each draft."""
    if sampler.greedy:
        best = np.array(mx.argmax(logits, axis=-1)).tolist()
        kept = next((i for i, d in enumerate(drafts) if best[i] != d), len(drafts))
        return kept, best[kept]
    p = _probs(sampler, logits)
    vocab = p.shape[-1]
    for i, d in enumerate(drafts):
        q = qs[i] if qs is not None else np.eye(1, vocab, d)[0]
        if rng.random() < min(1.0, p[i, d] / q[d]):
            continue
        residual = np.maximum(p[i] - q, 0.0)
        total = residual.sum()
        return i, int(rng.choice(vocab, p=residual / total if total > 0 else p[i]))
    return len(drafts), int(rng.choice(vocab, p=p[len(drafts)]))


def drafter(engine, draft, num_draft: int, prompt_lookup: int):
    """The drafter generate(draft=, num_draft=, prompt_lookup=) asks for, its arguments checked."""
    arguments.positive_int("num_draft", num_draft)
    if draft is not None and prompt_lookup:
        raise MetalforgeError("give either draft= (a draft model) or prompt_lookup= (n-gram drafts), not both")
    if prompt_lookup:
        arguments.positive_int("prompt_lookup", prompt_lookup)
        return PromptLookup(prompt_lookup)
    if isinstance(draft, (str, Path)):
        from metalforge.engine.engine import load
        return DraftModel(load(draft, device=engine.device,
                               backend=engine.kernels.backend, kv_tokens=engine.pool.max_seq_len + num_draft),
                          engine.args.vocab_size, owned=True)
    if not hasattr(draft, "prefill") or not hasattr(draft, "pool"):
        raise MetalforgeError(f"draft must be an engine or a model folder, got {type(draft).__name__}")
    if draft is engine:
        raise MetalforgeError("the draft model must be another engine than the target (load the folder again)")
    return DraftModel(draft, engine.args.vocab_size, owned=False)


class Speculation:
    """One request's speculative decoding, a round at a time (the scheduler calls `advance`
    where a plain request would be fed its sampled token)."""

    def __init__(self, drafter, num_draft: int, seed: int | None):
        self.drafter, self.num_draft = drafter, num_draft
        self.rng = np.random.default_rng(seed)
        self.history: list[int] | None = None   # prompt and tokens emitted; the last not fed yet

    def advance(self, engine, r) -> tuple[list[int], str | None]:
        """The request's next tokens (its first, or a verify pass's kept drafts and the token
        after them), or no tokens and why it cannot go on (max_seq_len, a full pool)."""
        if self.history is None:
            self.history = list(r.ids)
            return self._emit([int(r.first.item())])
        pool, stats, sid = engine.pool, r.text.stats, r.sid
        y, held = self.history[-1], pool.seq(sid).length
        if held >= pool.max_seq_len:
            return [], LONGEST
        k = min(self.num_draft, r.max_tokens - stats.generated_tokens - 1, pool.max_seq_len - held - 1,
                self.drafter.room(self.history))
        try:
            drafts, qs = self.drafter.propose(self.history, k, r.sampler, self.rng) if k > 0 else ([], None)
        except PoolExhausted:   # the draft model's pool is full: this pass verifies nothing
            drafts, qs = [], None
        while True:
            try:
                logits = engine.step([sid], [[y] + drafts], logits_at={sid: list(range(len(drafts) + 1))})
                break
            except PoolExhausted:   # nothing changed; without drafts the token may still fit
                if not drafts:
                    return [], POOL_FULL
                drafts, qs = [], None
        kept, nxt = accept(r.sampler, logits, drafts, qs, self.rng)
        if kept < len(drafts):
            engine.remove(sid, held + 1 + kept)
        stats.verify_steps += 1
        stats.draft_tokens += len(drafts)
        stats.accepted_tokens += kept
        return self._emit(drafts[:kept] + [nxt])

    def _emit(self, tokens: list[int]) -> tuple[list[int], None]:
        self.history += tokens
        return tokens, None

    def close(self) -> None:
        self.drafter.close()
