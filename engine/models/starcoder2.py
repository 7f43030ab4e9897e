"""StarCoder2: LayerNorms with biases (eps `norm_epsilon`), biases on every projection, a plain
MLP c_proj(gelu(c_fc(x))) with exact (erf) GELU, the head tied by default. As mlx-lm's
starcoder2: head dimension hidden / heads, no RoPE scaling and no sliding window."""
from dataclasses import dataclass

import mlx.nn as nn

from metalforge.engine.config import positive
from metalforge.engine.models import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    rope_theta: float = 100000.0
    # mlx-lm's starcoder2 runs exact GELU whatever the config names (its configs say gelu_pytorch_tanh)
    IMPLEMENTED = (("hidden_act", "gelu_pytorch_tanh", ("gelu_pytorch_tanh", "gelu")),
                   ("use_sliding_window", False, (False,)))

    @classmethod
    def read(cls, config, where):
        return dict(head_dim=config["hidden_size"] // config["num_attention_heads"], attention_bias=True,
                    rms_norm_eps=positive(config, "norm_epsilon", where, 1e-5), rope_scaling=None)


class Attention(base.Attention):
    BIASED = "qkvo"

    @classmethod
    def vectors(cls, a, p):
        return {**super().vectors(a, p), p + cls.NORM + ".bias": a.hidden_size}


class MLP(base.Block):
    """c_proj(gelu(c_fc(x))) after its LayerNorm; its linears run through the op layer."""
    NORM = "post_attention_layernorm"

    def __init__(self, args, kernels, w, p, layer, dtype, model):
        super().__init__(args, w, p, model)
        self.c_fc, self.c_proj = (base.Linear(kernels, w, p + f"mlp.{n}", args) for n in ("c_fc", "c_proj"))

    def __call__(self, h):
        return self.c_proj(nn.gelu(self.c_fc(self.norm(h))))

    @classmethod
    def linears(cls, a, p):
        return {p + "mlp.c_fc": (a.intermediate_size, a.hidden_size), p + "mlp.c_proj": (a.hidden_size, a.intermediate_size)}

    @classmethod
    def vectors(cls, a, p):
        return {**super().vectors(a, p), p + cls.NORM + ".bias": a.hidden_size,
                p + "mlp.c_fc.bias": a.intermediate_size, p + "mlp.c_proj.bias": a.hidden_size}


class DecoderLayer(base.DecoderLayer):
    Attention = Attention
    MLP = MLP


class Model(base.Model):
    Norm = base.LayerNorm

    @classmethod
    def vectors(cls, args):
        return {**super().vectors(args), "model.norm.bias": args.hidden_size}
