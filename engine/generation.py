"""The text layer of generation: token ids in, `Token`s (id and newly completed text) out, with
stop conditions and statistics. The token-id loop is engine/scheduler.py, for one sequence and
for many; it ends each through `Stops`."""
from __future__ import annotations

import time
from dataclasses import dataclass

from metalforge.engine import tokenizer as tokenizers


# Stop reasons the loop gives besides Stops': the sequence reached the engine's maximum length, or
# the pool had no block for its next token.
LONGEST = "max_seq_len"
POOL_FULL = "KV pool exhausted"


@dataclass
class Token:
    id: int
    text: str | None
    # asked for with logprobs=k: the chosen id's log-probability under the model (before
    # temperature, top-k and top-p) and the k most likely (id, log-probability) pairs, best first
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    stop_reason: str = ""
    # speculative decoding (engine/speculative.py): verify passes, tokens drafted, drafts accepted
    verify_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def accepted_per_step(self) -> float:
        """Draft tokens accepted per verify pass (each pass also yields one token of its own)."""
        return self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class Stops:
    """When one sequence ends: a stop id, a stop string completed by the newest text, or its
    token budget. Text arrives incrementally (StreamingDetokenizer), so only a short tail is kept."""

    def __init__(self, ids: set[int], texts: list[str], max_tokens: int):
        self.ids, self.texts, self.max_tokens = ids, texts, max_tokens
        self.longest = max(map(len, texts), default=0)
        self.recent = ""

    def reason(self, token: int, text: str | None, count: int) -> str | None:
        if token in self.ids:
            return "stop token"
        if self.texts:
            # a stop string completed by this piece lies in its last len(stop) - 1 + len(piece) chars
            piece = text or ""
            self.recent = (self.recent + piece)[-(self.longest + len(piece)):]
            if any(s in self.recent for s in self.texts):
                return "stop string"
        if count >= self.max_tokens:
            return "max_tokens"
        return None


class TextStream:
    """One sequence's output: each new id becomes a Token with the text it completes, counted into
    `stats` (timed from `start`, the moment its prompt began to be processed)."""

    def __init__(self, tokenizer, stops: Stops, stats: Stats, start: float):
        self.detokenizer = tokenizers.StreamingDetokenizer(tokenizer) if tokenizer else None
        self.stops, self.stats, self.start = stops, stats, start
        self.first = None

    def add(self, token: int) -> tuple[Token, str | None]:
        """The Token for `token` and, when it ends the sequence, why."""
        now = time.perf_counter()
        s = self.stats
        if self.first is None:
            self.first = now
            s.time_to_first_token_s = now - self.start
            s.prefill_tokens_per_s = (s.prompt_tokens - s.cached_tokens) / max(s.time_to_first_token_s, 1e-9)
        s.generated_tokens += 1
        if s.generated_tokens > 1:
            s.decode_tokens_per_s = (s.generated_tokens - 1) / max(now - self.first, 1e-9)
        text = self.detokenizer.add(token) if self.detokenizer else None
        reason = self.stops.reason(token, text, s.generated_tokens)
        if reason:
            s.stop_reason = reason
        return Token(token, text), reason


class Generation:
    """An iterator of Tokens for one prompt; `stats` is complete once iteration ends and
    `sequence` is the pool sequence it used (kept afterwards with generate(..., keep=True))."""

    def __init__(self, run, stats: Stats):
        self.stats = stats
        self.sequence: int | None = None
        self._tokens = run(self)

    def __iter__(self):
        return self

    def __next__(self) -> Token:
        return next(self._tokens)

    def close(self) -> None:
        """Stop early; the sequence's blocks go back to the pool (unless kept)."""
        self._tokens.close()
