"""Speculative decoding of a sequence: a cheap drafter proposes k tokens, the target checks all
of them in ONE forward pass (k+1 tokens of the sequence with logits after each, in the ragged
step that also decodes every plain request and verifies every other speculative one: see
engine/scheduler.py), and the pool drops what was rejected by truncating the sequence (whole
blocks past the kept length go back to the pool; nothing is copied).

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
    """One request's speculative decoding, a round at a time: the scheduler asks `plan` for the
    tokens its next verify pass feeds, runs that pass with the batch's, and hands the logits to
    `verify`, where a plain request would be fed its sampled token."""

    def __init__(self, drafter, num_draft: int, seed: int | None):
        self.drafter, self.num_draft = drafter, num_draft
        self.rng = np.random.default_rng(seed)
        self.history: list[int] | None = None   # prompt and tokens emitted; the last not fed yet
        self.drafts: list[int] = []             # the pending verify pass's drafts
        self.qs = None                          # and the draft's distributions (None: point masses)

    def first(self, r) -> list[int]:
        """The request's first token, sampled at prefill."""
        self.history = list(r.ids)
        return self._emit([int(r.first.item())])

    def plan(self, engine, r) -> list[int] | None:
        """The tokens of the request's next verify pass (its last token and up to num_draft
        drafts), or None where the sequence is at max_seq_len."""
        pool, held = engine.pool, engine.pool.seq(r.sid).length
        if held >= pool.max_seq_len:
            return None
        k = min(self.num_draft, r.max_tokens - r.text.stats.generated_tokens - 1, pool.max_seq_len - held - 1,
                self.drafter.room(self.history))
        try:
            self.drafts, self.qs = self.drafter.propose(self.history, k, r.sampler, self.rng) if k > 0 else ([], None)
        except PoolExhausted:   # the draft model's pool is full: this pass verifies nothing
            self.drop_drafts()
        return [self.history[-1]] + self.drafts

    def drop_drafts(self) -> None:
        """Verify no draft this pass (they do not fit the pool; the token alone may)."""
        self.drafts, self.qs = [], None

    def verify(self, engine, r, logits: mx.array) -> list[int]:
        """The tokens the pass yields, from its logits (k+1, vocab) after the fed token and each
        draft: the kept drafts and the token after them; the rejected ones leave the pool."""
        kept, nxt = accept(r.sampler, logits, self.drafts, self.qs, self.rng)
        if kept < len(self.drafts):
            engine.remove(r.sid, engine.pool.seq(r.sid).length - len(self.drafts) + kept)
        stats = r.text.stats
        stats.verify_steps += 1
        stats.draft_tokens += len(self.drafts)
        stats.accepted_tokens += kept
        return self._emit(self.drafts[:kept] + [nxt])

    def _emit(self, tokens: list[int]) -> list[int]:
        self.history += tokens
        return tokens

    def close(self) -> None:
        self.drafter.close()
