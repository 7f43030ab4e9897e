"""Qwen2-MoE: Qwen2's attention (q/k/v biases) with a mixture of experts in every layer:
softmax over the experts, the top `num_experts_per_tok` (not renormalised), plus a shared
expert gated per token by sigmoid(shared_expert_gate(x))."""
from dataclasses import dataclass

import mlx.core as mx

from metalforge.engine.config import LIMITS, size
from metalforge.engine.models import base, moe


@dataclass(frozen=True)
class ModelArgs(moe.MoEArgs):
    attention_bias: bool = True
    rope_theta: float = 1e6
    shared_expert_intermediate_size: int | None = None

    IMPLEMENTED = base.IMPLEMENTED + (("norm_topk_prob", False, (False,)),)   # mlx-lm's does not renormalise

    @classmethod
    def read(cls, config, where):
        return dict(super().read(config, where), shared_expert_intermediate_size=size(
            config, "shared_expert_intermediate_size", where, most=LIMITS["intermediate_size"]))


class SharedExpert(base.GatedMLP):
    """The expert every token takes: a gated MLP under mlp.shared_expert (the block's norm is the MoE's)."""
    NORM = None
    PREFIX = "mlp.shared_expert."

    @classmethod
    def intermediate_size(cls, a):
        return a.shared_expert_intermediate_size


class MoE(moe.MoE):
    def __init__(self, args, kernels, w, p, layer, dtype, model):
        super().__init__(args, kernels, w, p, layer, dtype, model)
        self.shared_expert = SharedExpert(args, kernels, w, p, layer, dtype, model)
        self.shared_expert_gate = base.Linear(kernels, w, p + "mlp.shared_expert_gate", args)

    def route(self, logits):
        return moe.top_k_of_softmax(logits, self.top_k, normalize=False, negated=True)

    def mix(self, x):
        return super().mix(x) + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    @classmethod
    def linears(cls, a, p):
        return {**super().linears(a, p), **SharedExpert.linears(a, p), p + "mlp.shared_expert_gate": (1, a.hidden_size)}


class DecoderLayer(base.DecoderLayer):
    MLP = MoE


class Model(base.Model):
    pass
