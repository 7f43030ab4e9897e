"""Gemma 2: soft-capped attention scores (attn_logit_softcapping) and logits
(final_logit_softcapping), norms as scale minus one before and after each block, GeGLU (tanh
GELU), embeddings scaled by sqrt(hidden), the head always tied, scores scaled by
query_pre_attn_scalar^-1/2. As mlx-lm's gemma2, which reads no sliding window: every layer
attends to the whole context. Gemma 3 (gemma3_text.py) builds on these blocks."""
from dataclasses import dataclass, replace

from metalforge.engine.config import positive
from metalforge.engine.models import base

# mlx-lm runs tanh GELU whatever the config names; the names Gemma's configs use are accepted
GELU = (("hidden_act", "gelu_pytorch_tanh", ("gelu_pytorch_tanh",)),
        ("hidden_activation", "gelu_pytorch_tanh", ("gelu_pytorch_tanh",)), ("use_sliding_window", False, (False,)))


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    query_pre_attn_scalar: float = 144.0

    IMPLEMENTED = GELU

    @classmethod
    def read(cls, config, where):
        return dict(rope_scaling=None,   # mlx-lm's gemma2 reads none
                    attn_logit_softcapping=base.optional_positive(config, "attn_logit_softcapping", where, 50.0),
                    final_logit_softcapping=base.optional_positive(config, "final_logit_softcapping", where, 30.0),
                    query_pre_attn_scalar=positive(config, "query_pre_attn_scalar", where, cls.query_pre_attn_scalar))


class Attention(base.Attention):
    def attention_scale(self, args):
        return args.query_pre_attn_scalar ** -0.5

    def softcap_of(self, args):
        return getattr(args, "attn_logit_softcapping", None)


class MLP(base.GatedMLP):
    NORM = "pre_feedforward_layernorm"


class DecoderLayer(base.PostNormDecoderLayer):
    Attention = Attention
    MLP = MLP


class Model(base.Model):
    Norm = base.OffsetRMSNorm
    ACTIVATION = "gelu_approx"

    def adapt(self, args, w):
        return replace(args, tie_word_embeddings=True)

    def embedding_scale(self, args):
        return args.hidden_size ** 0.5

    def final_softcap_of(self, args):
        return getattr(args, "final_logit_softcapping", None)
