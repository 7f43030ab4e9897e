"""Rotary position embeddings, one class per `rope_scaling` type mlx-lm configs use (a table:
a new type is one class and one line), applied by MLX's `mx.fast.rope`: one dispatch for q and one
for k per layer, as mlx-lm launches, whatever mix of sequences a step holds (each token at its own
stored position, an offset per token). Nothing is read back from the device: the positions and
dynamic NTK's longest sequence are host numbers the pool already knows."""
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
        mx.eval(self.inv_freq)   # computed once here, never in a forward pass's graph

    def base_frequencies(self, theta: float) -> mx.array:
        return 1.0 / (theta ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims))

    def frequencies(self, inv: mx.array) -> mx.array:
        return inv

    def frequencies_for(self, longest: int) -> mx.array:
        """The inverse periods of a step whose longest sequence holds `longest` positions, for
        kernels that rotate in their epilogue (norm_qkv): computed once, not per step."""
        return self.inv_freq

    def fast_args(self, longest: int) -> dict:
        """mx.fast.rope's base, scale and freqs for a step whose longest sequence holds `longest`
        positions. Types whose frequencies are theta's (scaled positions at most) pass theta, as
        mlx-lm does; the others pass their periods, 1 / inv_freq (MLX's convention)."""
        return dict(base=self.theta, scale=1.0, freqs=None)

    def __call__(self, x: mx.array, step) -> mx.array:
        """x: (1, H, tokens, D), the tokens of `step` (engine/kv/step.py) sequence after sequence,
        each rotated at its stored position: one mx.fast.rope for the whole ragged step, each
        token a row (tokens, H, 1, D) with its position as the row's offset."""
        if self.mscale != 1.0:   # the attention-magnitude factor, on the rotated features (as mlx-lm)
            x = x * self.mscale if self.dims == x.shape[-1] else x.at[..., :self.dims].multiply(self.mscale)
        rows = self._rope(x.transpose(2, 1, 0, 3), step.positions.reshape(-1), self.fast_args(step.longest))
        return rows.transpose(2, 1, 0, 3)

    def _rope(self, x: mx.array, offset, args: dict) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, offset=offset, **args)


class FrequencyRope(Rope):
    """A type with its own frequencies: MLX reads them as periods (1 / inv_freq)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.periods = 1.0 / self.inv_freq
        mx.eval(self.periods)

    def fast_args(self, longest: int) -> dict:
        return dict(base=None, scale=1.0, freqs=self.periods)


class LinearRope(Rope):
    """Positions divided by the factor (MLX's scale), as mlx-lm passes it."""

    def frequencies(self, inv):
        return inv / self.factor

    def fast_args(self, longest: int) -> dict:
        return dict(base=self.theta, scale=1.0 / self.factor, freqs=None)


class DynamicRope(Rope):
    """Dynamic NTK: past max_position_embeddings the base grows with the longest sequence."""

    def frequencies_for(self, longest: int) -> mx.array:
        if longest <= self.max_positions:
            return self.inv_freq
        return self.base_frequencies(self.fast_args(longest)["base"])

    def fast_args(self, longest: int) -> dict:
        if longest <= self.max_positions:
            return super().fast_args(longest)
        d, f = self.dims, self.factor
        return dict(base=self.theta * ((f * longest / self.max_positions) - (f - 1)) ** (d / (d - 2)), scale=1.0,
                    freqs=None)


class Llama3Rope(FrequencyRope):
    def frequencies(self, inv):
        s = self.scaling
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old = float(s.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        return mx.where(wavelen > old / low, inv / self.factor,
                        mx.where(wavelen < old / high, inv, (1 - smooth) * inv / self.factor + smooth * inv))


class YarnRope(FrequencyRope):
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


class LongRope(FrequencyRope):
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
