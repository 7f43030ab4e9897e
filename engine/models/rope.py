"""Rotary position embeddings, one class per `rope_scaling` type mlx-lm configs use (a table:
a new type is one class and one line), applied per token position so sequences at different
offsets share one call. Nothing is read back from the device: dynamic NTK's frequencies depend on
the longest sequence of the step, which the host already knows (the pool's lengths)."""
from __future__ import annotations

import math

import mlx.core as mx

from metalforge.errors import MetalforgeError, choices


class Rope:
    """No scaling: the frequencies theta^(-2i/d) over the first d = `dims` features of a head
    (all of them unless the model type rotates part: Phi's partial_rotary_factor). Subclasses
    change the frequencies (and the attention-magnitude factor); each layer holds its own, so
    per-layer bases have a place."""

    def __init__(self, head_dim: int, theta: float, scaling: dict, max_positions: int, dims: int | None = None,
                 traditional: bool = False):
        self.dims, self.theta, self.scaling, self.max_positions = dims or head_dim, theta, scaling, max_positions
        self.traditional = traditional   # rotate adjacent pairs (GLM-4) instead of the two halves
        self.factor = float(scaling.get("factor", 1.0))
        self.mscale = 1.0
        self.inv_freq = self.frequencies(self.base_frequencies(theta))

    def base_frequencies(self, theta: float) -> mx.array:
        return 1.0 / (theta ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims))

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
        half, d = self.dims // 2, self.dims
        if self.traditional:
            pairs = x[..., :d].astype(mx.float32).reshape(*x.shape[:-1], half, 2)
            x1, x2 = pairs[..., 0], pairs[..., 1]
            rotated = mx.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(*x.shape[:-1], d)
        else:
            x1, x2 = x[..., :half].astype(mx.float32), x[..., half:d].astype(mx.float32)
            rotated = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        rotated = rotated.astype(x.dtype)
        return rotated if d == x.shape[-1] else mx.concatenate([rotated, x[..., d:]], axis=-1)


class LinearRope(Rope):
    def frequencies(self, inv):
        return inv / self.factor


class DynamicRope(Rope):
    """Dynamic NTK: past max_position_embeddings the base grows with the longest sequence."""

    def frequencies_for(self, longest: int) -> mx.array:
        if longest <= self.max_positions:
            return self.inv_freq
        d, f = self.dims, self.factor
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
    def __init__(self, head_dim, theta, scaling, max_positions, dims=None, traditional=False):
        super().__init__(head_dim, theta, scaling, max_positions, dims, traditional)
        def magnitude(m):   # yarn's attention-magnitude factor for mscale m
            return (0.1 * m * math.log(self.factor) + 1.0) if self.factor > 1 else 1.0
        # as mlx-lm: the ratio to mscale_all_dim's factor (which models with it fold into the scale)
        self.mscale = magnitude(float(scaling.get("mscale", 1.0))) / magnitude(float(scaling.get("mscale_all_dim", 0.0)))

    def frequencies(self, inv):
        s, d = self.scaling, self.dims
        old = float(s.get("original_max_position_embeddings", self.max_positions))
        beta_fast, beta_slow = float(s.get("beta_fast", 32)), float(s.get("beta_slow", 1))

        def dim_for(rotations):
            return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))
        lo, hi = max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), d - 1)
        # as mlx-lm: a range that crosses (hi < lo, short original contexts) leaves every frequency unscaled
        ramp = mx.clip((mx.arange(d // 2, dtype=mx.float32) - lo) / (hi - lo if hi != lo else 1e-3), 0, 1)
        return inv / self.factor * ramp + inv * (1 - ramp)


class LongRope(Rope):
    """Phi-3's `longrope` (`su`), as mlx-lm's SuScaledRoPE: the frequencies divided by
    `long_factor` (one per frequency; mlx-lm uses it at every length), and the rotated features
    scaled by sqrt(1 + ln(max / original) / ln(original)) when the model was extended."""

    def __init__(self, head_dim, theta, scaling, max_positions, dims=None, traditional=False):
        super().__init__(head_dim, theta, scaling, max_positions, dims, traditional)
        original = float(scaling.get("original_max_position_embeddings", 4096))
        extension = max_positions / original
        self.mscale = math.sqrt(1 + math.log(extension) / math.log(original)) if extension > 1 else 1.0

    def frequencies(self, inv):
        long = mx.array(self.scaling.get("long_factor", 1.0), dtype=mx.float32)
        if long.ndim and long.shape != inv.shape:
            raise MetalforgeError(f"config.json: rope_scaling.long_factor has {long.size} values; the rotated "
                                  f"head dimension needs {inv.size}")
        return inv / long


SCALINGS: dict[str, type[Rope]] = {"default": Rope, "linear": LinearRope, "dynamic": DynamicRope,
                                   "llama3": Llama3Rope, "yarn": YarnRope, "longrope": LongRope, "su": LongRope}


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


def make(head_dim: int, theta: float, scaling: dict | None, max_positions: int, dims: int | None = None,
         traditional: bool = False) -> Rope:
    return SCALINGS[scaling_type(scaling)](head_dim, theta, scaling or {}, max_positions, dims, traditional)
