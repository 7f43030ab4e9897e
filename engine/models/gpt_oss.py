"""gpt-oss: attention with a learned sink logit per head and biases on every projection,
sliding-window layers (`layer_types`, by default alternating with full attention), and a
mixture of experts in every layer: router with a bias, the top `num_experts_per_tok` logits
softmaxed, experts with biases and OpenAI's clipped SwiGLU (gate clipped above at 7, up to
[-7, 7], (up + 1) * gate * sigmoid(1.702 gate)). As mlx-lm's gpt_oss, on MLX-layout (affine)
weights: the checkpoints' own MXFP4 format is refused by the quantization mode check."""
from dataclasses import dataclass

import mlx.core as mx

from metalforge.engine.config import size
from metalforge.engine.models import base, moe
from metalforge.errors import MetalforgeError

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    attention_bias: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: tuple = ()

    @classmethod
    def read(cls, config, where):
        layers = config["num_hidden_layers"]
        types = config.get("layer_types") or list(LAYER_TYPES) * (layers // 2)
        if not isinstance(types, list) or len(types) != layers or not set(types) <= set(LAYER_TYPES):
            raise MetalforgeError(f"{where}: layer_types must list {layers} of {', '.join(LAYER_TYPES)}; got {types!r}")
        return dict(attention_bias=True, layer_types=tuple(types),
                    num_local_experts=size(config, "num_local_experts", where, cls.num_local_experts),
                    num_experts_per_tok=size(config, "num_experts_per_tok", where, cls.num_experts_per_tok),
                    sliding_window=size(config, "sliding_window", where, cls.sliding_window))


class Attention(base.Attention):
    SINKS = True
    BIASED = "qkvo"

    def window_of(self, args, layer):
        return args.sliding_window if args.layer_types[layer] == "sliding_attention" else None


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

    @classmethod
    def sizes(cls, a):
        return a.num_local_experts, a.intermediate_size


class DecoderLayer(base.DecoderLayer):
    Attention = Attention
    MLP = MoE


class Model(base.Model):
    Args = ModelArgs
    Layer = DecoderLayer
