"""Choosing the next token from logits: greedy, or temperature with top-k and top-p."""
from __future__ import annotations

import math
import os

import mlx.core as mx

from metalforge import arguments
from metalforge.errors import MetalforgeError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None):
        # `not x >= 0` rather than `x < 0`: NaN fails every comparison and must be refused too
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise MetalforgeError(f"temperature must be a finite number >= 0, got {temperature}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise MetalforgeError(f"top_p must be in (0, 1], got {top_p}")
        arguments.positive_int("top_k", top_k, minimum=0)
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.key = mx.random.key(arguments.seed(seed) if seed is not None else int.from_bytes(os.urandom(4), "little"))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def filtered(self, logits: mx.array) -> mx.array:
        """logits (..., vocab) scaled by the temperature, with the tokens top-k and top-p drop set
        to -inf: their softmax is the distribution `sample` draws from (speculative decoding's
        rejection rule compares these for target and draft)."""
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = mx.expand_dims(mx.sort(logits, axis=-1)[..., -self.top_k], -1)
            logits = mx.where(logits < kth, -mx.inf, logits)
        if self.top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
            cumulative = mx.cumsum(probs, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = (cumulative - probs) >= self.top_p
            mask = mx.put_along_axis(mx.zeros_like(logits), order, mx.where(drop, -mx.inf, 0.0), axis=-1)
            logits = logits + mask
        return logits

    def sample(self, logits: mx.array) -> mx.array:
        """logits: (vocab,) float32 -> the chosen id as a lazy int32 scalar, so that a generation
        loop can queue the next step before reading it back."""
        if self.greedy:
            return mx.argmax(logits)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(self.filtered(logits), key=sub)


def log_probabilities(logits: mx.array, token: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """`token`'s log-probability under `logits` (vocab,), before temperature, top-k and top-p, and
    the k most likely ids with theirs, best first: lazy arrays, read back with the token."""
    logp = logits.astype(mx.float32)
    logp = logp - mx.logsumexp(logp)
    k = min(k, logp.shape[0])
    if not k:
        return logp[token], mx.array([], dtype=mx.uint32), mx.array([], dtype=mx.float32)
    top = mx.argpartition(-logp, kth=k - 1)[:k]
    top = top[mx.argsort(-logp[top])]
    return logp[token], top, logp[top]
