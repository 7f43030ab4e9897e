"""Phi-3 (and Phi-4 checkpoints of that type): q, k and v in one fused projection (qkv_proj),
gate and up in one (gate_up_proj), RoPE over `partial_rotary_factor` of each head, with
LongRoPE (`longrope`/`su`, the folder's original_max_position_embeddings) or linear scaling.
As mlx-lm's phi3: the head dimension is hidden / heads."""
from dataclasses import dataclass, replace

import mlx.core as mx

from metalforge.engine.config import size
from metalforge.engine.models import base, rope as ropes
from metalforge.errors import MetalforgeError


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096

    @classmethod
    def read(cls, config, where):
        scaling = config.get("rope_scaling")
        if scaling and ropes.scaling_type(scaling, where) not in ("longrope", "su", "linear"):
            raise MetalforgeError(f"{where}: rope_scaling.type {ropes.scaling_type(scaling)!r} is not supported for "
                                  "phi3; supported: linear, longrope, su")
        return dict(head_dim=config["hidden_size"] // config["num_attention_heads"],
                    original_max_position_embeddings=size(config, "original_max_position_embeddings", where,
                                                          4096, base.POSITIONS),
                    partial_rotary_factor=base.rotary_factor(config, where))


class Attention(base.Attention):
    def make_projections(self, kernels, w, p, args):
        self.qkv_proj = base.Linear(kernels, w, p + "self_attn.qkv_proj", args)
        self.o_proj = base.Linear(kernels, w, p + "self_attn.o_proj", args)

    def project(self, x):
        a = self.args
        q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        return tuple(mx.split(self.qkv_proj(x), [q, q + kv], axis=-1))

    def make_rope(self, args, layer):
        scaling = args.rope_scaling
        if scaling and ropes.scaling_type(scaling) in ("longrope", "su"):   # the folder's own original length
            args = replace(args, rope_scaling={**scaling, "original_max_position_embeddings":
                                               args.original_max_position_embeddings})
        return super().make_rope(args, layer)

    @classmethod
    def linears(cls, a, p):
        q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        return {p + "self_attn.qkv_proj": (q + 2 * kv, a.hidden_size), p + "self_attn.o_proj": (a.hidden_size, q)}


class MLP(base.GatedMLP):
    def make_projections(self, kernels, w, p, args):
        self.gate_up_proj = base.Linear(kernels, w, p + "mlp.gate_up_proj", args)
        self.down_proj = base.Linear(kernels, w, p + "mlp.down_proj", args)

    def gate_up(self, x):
        return tuple(mx.split(self.gate_up_proj(x), 2, axis=-1))

    @classmethod
    def linears(cls, a, p):
        return {p + "mlp.gate_up_proj": (2 * a.intermediate_size, a.hidden_size),
                p + "mlp.down_proj": (a.hidden_size, a.intermediate_size)}


class DecoderLayer(base.DecoderLayer):
    Attention = Attention
    MLP = MLP


class Model(base.Model):
    pass
