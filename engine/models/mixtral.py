"""Mixtral: Mistral's attention with a mixture of `num_local_experts` experts in every layer
(weights under block_sparse_moe): the top `num_experts_per_tok` router logits, softmax over
those."""
from dataclasses import dataclass

from metalforge.engine.config import size
from metalforge.engine.models import base, moe


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    rope_theta: float = 1e6
    num_local_experts: int = 8
    num_experts_per_tok: int = 2

    @classmethod
    def read(cls, config, where):
        return dict(rope_scaling=None,   # mlx-lm's mixtral rotates with plain RoPE
                    num_local_experts=size(config, "num_local_experts", where, cls.num_local_experts),
                    num_experts_per_tok=size(config, "num_experts_per_tok", where, cls.num_experts_per_tok))


class MoE(moe.MoE):
    ROUTER = "block_sparse_moe.gate"
    EXPERTS = "block_sparse_moe.switch_mlp"

    def route(self, logits):
        return moe.softmax_of_top_k(logits, self.top_k, negated=True)

    @classmethod
    def sizes(cls, a):
        return a.num_local_experts, a.intermediate_size


class DecoderLayer(base.DecoderLayer):
    MLP = MoE


class Model(base.Model):
    Args = ModelArgs
    Layer = DecoderLayer
