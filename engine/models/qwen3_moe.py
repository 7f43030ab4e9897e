"""Qwen3-MoE: Qwen3's attention (q/k norms) with a mixture of experts in every
`decoder_sparse_step`-th layer not listed in `mlp_only_layers` (the others keep a dense MLP):
softmax over the experts, the top `num_experts_per_tok`, renormalised when `norm_topk_prob`."""
from dataclasses import dataclass

from metalforge.engine.config import size
from metalforge.engine.models import base, moe
from metalforge.errors import MetalforgeError


@dataclass(frozen=True)
class ModelArgs(moe.MoEArgs):
    qk_norm: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    norm_topk_prob: bool = False

    @classmethod
    def read(cls, config, where):
        only = config.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise MetalforgeError(f"{where}: mlp_only_layers must be a list of layer numbers, got {only!r}")
        experts = super().read(config, where) if config.get("num_experts") else dict(num_experts=0)   # 0: all dense
        return dict(experts, rope_scaling=None,   # mlx-lm's qwen3_moe rotates with plain RoPE
                    decoder_sparse_step=size(config, "decoder_sparse_step", where, 1, base.LAYERS),
                    mlp_only_layers=tuple(only), norm_topk_prob=base.flag(config, "norm_topk_prob", where))


class MoE(moe.MoE):
    def route(self, logits):
        return moe.top_k_of_softmax(logits, self.top_k, self.args.norm_topk_prob)


class DecoderLayer(base.DecoderLayer):
    @classmethod
    def mlp_class(cls, args, layer):
        sparse = args.num_experts > 0 and (layer + 1) % args.decoder_sparse_step == 0
        return MoE if sparse and layer not in args.mlp_only_layers else base.GatedMLP


class Model(base.Model):
    pass
