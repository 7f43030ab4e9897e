"""Gemma 3 (text): Gemma 2's blocks (gemma2.py) without soft-caps, with five sliding-window
layers to one global (`sliding_window_pattern`), the local layers with their own RoPE base
(`rope_local_base_freq`) and no scaling, RMS norms of q and k per head, embeddings scaled by
sqrt(hidden) rounded to bfloat16, float16 residual sums clipped to float16's range, and the head
tied when the folder has none. As mlx-lm's gemma3_text."""
from dataclasses import dataclass, replace

import mlx.core as mx

from metalforge.engine.config import positive, size
from metalforge.engine.models import base, gemma2, rope as ropes


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    qk_norm: bool = True
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    sliding_window: int | None = 512
    rope_local_base_freq: float = 10_000.0
    query_pre_attn_scalar: float = 256.0

    IMPLEMENTED = gemma2.GELU

    @classmethod
    def read(cls, config, where):
        pattern = size(config, "sliding_window_pattern", where, 6, base.LAYERS)   # every pattern-th layer full
        types = [base.FULL if (i + 1) % pattern == 0 else base.SLIDING for i in range(config["num_hidden_layers"])]
        return dict(rope_local_base_freq=positive(config, "rope_local_base_freq", where, cls.rope_local_base_freq),
                    query_pre_attn_scalar=positive(config, "query_pre_attn_scalar", where, cls.query_pre_attn_scalar),
                    sliding_window=size(config, "sliding_window", where, cls.sliding_window, base.POSITIONS),
                    layer_types=tuple(types))


class Attention(gemma2.Attention):
    def make_rope(self, args, layer):
        if args.sliding(layer):
            return ropes.make(args.head_dim, args.rope_local_base_freq, None, args.max_position_embeddings)
        return super().make_rope(args, layer)


class DecoderLayer(gemma2.DecoderLayer):
    Attention = Attention

    def add(self, h, r):
        """In float16 the sum is taken in float32 and clipped to float16's range (mlx-lm's clip_residual)."""
        if h.dtype != mx.float16:
            return h + r
        bound = mx.finfo(mx.float16).max
        return mx.clip(h.astype(mx.float32) + r.astype(mx.float32), -bound, bound).astype(mx.float16)


class Model(gemma2.Model):
    def adapt(self, args, w):
        return replace(args, tie_word_embeddings="lm_head.weight" not in w)

    def embedding_scale(self, args):
        return mx.array(args.hidden_size ** 0.5, dtype=mx.bfloat16).item()
