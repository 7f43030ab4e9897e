"""What the decoder model types share, as mlx-lm's files would repeat it: the config fields,
the blocks (RMS norm, attention, gated MLP, embedding, output head) as layer objects that own
their weights, the layer stack, and the two facts the rest of metalforge asks of a model: its
op plan (which kernel shapes it runs) and its parameter count. Both are read off the same weight
table the loader checks, so nothing else describes a layer. A model type's module subclasses
what differs (see llama.py, qwen2.py, qwen3.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import mlx.core as mx

from metalforge.engine import ops
from metalforge.engine.config import positive, size, sizes
from metalforge.engine.kv import BLOCK_SIZE
from metalforge.engine.models import rope as ropes
from metalforge.errors import MetalforgeError


# Config fields whose other values change the computation in ways no model type here implements:
# (field, its value when absent, the values we run). Anything else is refused at load, by name.
IMPLEMENTED = (("hidden_act", "silu", ("silu",)), ("mlp_bias", False, (False,)),
               ("use_sliding_window", False, (False,)), ("rope_traditional", False, (False,)))


def check_implemented(config: dict, where: str) -> None:
    for name, default, supported in IMPLEMENTED:
        value = config.get(name, default)
        if value not in supported:
            raise MetalforgeError(f"{where}: {name}={value!r} is not supported; supported: "
                                  f"{', '.join(map(repr, supported))}")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # biases on the q/k/v projections
    qk_norm: bool = False             # RMS norm of q and k per head
    quantization: dict | None = None  # {"bits": 4, "group_size": 64}
    eos_token_id: tuple = field(default_factory=tuple)

    @property
    def bits(self) -> int | None:
        return int(self.quantization["bits"]) if self.quantization else None

    @property
    def group_size(self) -> int | None:
        return int(self.quantization["group_size"]) if self.quantization else None

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "ModelArgs":
        """The config's fields, sizes checked by engine/config.py; a model type's own defaults
        are its subclass's field defaults (qwen2: attention_bias=True)."""
        sz = sizes(config, where)
        defaults = {f.name: f.default for f in fields(cls)}
        ropes.scaling_type(config.get("rope_scaling"), where)
        check_implemented(config, where)
        eos = config.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        try:
            return cls(model_type=config["model_type"], **sz.__dict__,
                       num_hidden_layers=size(config, "num_hidden_layers", where),
                       rms_norm_eps=positive(config, "rms_norm_eps", where, 1e-6),
                       rope_theta=positive(config, "rope_theta", where, 10000.0),
                       rope_scaling=config.get("rope_scaling"),
                       max_position_embeddings=size(config, "max_position_embeddings", where, 4096),
                       tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                       attention_bias=bool(config.get("attention_bias", defaults["attention_bias"])),
                       eos_token_id=eos)
        except KeyError as e:
            raise MetalforgeError(f"{where}: missing required field {e}") from None


# ---- the weight table ----------------------------------------------------------------------------
def linears(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """Every linear layer's (out, in) size by weight name: the embedding table reads as one."""
    a = args
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    out = {"model.embed_tokens": (a.vocab_size, a.hidden_size)}
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj": (q, a.hidden_size), p + "self_attn.k_proj": (kv, a.hidden_size),
                    p + "self_attn.v_proj": (kv, a.hidden_size), p + "self_attn.o_proj": (a.hidden_size, q),
                    p + "mlp.gate_proj": (a.intermediate_size, a.hidden_size),
                    p + "mlp.up_proj": (a.intermediate_size, a.hidden_size),
                    p + "mlp.down_proj": (a.hidden_size, a.intermediate_size)})
    if not a.tie_word_embeddings:
        out["lm_head"] = (a.vocab_size, a.hidden_size)
    return out


def vectors(args: ModelArgs) -> dict[str, int]:
    """Every vector weight's size by name: norms, and q/k/v biases where the model type has them."""
    a = args
    out = {"model.norm.weight": a.hidden_size}
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}."
        if a.attention_bias:
            out.update({p + f"self_attn.{n}_proj.bias": s for n, s in
                        (("q", a.num_attention_heads * a.head_dim), ("k", a.num_key_value_heads * a.head_dim),
                         ("v", a.num_key_value_heads * a.head_dim))})
        if a.qk_norm:
            out.update({p + "self_attn.q_norm.weight": a.head_dim, p + "self_attn.k_norm.weight": a.head_dim})
        out.update({p + "input_layernorm.weight": a.hidden_size, p + "post_attention_layernorm.weight": a.hidden_size})
    return out


def check_weights(args: ModelArgs, w: dict[str, mx.array]) -> None:
    """Every tensor the forward pass reads is present with the shape the config implies, so a
    mismatched checkpoint is one clear error at load instead of a failure mid-generation."""
    table = linears(args)
    required = [n + ".weight" for n in table] + [n for n in vectors(args) if not n.endswith(".bias")]
    missing = [n for n in required if n not in w]
    if missing:
        raise MetalforgeError(f"weights are missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    expected = {n: (s,) for n, s in vectors(args).items()}
    for name, (out, inp) in table.items():
        if name + ".scales" in w:
            if args.quantization is None:
                raise MetalforgeError(f"weight {name} is quantized but config.json has no 'quantization'")
            expected[name + ".weight"] = (out, inp * args.bits // 32)
            expected[name + ".scales"] = expected[name + ".biases"] = (out, inp // args.group_size)
        else:
            expected[name + ".weight"] = (out, inp)
    for name, shape in expected.items():
        if name in w and tuple(w[name].shape) != shape:
            raise MetalforgeError(f"weight {name} has shape {tuple(w[name].shape)}, but config.json implies {shape}")


# ---- layers ----------------------------------------------------------------------------------------
class Linear:
    """One linear layer's weights (weight, and scales/biases when quantized, and a bias), run
    through the op layer, which picks ours or MLX's per row bucket."""

    def __init__(self, kernels: ops.Kernels, w: dict, name: str, args: ModelArgs):
        self.kernels, self.bits, self.group_size = kernels, args.bits, args.group_size
        self.w = {k: w[f"{name}.{k}"] for k in ("weight", "scales", "biases", "bias") if f"{name}.{k}" in w}

    def __call__(self, x: mx.array) -> mx.array:
        return self.kernels.linear(x, self.w, self.bits, self.group_size)


class RMSNorm:
    def __init__(self, w: dict, name: str, eps: float):
        self.weight, self.eps = w[f"{name}.weight"], eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Attention:
    """GQA self-attention over the KV pool: the attention input (norm, q/k/v projections,
    per-head norms, RoPE) and attention are the op layer's; o_proj is a linear."""

    def __init__(self, args: ModelArgs, kernels: ops.Kernels, w: dict, p: str, layer: int, dtype):
        self.args, self.kernels, self.layer, self.dtype = args, kernels, layer, dtype
        self.norm = RMSNorm(w, p + "input_layernorm", args.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            Linear(kernels, w, p + f"self_attn.{n}_proj", args) for n in "qkvo")
        self.q_norm = RMSNorm(w, p + "self_attn.q_norm", args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(w, p + "self_attn.k_norm", args.rms_norm_eps) if args.qk_norm else None
        self.rope = ropes.make(args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)
        self.scale = 1 / math.sqrt(args.head_dim)   # yarn's magnitude factor is applied inside the rotation

    def __call__(self, h: mx.array, step) -> mx.array:
        q, k, v = self.kernels.attention_input(h, self, step)
        o = self.kernels.attention(q, step.update_and_fetch(self.layer, k, v), self.scale)
        return self.o_proj(o.astype(self.dtype)[0].transpose(1, 0, 2).reshape(step.tokens, -1))


class GatedMLP:
    """down(silu(gate(x)) * up(x)) after the post-attention norm: one op of the op layer."""

    def __init__(self, args: ModelArgs, kernels: ops.Kernels, w: dict, p: str, dtype):
        self.kernels, self.dtype = kernels, dtype
        self.norm = RMSNorm(w, p + "post_attention_layernorm", args.rms_norm_eps)
        self.gate_proj, self.up_proj, self.down_proj = (Linear(kernels, w, p + f"mlp.{n}_proj", args)
                                                        for n in ("gate", "up", "down"))

    def __call__(self, h: mx.array) -> mx.array:
        return self.kernels.gated_mlp(h, self)


class DecoderLayer:
    def __init__(self, args: ModelArgs, kernels: ops.Kernels, w: dict, layer: int, dtype):
        p = f"model.layers.{layer}."
        self.attention = Attention(args, kernels, w, p, layer, dtype)
        self.mlp = GatedMLP(args, kernels, w, p, dtype)

    def __call__(self, h: mx.array, step) -> mx.array:
        h = h + self.attention(h, step)
        return h + self.mlp(h)


class Model:
    """A decoder over an mlx-lm weight dictionary: embedding, layers, final norm, output head.
    Model type modules subclass it and name their `Args` and `Layer`."""

    Args = ModelArgs
    Layer = DecoderLayer

    def __init__(self, args: ModelArgs, weights: dict[str, mx.array], kernels: ops.Kernels):
        self.args, self.kernels = args, kernels
        w = dict(weights)
        self.dtype = next((w[n].dtype for n in ("model.norm.weight", "model.layers.0.input_layernorm.weight")
                           if n in w), mx.float16)
        if kernels.cpu_float32 and args.quantization and self.dtype != mx.float32:
            # MLX's CPU kernels are several times slower in half precision (quantized matmul about
            # 50x, attention 2-3x at long contexts): on the CPU a quantized model computes in
            # float32 throughout, its KV cache included. Everything but the packed weights is
            # converted once (scales, biases, norms: a few percent of the model).
            self.dtype = mx.float32
            w = {n: a.astype(mx.float32) if a.dtype in (mx.float16, mx.bfloat16) else a for n, a in w.items()}
        check_weights(args, w)
        self.weights_bytes = sum(a.nbytes for a in w.values())
        self.embed_tokens = w["model.embed_tokens.weight"], w.get("model.embed_tokens.scales"), \
            w.get("model.embed_tokens.biases")
        self.layers = [self.Layer(args, kernels, w, i, self.dtype) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(w, "model.norm", args.rms_norm_eps)
        self.lm_head = Linear(kernels, w, "model.embed_tokens" if args.tie_word_embeddings else "lm_head", args)

    def embed(self, tokens: mx.array) -> mx.array:
        weight, scales, biases = self.embed_tokens
        if scales is not None:
            return mx.dequantize(weight[tokens], scales[tokens], biases[tokens], group_size=self.args.group_size,
                                 bits=self.args.bits).astype(self.dtype)
        return weight[tokens].astype(self.dtype)

    def forward(self, step, ids: mx.array) -> mx.array:
        """The logits (rows, vocab) at the step's requested tokens (by default each sequence's
        last) after its new tokens `ids` (sequence after sequence)."""
        h = self.embed(ids)                                             # (tokens, hidden)
        for layer in self.layers:
            h = layer(h, step)
        rows = step.logit_rows
        picked = h[rows[0]:rows[0] + 1] if len(rows) == 1 else h[mx.array(rows, dtype=mx.int32)]
        return self.lm_head(self.norm(picked)).astype(mx.float32)

    # ---- what the tuner, bench and calibration ask ----------------------------------------------
    @classmethod
    def parameter_count(cls, args: ModelArgs) -> int:
        """Parameters as stored unquantized: every linear layer's, norm and bias of the weight table."""
        return sum(o * i for o, i in linears(args).values()) + sum(vectors(args).values())

    @classmethod
    def op_plan(cls, args: ModelArgs, contexts=(), batch: int = 1, prefill=(),
                block_size: int = BLOCK_SIZE) -> list[ops.PlannedOp]:
        """The ops a forward pass runs and their shapes, distinct: decoding `batch` sequences at
        each of `contexts` (attention in the engine's paged layout with `block_size`), and
        prompts of each `prefill` length. The embedding is looked up, not multiplied."""
        table = linears(args)
        table.pop("model.embed_tokens")
        head = "lm_head"
        if args.tie_word_embeddings:
            table[head] = (args.vocab_size, args.hidden_size)
        plan = []
        for rows, names in [(batch, table)] + [(n, [k for k in table if k != head]) for n in prefill]:
            plan += [ops.PlannedOp("linear", dict(M=rows, N=table[k][0], K=table[k][1], bits=args.bits,
                                                  group_size=args.group_size)) for k in names]
        heads = dict(Hq=args.num_attention_heads, Hkv=args.num_key_value_heads, D=args.head_dim)
        plan += [ops.PlannedOp("attention", dict(B=batch, new=1, context=c, block_size=block_size, **heads))
                 for c in contexts]
        plan += [ops.PlannedOp("attention", dict(B=1, new=n, context=n, **heads)) for n in prefill]
        return list({(p.op, tuple(p.values.items())): p for p in plan}.values())
