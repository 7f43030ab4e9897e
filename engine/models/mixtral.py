"""Mixtral: Mistral's attention with a mixture of `num_local_experts` experts in every layer
(weights under block_sparse_moe), each `intermediate_size` wide: the top `num_experts_per_tok`
router logits, softmax over those."""
from dataclasses import dataclass

from metalforge.engine.models import base, moe


@dataclass(frozen=True)
class ModelArgs(moe.MoEArgs):
    rope_theta: float = 1e6
    num_experts: int | None = 8
    num_experts_per_tok: int | None = 2

    EXPERTS, EXPERT_SIZE = "num_local_experts", "intermediate_size"

    @classmethod
    def read(cls, config, where):
        return dict(super().read(config, where), rope_scaling=None)   # mlx-lm's mixtral rotates with plain RoPE


class MoE(moe.MoE):
    ROUTER = "block_sparse_moe.gate"
    EXPERTS = "block_sparse_moe.switch_mlp"

    def route(self, logits):
        return moe.softmax_of_top_k(logits, self.top_k, negated=True)


class DecoderLayer(base.DecoderLayer):
    MLP = MoE


class Model(base.Model):
    pass
