"""Choosing the next token from logits: greedy, or temperature with top-k and top-p."""
from __future__ import annotations

import mlx.core as mx

from metalforge.errors import MetalforgeError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None):
        if temperature < 0:
            raise MetalforgeError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise MetalforgeError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise MetalforgeError(f"top_k must be >= 0, got {top_k}")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.key = mx.random.key(seed if seed is not None else int.from_bytes(__import__("os").urandom(4), "little"))

    def __call__(self, logits: mx.array) -> int:
        """logits: (vocab,) float32."""
        if self.temperature == 0:
            return int(mx.argmax(logits).item())
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[0]:
            kth = mx.sort(logits)[-self.top_k]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if self.top_p < 1.0:
            order = mx.argsort(-logits)
            probs = mx.softmax(logits[order])
            cumulative = mx.cumsum(probs)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = (cumulative - probs) >= self.top_p
            logits = logits.at[order].add(mx.where(drop, -mx.inf, 0.0))
        self.key, sub = mx.random.split(self.key)
        return int(mx.random.categorical(logits, key=sub).item())
