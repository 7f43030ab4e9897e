"""Rotary position embeddings with the scaling types mlx-lm configs use (linear, dynamic, llama3,
yarn), applied per token position so sequences at different offsets share one call."""
from __future__ import annotations

import math

import mlx.core as mx

from metalforge.errors import MetalforgeError


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> tuple[mx.array, float]:
    """(inverse frequencies for the D/2 rotated pairs, attention-magnitude factor)."""
    inv = 1.0 / (theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
    if not scaling:
        return inv, 1.0
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = float(scaling.get("factor", 1.0))
    if kind in ("linear",):
        return inv / factor, 1.0
    if kind == "dynamic":
        return inv, 1.0   # dynamic NTK only changes frequencies past max_position_embeddings (see positions())
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = mx.where(wavelen > old / low, inv / factor,
                          mx.where(wavelen < old / high, inv, (1 - smooth) * inv / factor + smooth * inv))
        return scaled, 1.0
    if kind == "yarn":
        old = float(scaling.get("original_max_position_embeddings", max_positions))
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))
        def dim_for(rotations):
            return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))
        lo, hi = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), head_dim - 1)
        ramp = mx.clip((mx.arange(head_dim // 2, dtype=mx.float32) - lo) / max(hi - lo, 1e-3), 0, 1)
        extrapolate = 1 - ramp
        inv = inv / factor * (1 - extrapolate) + inv * extrapolate
        mscale = float(scaling.get("mscale", 1.0))
        return inv, (0.1 * mscale * math.log(factor) + 1.0) if factor > 1 else 1.0
    raise MetalforgeError(f"rope_scaling type {kind!r} is not supported (linear, dynamic, llama3, yarn)")


class Rope:
    def __init__(self, head_dim, theta, scaling, max_positions):
        self.head_dim = head_dim
        self.inv_freq, self.mscale = inverse_frequencies(head_dim, theta, scaling, max_positions)
        self.dynamic = scaling if scaling and (scaling.get("rope_type") or scaling.get("type")) == "dynamic" else None
        self.theta, self.max_positions = theta, max_positions

    def _inv_freq(self, longest: int) -> mx.array:
        if self.dynamic and longest > self.max_positions:
            factor = float(self.dynamic.get("factor", 1.0))
            base = self.theta * ((factor * longest / self.max_positions) - (factor - 1)) ** (self.head_dim / (self.head_dim - 2))
            return 1.0 / (base ** (mx.arange(0, self.head_dim, 2, dtype=mx.float32) / self.head_dim))
        return self.inv_freq

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        """x: (B, H, L, D); positions: (B, L) integer positions of each token."""
        inv = self._inv_freq(int(mx.max(positions).item()) + 1)
        angles = positions.astype(mx.float32)[:, None, :, None] * inv          # (B, 1, L, D/2)
        cos, sin = mx.cos(angles) * self.mscale, mx.sin(angles) * self.mscale
        half = self.head_dim // 2
        x1, x2 = x[..., :half].astype(mx.float32), x[..., half:].astype(mx.float32)
        return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
