"""gpt-oss: attention with a learned sink logit per head and biases on every projection,
sliding-window layers (`layer_types`, by default alternating with full attention), and a
mixture of `num_local_experts` experts, each `intermediate_size` wide, in every layer: router
with a bias, the top `num_experts_per_tok` logits softmaxed, experts with biases and OpenAI's
clipped SwiGLU (gate clipped above at 7, up to [-7, 7], (up + 1) * gate * sigmoid(1.702 gate)).
As mlx-lm's gpt_oss, on MLX-layout (affine) weights: the checkpoints' own MXFP4 format is
refused by the quantization mode check."""
from dataclasses import dataclass

import mlx.core as mx

from metalforge.engine.config import size
from metalforge.engine.models import base, moe


@dataclass(frozen=True)
class ModelArgs(moe.MoEArgs):
    attention_bias: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    sliding_window: int | None = 128
    num_experts: int | None = 128
    num_experts_per_tok: int | None = 4

    EXPERTS, EXPERT_SIZE = "num_local_experts", "intermediate_size"

    @classmethod
    def read(cls, config, where):
        alternating = [base.SLIDING, base.FULL] * (config["num_hidden_layers"] // 2)
        return dict(super().read(config, where), attention_bias=True,
                    layer_types=base.read_layer_types(config, where, alternating),
                    sliding_window=size(config, "sliding_window", where, cls.sliding_window, base.POSITIONS))


class Attention(base.Attention):
    SINKS = True
    BIASED = "qkvo"


def swiglu_oai(gate: mx.array, up: mx.array, alpha: float = 1.702, limit: float = 7.0) -> mx.array:
    gate = mx.minimum(gate, limit)
    return (mx.clip(up, -limit, limit) + 1.0) * (gate * mx.sigmoid(alpha * gate))


class MoE(moe.MoE):
    ROUTER = "mlp.router"
    EXPERTS = "mlp.experts"

    def activation(self):
        return swiglu_oai

    def route(self, logits):
        return moe.softmax_of_top_k(logits, self.top_k)


class DecoderLayer(base.DecoderLayer):
    Attention = Attention
    MLP = MoE


class Model(base.Model):
    pass
