"""GLM-4: RoPE over `partial_rotary_factor` of each head, rotating adjacent pairs
(rope_traditional, true by default), biases on q, k and v when attention_bias, gate and up in
one fused projection (as Phi-3's), and four norms per layer: before and after attention
(post_self_attn_layernorm), before and after the MLP (post_mlp_layernorm). As mlx-lm's glm4:
an untied head."""
from dataclasses import dataclass

from metalforge.engine.models import base, phi3


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    rope_traditional: bool = True
    max_position_embeddings: int = 32768

    @classmethod
    def read(cls, config, where):
        return dict(partial_rotary_factor=base.rotary_factor(config, where), rope_scaling=None,
                    tie_word_embeddings=False)


class DecoderLayer(base.DecoderLayer):
    MLP = phi3.MLP
    POST_ATTENTION_NORM = "post_self_attn_layernorm"
    POST_MLP_NORM = "post_mlp_layernorm"


class Model(base.Model):
    pass
