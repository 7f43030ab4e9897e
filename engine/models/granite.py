"""Granite: llama with four multipliers: embeddings times embedding_multiplier, attention
scores scaled by attention_multiplier (instead of 1/sqrt(head_dim)), each block's output times
residual_multiplier before it joins the residual, logits divided by logits_scaling; biases on
all four projections when attention_bias; the head tied by default. As mlx-lm's granite (head
dimension hidden / heads)."""
from dataclasses import dataclass

from metalforge.engine.config import positive
from metalforge.engine.models import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    tie_word_embeddings: bool = True
    embedding_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @classmethod
    def read(cls, config, where):
        names = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")
        missing = [n for n in names if n not in config]
        if missing:
            raise KeyError(missing[0])
        return {"head_dim": config["hidden_size"] // config["num_attention_heads"],
                **{n: positive(config, n, where, None) for n in names}}


class Attention(base.Attention):
    BIASED = "qkvo"

    def attention_scale(self, args):
        return args.attention_multiplier


class DecoderLayer(base.DecoderLayer):
    Attention = Attention


class Model(base.Model):
    def embedding_scale(self, args):
        return args.embedding_multiplier

    @staticmethod
    def residual_scale(args):
        return args.residual_multiplier

    def logits_scale_of(self, args):
        return 1 / args.logits_scaling
