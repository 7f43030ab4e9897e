"""Mixture-of-experts blocks shared by the MoE model types (mixtral, qwen2_moe, qwen3_moe,
gpt_oss): a router picks each token's top-k experts, whose stacked weights (experts, out, in) run
through the op layer's `expert_linear` (MLX's gather_qmm / gather_mm, as mlx-lm's SwitchGLU:
tokens sorted by expert from 64 (token, expert) pairs on), and the experts' outputs are summed
with the routing scores. A model type names its weights, its routing (`route`) and the config's
names for the expert counts (MoEArgs)."""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from metalforge.engine.config import LIMITS, size
from metalforge.engine.models import base


MOST_EXPERTS = 1 << 16   # experts in a layer, or taken per token: a typo's bound, well above any model's


@dataclass(frozen=True)
class MoEArgs(base.ModelArgs):
    """The expert fields of every MoE model type. A default of None: config.json must set it."""
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None   # each expert's intermediate size

    # (not fields) config.json's names for the number of experts and their intermediate size
    EXPERTS = "num_experts"
    EXPERT_SIZE = "moe_intermediate_size"

    @classmethod
    def read(cls, config, where):
        return dict(num_experts=size(config, cls.EXPERTS, where, cls.num_experts, MOST_EXPERTS),
                    num_experts_per_tok=size(config, "num_experts_per_tok", where, cls.num_experts_per_tok,
                                             MOST_EXPERTS),
                    moe_intermediate_size=size(config, cls.EXPERT_SIZE, where, most=LIMITS["intermediate_size"]))


class ExpertLinear:
    """One stacked expert layer's weights, run for each token's chosen experts."""

    def __init__(self, kernels, w: dict, name: str, args):
        self.kernels = kernels
        self.w = {k: w[f"{name}.{k}"] for k in ("weight", "scales", "biases", "bias") if f"{name}.{k}" in w}
        self.bits, self.group_size, self.mode = args.quant_of(name) if "scales" in self.w else (None, None, None)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        return self.kernels.expert_linear(x, self.w, indices, self.bits, self.group_size, sorted_indices, self.mode)


swiglu = base.GATED["silu"]


class SwitchGLU:
    """down(act(gate(x)) * up(x)) for each token's k experts: (T, H), (T, k) -> (T, k, H)."""

    SORT_FROM = 64   # (token, expert) pairs from which tokens are sorted by expert (mlx-lm's rule)

    def __init__(self, kernels, w: dict, name: str, args, activation=swiglu):
        self.gate_proj, self.up_proj, self.down_proj = (ExpertLinear(kernels, w, f"{name}.{n}_proj", args)
                                                        for n in ("gate", "up", "down"))
        self.activation = activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= self.SORT_FROM
        idx, inv_order = indices, None
        if do_sort:
            k = indices.shape[-1]
            flat = indices.flatten()
            order = mx.argsort(flat)
            inv_order = mx.argsort(order)
            x, idx = x.flatten(0, -3)[order // k], flat[order]
        y = self.down_proj(self.activation(self.gate_proj(x, idx, do_sort), self.up_proj(x, idx, do_sort)),
                           idx, do_sort)
        if do_sort:
            y = mx.unflatten(y[inv_order], 0, indices.shape)
        return y.squeeze(-2)

    @staticmethod
    def linears(name: str, experts: int, hidden: int, inter: int) -> dict[str, tuple]:
        return {f"{name}.gate_proj": (experts, inter, hidden), f"{name}.up_proj": (experts, inter, hidden),
                f"{name}.down_proj": (experts, hidden, inter)}


class MoE(base.Block):
    """The MLP block of an MoE layer: router, experts, weighted sum. Subclasses name the router
    and experts (ROUTER, EXPERTS, relative to the layer) and `route`."""

    NORM = "post_attention_layernorm"
    ROUTER = "mlp.gate"
    EXPERTS = "mlp.switch_mlp"

    def __init__(self, args, kernels, w: dict, p: str, layer: int, dtype, model):
        super().__init__(args, w, p, model)
        self.top_k = model.top_k(args)
        self.router = base.Linear(kernels, w, p + self.ROUTER, args)
        self.experts = SwitchGLU(kernels, w, p + self.EXPERTS, args, self.activation())

    def activation(self):
        return swiglu

    def route(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """Router logits (T, experts) -> each token's experts (T, k) and their weights (T, k)."""
        raise NotImplementedError

    def __call__(self, h: mx.array) -> mx.array:
        return self.mix(self.norm(h))

    def mix(self, x: mx.array) -> mx.array:
        """The experts' outputs for the normed input x, weighted by the routing scores and summed."""
        indices, scores = self.route(self.router(x))
        return (self.experts(x, indices) * scores[..., None]).sum(axis=-2).astype(x.dtype)

    @classmethod
    def linears(cls, a, p):
        return {p + cls.ROUTER: (a.num_experts, a.hidden_size),
                **SwitchGLU.linears(p + cls.EXPERTS, a.num_experts, a.hidden_size, a.moe_intermediate_size)}


def largest(x: mx.array, k: int, negated: bool = False) -> mx.array:
    """Indices of the k largest of the last axis, in the order mlx-lm's module finds them
    (partition of x, or of -x), so the weighted sum adds in the same order."""
    return mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k] if negated else mx.argpartition(x, kth=-k, axis=-1)[..., -k:]


def top_k_of_softmax(logits: mx.array, k: int, normalize: bool, negated: bool = False):
    """Softmax over all experts, then the k largest (renormalised to sum 1 when `normalize`):
    Qwen's routing. Returns each token's experts (T, k) and weights (T, k)."""
    gates = mx.softmax(logits, axis=-1, precise=True)
    indices = largest(gates, k, negated)
    scores = mx.take_along_axis(gates, indices, axis=-1)
    return indices, scores / mx.sum(scores, axis=-1, keepdims=True) if normalize else scores


def softmax_of_top_k(logits: mx.array, k: int, negated: bool = False):
    """The k largest logits, then a softmax over those: Mixtral's and gpt-oss's routing."""
    indices = largest(logits, k, negated)
    return indices, mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
