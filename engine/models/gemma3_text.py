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
    rope_local_base_freq: float = 10_000.0
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 512
    sliding_window_pattern: int = 6

    IMPLEMENTED = gemma2.GELU

    @classmethod
    def read(cls, config, where):
        return dict(rope_local_base_freq=positive(config, "rope_local_base_freq", where, cls.rope_local_base_freq),
                    query_pre_attn_scalar=positive(config, "query_pre_attn_scalar", where, cls.query_pre_attn_scalar),
                    sliding_window=size(config, "sliding_window", where, cls.sliding_window),
                    sliding_window_pattern=size(config, "sliding_window_pattern", where, cls.sliding_window_pattern))


def is_sliding(args: ModelArgs, layer: int) -> bool:
    return (layer + 1) % args.sliding_window_pattern != 0


class Attention(gemma2.Attention):
    def make_rope(self, args, layer):
        if is_sliding(args, layer):
            return ropes.make(args.head_dim, args.rope_local_base_freq, None, args.max_position_embeddings)
        return super().make_rope(args, layer)

    def window_of(self, args, layer):
        return args.sliding_window if is_sliding(args, layer) else None


class DecoderLayer(gemma2.DecoderLayer):
    Attention = Attention

    def add(self, h, r):
        """In float16 the sum is taken in float32 and clipped to float16's range (mlx-lm's clip_residual)."""
        if h.dtype != mx.float16:
            return h + r
        bound = mx.finfo(mx.float16).max
        return mx.clip(h.astype(mx.float32) + r.astype(mx.float32), -bound, bound).astype(mx.float16)


class Model(gemma2.Model):
    Args = ModelArgs
    Layer = DecoderLayer

    def adapt(self, args, w):
        return replace(args, tie_word_embeddings="lm_head.weight" not in w)

    def embedding_scale(self, args):
        return mx.array(args.hidden_size ** 0.5, dtype=mx.bfloat16).item()
