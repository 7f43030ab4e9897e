"""OLMo 2: norms after each block instead of before (post_attention_layernorm on the attention's
output, post_feedforward_layernorm on the MLP's), RMS norms of the whole q and k projections
(across heads) before RoPE, biases on all four projections when attention_bias; the head tied
unless tie_word_embeddings is false. As mlx-lm's olmo2."""
from dataclasses import dataclass

from metalforge.engine.models import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    tie_word_embeddings: bool = True


class Attention(base.Attention):
    NORM = None
    BIASED = "qkvo"

    def make_projections(self, kernels, w, p, args):
        super().make_projections(kernels, w, p, args)
        self.q_full_norm = base.RMSNorm(w, p + "self_attn.q_norm", args.rms_norm_eps)
        self.k_full_norm = base.RMSNorm(w, p + "self_attn.k_norm", args.rms_norm_eps)

    def project(self, x):
        q, k, v = super().project(x)
        return self.q_full_norm(q), self.k_full_norm(k), v

    @classmethod
    def vectors(cls, a, p):
        return {**super().vectors(a, p), p + "self_attn.q_norm.weight": a.num_attention_heads * a.head_dim,
                p + "self_attn.k_norm.weight": a.num_key_value_heads * a.head_dim}


class MLP(base.GatedMLP):
    NORM = None


class DecoderLayer(base.PostNormDecoderLayer):
    Attention = Attention
    MLP = MLP


class Model(base.Model):
    pass
