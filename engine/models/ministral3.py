"""Ministral 3: llama with its RoPE in `rope_parameters` (rope_theta and the scaling, yarn for
the released models), queries scaled by position as Llama 4 does (1 + beta ln(1 + floor(p /
original_max_position_embeddings)), beta = llama_4_scaling_beta), sliding-window layers named
by `layer_types`, the head tied by default. As mlx-lm's ministral3."""
from dataclasses import dataclass

import mlx.core as mx

from metalforge.engine.config import positive, size
from metalforge.engine.models import base, rope as ropes
from metalforge.errors import MetalforgeError


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    tie_word_embeddings: bool = True
    llama_4_scaling_beta: float = 0.0
    original_max_position_embeddings: int = 1

    @classmethod
    def read(cls, config, where):
        rope = config.get("rope_parameters")
        if not isinstance(rope, dict):
            raise MetalforgeError(f"{where}: rope_parameters must be an object with rope_theta, "
                                  f"llama_4_scaling_beta and original_max_position_embeddings, got {rope!r}")
        types = base.read_layer_types(config, where, [base.FULL] * config["num_hidden_layers"])
        window = size(config, "sliding_window", where, most=base.POSITIONS) if base.SLIDING in types else None
        beta = rope.get("llama_4_scaling_beta")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise MetalforgeError(f"{where}: rope_parameters.llama_4_scaling_beta must be a number, got {beta!r}")
        ropes.scaling_type(rope, f"{where}: rope_parameters")
        return dict(rope_theta=positive(rope, "rope_theta", f"{where}: rope_parameters", None), rope_scaling=rope,
                    layer_types=types, sliding_window=window, llama_4_scaling_beta=float(beta),
                    original_max_position_embeddings=size(rope, "original_max_position_embeddings",
                                                          f"{where}: rope_parameters", most=base.POSITIONS))


class Attention(base.Attention):
    def scale_queries(self, q, step):
        a = self.args
        positions = step.positions.astype(mx.float32)   # (1, tokens)
        scale = 1 + a.llama_4_scaling_beta * mx.log(1 + mx.floor(positions / a.original_max_position_embeddings))
        return q * scale[:, None, :, None].astype(q.dtype)


class DecoderLayer(base.DecoderLayer):
    Attention = Attention


class Model(base.Model):
    pass
