"""Rotary position embeddings, one class per `rope_scaling` type mlx-lm configs use (a table:
a new type is one class and one line), applied per token position so sequences at different
offsets share one call. Nothing is read back from the device: dynamic NTK's frequencies depend on
the longest sequence of the step, which the host already knows (the pool's lengths)."""
from __future__ import annotations

import math

import mlx.core as mx

from metalforge.errors import MetalforgeError, choices


class Rope:
    """No scaling: the frequencies theta^(-2i/D). Subclasses change the frequencies (and the
    attention-magnitude factor); each layer holds its own, so per-layer bases have a place."""

    def __init__(self, head_dim: int, theta: float, scaling: dict, max_positions: int):
        self.head_dim, self.theta, self.scaling, self.max_positions = head_dim, theta, scaling, max_positions
        self.factor = float(scaling.get("factor", 1.0))
        self.inv_freq, self.mscale = self.frequencies(self.base_frequencies(theta)), 1.0

    def base_frequencies(self, theta: float) -> mx.array:
        return 1.0 / (theta ** (mx.arange(0, self.head_dim, 2, dtype=mx.float32) / self.head_dim))

    def frequencies(self, inv: mx.array) -> mx.array:
        return inv

    def frequencies_for(self, longest: int) -> mx.array:
        """The frequencies for a step whose longest sequence holds `longest` positions."""
        return self.inv_freq

    def __call__(self, x: mx.array, positions: mx.array, longest: int) -> mx.array:
        """x: (B, H, L, D); positions: (B, L) integer positions of each token; longest: the
        step's longest sequence length (a host number)."""
        angles = positions.astype(mx.float32)[:, None, :, None] * self.frequencies_for(longest)   # (B, 1, L, D/2)
        cos, sin = mx.cos(angles) * self.mscale, mx.sin(angles) * self.mscale
        half = self.head_dim // 2
        x1, x2 = x[..., :half].astype(mx.float32), x[..., half:].astype(mx.float32)
        return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class LinearRope(Rope):
    def frequencies(self, inv):
        return inv / self.factor


class DynamicRope(Rope):
    """Dynamic NTK: past max_position_embeddings the base grows with the longest sequence."""

    def frequencies_for(self, longest: int) -> mx.array:
        if longest <= self.max_positions:
            return self.inv_freq
        d, f = self.head_dim, self.factor
        return self.base_frequencies(self.theta * ((f * longest / self.max_positions) - (f - 1)) ** (d / (d - 2)))


class Llama3Rope(Rope):
    def frequencies(self, inv):
        s = self.scaling
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old = float(s.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        return mx.where(wavelen > old / low, inv / self.factor,
                        mx.where(wavelen < old / high, inv, (1 - smooth) * inv / self.factor + smooth * inv))


class YarnRope(Rope):
    def __init__(self, head_dim, theta, scaling, max_positions):
        super().__init__(head_dim, theta, scaling, max_positions)
        mscale = float(scaling.get("mscale", 1.0))
        self.mscale = (0.1 * mscale * math.log(self.factor) + 1.0) if self.factor > 1 else 1.0

    def frequencies(self, inv):
        s, d = self.scaling, self.head_dim
        old = float(s.get("original_max_position_embeddings", self.max_positions))
        beta_fast, beta_slow = float(s.get("beta_fast", 32)), float(s.get("beta_slow", 1))

        def dim_for(rotations):
            return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))
        lo, hi = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), d - 1)
        ramp = mx.clip((mx.arange(d // 2, dtype=mx.float32) - lo) / max(hi - lo, 1e-3), 0, 1)
        return inv / self.factor * ramp + inv * (1 - ramp)


SCALINGS: dict[str, type[Rope]] = {"default": Rope, "linear": LinearRope, "dynamic": DynamicRope,
                                   "llama3": Llama3Rope, "yarn": YarnRope}


def scaling_type(scaling: dict | None, where: str = "config.json") -> str:
    """The rope_scaling type, checked: an unknown one is one line naming the field."""
    if not scaling:
        return "default"
    if not isinstance(scaling, dict):
        raise MetalforgeError(f"{where}: rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in SCALINGS:
        raise MetalforgeError(f"{where}: rope_scaling.rope_type {kind!r} is not supported; supported: "
                              f"{choices(sorted(SCALINGS))}")
    return kind


def make(head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> Rope:
    return SCALINGS[scaling_type(scaling)](head_dim, theta, scaling or {}, max_positions)
