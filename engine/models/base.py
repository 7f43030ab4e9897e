"""What the decoder model types share, as mlx-lm's files would repeat it: the config fields,
the blocks (norms, attention, gated MLP, embedding, output head) as layer objects that own
their weights, the layer stack, and the two facts the rest of metalforge asks of a model: its
op plan (which kernel shapes it runs) and its parameter count. Both are read off the same weight
table the loader checks, and each block states its own part of that table, so nothing else
describes a layer. A model type's module subclasses what differs (see llama.py, qwen3.py,
gemma3_text.py, phi3.py, qwen3_moe.py): the extension points are the class attributes and
small methods below (norm kind, activation, soft-caps, sinks, sliding layers (`layer_types`),
RoPE per layer, scaled embeddings, post-norms, residual scale, the MLP of a layer).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn

from metalforge.engine import ops
from metalforge.engine.config import LIMITS, Quantization, positive, size, sizes
from metalforge.engine.kv import BLOCK_SIZE
from metalforge.engine.models import rope as ropes
from metalforge.errors import MetalforgeError


# Config fields whose other values change the computation in ways a model type does not
# implement: (field, its value when absent, the values we run). Anything else is refused at load,
# by name. A model type with other values names its own (ModelArgs.IMPLEMENTED: Gemma's GELU).
IMPLEMENTED = (("hidden_act", "silu", ("silu",)), ("use_sliding_window", False, (False,)))
# What `layer_types` may name: a layer attending to the latest `sliding_window` keys, or to all.
SLIDING, FULL = "sliding_attention", "full_attention"
# The bounds of model types' own sizes, in terms of the generic ones: positions (a window, an
# original context length) and layers (a layer pattern's period).
POSITIONS, LAYERS = LIMITS["max_position_embeddings"], LIMITS["num_hidden_layers"]


def check_implemented(config: dict, where: str, implemented=IMPLEMENTED) -> None:
    for name, default, supported in implemented:
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
    attention_bias: bool = False      # biases on the q/k/v projections (and o_proj: Attention.BIASED)
    mlp_bias: bool = False            # biases on the MLP's projections
    rope_traditional: bool = False    # RoPE rotates adjacent pairs instead of halves
    partial_rotary_factor: float = 1.0   # the share of each head RoPE rotates
    qk_norm: bool = False             # RMS norm of q and k per head
    layer_types: tuple = ()           # SLIDING or FULL per layer; () every layer full
    sliding_window: int | None = None   # the keys a SLIDING layer attends to (its own included)
    quantization: Quantization | None = None
    eos_token_id: tuple = field(default_factory=tuple)

    IMPLEMENTED = IMPLEMENTED   # (not a field) the config values this model type runs: see check_implemented

    def sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends to a sliding window of keys."""
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING

    @property
    def bits(self) -> int | None:
        return self.quantization.bits if self.quantization else None

    @property
    def group_size(self) -> int | None:
        return self.quantization.group_size if self.quantization else None

    def quant_of(self, name: str) -> tuple[int | None, int | None, str | None]:
        """(bits, group_size, mode) a quantized layer `name` was written with (its per-layer
        override in config.json, else the default); Nones for an unquantized model."""
        if self.quantization is None:
            return None, None, None
        return self.quantization.of(name) or (None, None, None)

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> "ModelArgs":
        """The config's fields, sizes checked by engine/config.py; a model type's own defaults
        are its subclass's field defaults (qwen2: attention_bias=True), its own fields what its
        `read` returns."""
        sz = sizes(config, where)
        defaults = {f.name: f.default for f in fields(cls)}
        ropes.scaling_type(config.get("rope_scaling"), where)
        check_implemented(config, where, cls.IMPLEMENTED)
        eos = config.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        try:
            common = dict(model_type=config["model_type"], **sz.__dict__,
                          num_hidden_layers=size(config, "num_hidden_layers", where),
                          rms_norm_eps=positive(config, "rms_norm_eps", where, defaults["rms_norm_eps"]),
                          rope_theta=positive(config, "rope_theta", where, defaults["rope_theta"]),
                          rope_scaling=config.get("rope_scaling"),
                          max_position_embeddings=size(config, "max_position_embeddings", where,
                                                       config.get("max_position_embeddings")
                                                       or defaults["max_position_embeddings"]),
                          tie_word_embeddings=bool(config.get("tie_word_embeddings",
                                                              defaults["tie_word_embeddings"])),
                          attention_bias=bool(config.get("attention_bias", defaults["attention_bias"])),
                          mlp_bias=bool(config.get("mlp_bias", defaults["mlp_bias"])),
                          rope_traditional=flag(config, "rope_traditional", where, defaults["rope_traditional"]),
                          eos_token_id=eos)
            return cls(**{**common, **cls.read(config, where)})
        except KeyError as e:
            raise MetalforgeError(f"{where}: missing required field {e}") from None
        except (TypeError, ValueError) as e:
            raise MetalforgeError(f"{where}: bad value ({e})") from None

    @classmethod
    def read(cls, config: dict, where: str) -> dict:
        """A model type's own fields from config.json (as its mlx-lm module reads them)."""
        return {}


def optional_positive(config: dict, name: str, where: str, default=None) -> float | None:
    """A positive number, or None where the config sets it to null (e.g. no soft-cap)."""
    value = config.get(name, default)
    return None if value is None else positive({name: value}, name, where, value)


def rotary_factor(config: dict, where: str) -> float:
    """partial_rotary_factor, in (0, 1]: the share of each head RoPE rotates."""
    factor = positive(config, "partial_rotary_factor", where, 1.0)
    if factor > 1:
        raise MetalforgeError(f"{where}: partial_rotary_factor={factor} is over 1")
    return factor


def read_layer_types(config: dict, where: str, default: list) -> tuple[str, ...]:
    """config.json's layer_types (else `default`): SLIDING or FULL for each layer."""
    layers, types = config["num_hidden_layers"], config.get("layer_types") or default
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {SLIDING, FULL}:
        raise MetalforgeError(f"{where}: layer_types must list {layers} of {SLIDING}, {FULL}; got {types!r}")
    return tuple(types)


def flag(config: dict, name: str, where: str, default: bool = False) -> bool:
    value = config.get(name, default)
    if not isinstance(value, bool):
        raise MetalforgeError(f"{where}: {name} must be true or false, got {value!r}")
    return value


# ---- norms and activations ----------------------------------------------------------------------
class RMSNorm:
    def __init__(self, w: dict, name: str, eps: float):
        self.weight, self.eps = w[f"{name}.weight"], eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMS norm: the stored weight is the scale minus one."""

    def __init__(self, w: dict, name: str, eps: float):
        super().__init__(w, name, eps)
        self.weight = 1.0 + self.weight


class LayerNorm:
    """LayerNorm with weight and bias (StarCoder2)."""

    def __init__(self, w: dict, name: str, eps: float):
        self.weight, self.bias, self.eps = w[f"{name}.weight"], w.get(f"{name}.bias"), eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self.weight, self.bias, self.eps)


def identity(x: mx.array) -> mx.array:
    return x


def _gated(activation):
    """act(gate) * up compiled into one kernel, as mlx-lm's swiglu: one dispatch a layer where
    the activation and the product would be two."""
    return mx.compile(lambda gate, up: activation(gate) * up, shapeless=True)


GATED = {name: _gated(f) for name, f in (("silu", nn.silu), ("gelu_approx", nn.gelu_approx), ("gelu", nn.gelu))}


# ---- layers ----------------------------------------------------------------------------------------
class Linear:
    """One linear layer's weights (weight, and scales/biases when quantized, and a bias), run
    through the op layer, which picks ours or MLX's per row bucket. A quantized layer uses its
    own bits and group size (config.json's per-layer override, else the default)."""

    def __init__(self, kernels: ops.Kernels, w: dict, name: str, args: ModelArgs):
        self.kernels = kernels
        self.w = {k: w[f"{name}.{k}"] for k in ("weight", "scales", "biases", "bias") if f"{name}.{k}" in w}
        self.bits, self.group_size, self.mode = args.quant_of(name) if "scales" in self.w else (None, None, None)

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """x @ W^T (+ bias), plus `residual` where given (in the kernel's epilogue where one serves)."""
        return self.kernels.linear(x, self.w, self.bits, self.group_size, self.mode, residual=residual)


class Block:
    """A block of a decoder layer (attention, MLP): its norm, and its part of the weight table."""

    NORM: str | None = None   # the weight name of the norm applied to the block's input

    def __init__(self, args: ModelArgs, w: dict, p: str, model: type["Model"]):
        self.args = args
        self.norm = model.make_norm(args, w, p + self.NORM) if self.NORM else identity

    @classmethod
    def linears(cls, a: ModelArgs, p: str) -> dict[str, tuple]:
        """Every linear layer's shape by weight name: (out, in), or (experts, out, in)."""
        return {}

    @classmethod
    def vectors(cls, a: ModelArgs, p: str) -> dict[str, int]:
        """Every vector weight's size by name (the block's norm included)."""
        return {p + cls.NORM + ".weight": a.hidden_size} if cls.NORM else {}


class Attention(Block):
    """GQA self-attention over the KV pool: the attention input (norm, q/k/v projections,
    per-head norms, RoPE) and attention are the op layer's; o_proj is a linear. Subclasses set
    the scale, soft-cap, sinks, a layer's window and RoPE, or fuse the projections."""

    NORM = "input_layernorm"
    SINKS = False          # a learned sink logit per head (gpt_oss)
    BIASED = "qkv"         # the projections with biases when attention_bias is set

    def __init__(self, args: ModelArgs, kernels: ops.Kernels, w: dict, p: str, layer: int, dtype,
                 model: type["Model"]):
        super().__init__(args, w, p, model)
        self.kernels, self.layer, self.dtype = kernels, layer, dtype
        self.make_projections(kernels, w, p, args)
        self.fused = self.fused_input(args, p, model)   # norm_qkv's shape less M, or None
        norm = model.make_norm
        self.q_norm = norm(args, w, p + "self_attn.q_norm") if args.qk_norm else None
        self.k_norm = norm(args, w, p + "self_attn.k_norm") if args.qk_norm else None
        self.rope = self.make_rope(args, layer)
        self.scale = self.attention_scale(args)   # yarn's magnitude factor is applied inside the rotation
        self.window = self.window_of(args, layer)
        self.softcap = self.softcap_of(args)
        self.sinks = w[p + "self_attn.sinks"].astype(mx.float32) if self.SINKS else None

    def make_projections(self, kernels: ops.Kernels, w: dict, p: str, args: ModelArgs) -> None:
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            Linear(kernels, w, p + f"self_attn.{n}_proj", args) for n in "qkvo")

    def make_rope(self, args: ModelArgs, layer: int) -> ropes.Rope:
        return ropes.make(args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings,
                          dims=int(args.head_dim * args.partial_rotary_factor), traditional=args.rope_traditional)

    def attention_scale(self, args: ModelArgs) -> float:
        return 1 / math.sqrt(args.head_dim)

    def window_of(self, args: ModelArgs, layer: int) -> int | None:
        """How many of the latest keys (the token's own included) layer `layer` attends to; None: all."""
        return args.sliding_window if args.sliding(layer) else None

    def softcap_of(self, args: ModelArgs) -> float | None:
        return None

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """The normed input (T, hidden) -> q (T, Hq*D), k and v (T, Hkv*D)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def scale_queries(self, q: mx.array, step) -> mx.array:
        """q (1, Hq, tokens, D) after RoPE, scaled where the model type scales queries by position."""
        return q

    def __call__(self, h: mx.array, step, residual: mx.array | None = None) -> mx.array:
        """The block's output, plus `residual` where given (the layer's residual add, which
        o_proj's kernel then does in its epilogue)."""
        q, k, v, kv = self.kernels.attention_input(h, self, step)
        q = self.scale_queries(q, step)
        o = self.kernels.attention(q, step.update_and_fetch(self.layer, k, v, kv), self.scale, window=self.window,
                                   softcap=self.softcap, sinks=self.sinks)
        return self.o_proj(o.astype(self.dtype).squeeze(0).transpose(1, 0, 2).reshape(step.tokens, -1), residual=residual)

    @classmethod
    def fused_input(cls, a: ModelArgs, p: str, model: type["Model"]) -> dict | None:
        """The norm_qkv shape (less its rows M) of this block's attention input, or None where
        the block is not the plain one that family computes (its own projections or norm, no
        input norm, projections of other widths or not affine-quantized)."""
        names = [p + f"self_attn.{n}_proj" for n in "qkv"]
        quants = {a.quant_of(n) for n in names}
        plain = (cls.project is Attention.project and cls.make_projections is Attention.make_projections
                 and cls.NORM is not None and issubclass(model.Norm, RMSNorm))
        if not plain or len(quants) != 1:
            return None
        bits, group_size, mode = quants.pop()
        if bits is None or mode not in (None, "affine") or (a.attention_bias and not set("qkv") <= set(cls.BIASED)):
            return None
        dims = int(a.head_dim * a.partial_rotary_factor)
        return dict(K=a.hidden_size, Hq=a.num_attention_heads, Hkv=a.num_key_value_heads, D=a.head_dim, bits=bits,
                    group_size=group_size, bias=int(a.attention_bias), qk_norm=int(a.qk_norm),
                    rope_dims=0 if dims == a.head_dim else dims, traditional=int(a.rope_traditional))

    @classmethod
    def linears(cls, a, p):
        q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        return {p + "self_attn.q_proj": (q, a.hidden_size), p + "self_attn.k_proj": (kv, a.hidden_size),
                p + "self_attn.v_proj": (kv, a.hidden_size), p + "self_attn.o_proj": (a.hidden_size, q)}

    @classmethod
    def vectors(cls, a, p):
        q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        out = super().vectors(a, p)
        if a.attention_bias:
            sizes = {"q": q, "k": kv, "v": kv, "o": a.hidden_size}
            out.update({p + f"self_attn.{n}_proj.bias": sizes[n] for n in cls.BIASED})
        if a.qk_norm:
            out.update({p + "self_attn.q_norm.weight": a.head_dim, p + "self_attn.k_norm.weight": a.head_dim})
        if cls.SINKS:
            out[p + "self_attn.sinks"] = a.num_attention_heads
        return out


class GatedMLP(Block):
    """down(act(gate(x)) * up(x)) after its norm: one op of the op layer."""

    NORM = "post_attention_layernorm"
    PREFIX = "mlp."    # where the projections' weights are, in the layer

    def __init__(self, args: ModelArgs, kernels: ops.Kernels, w: dict, p: str, layer: int, dtype,
                 model: type["Model"]):
        super().__init__(args, w, p, model)
        self.kernels, self.dtype = kernels, dtype
        self.gated = GATED[model.ACTIVATION]
        self.make_projections(kernels, w, p, args)
        self.fused = self.fused_input(args, p, model)   # gate_up's shape less M, or None

    def make_projections(self, kernels: ops.Kernels, w: dict, p: str, args: ModelArgs) -> None:
        self.gate_proj, self.up_proj, self.down_proj = (Linear(kernels, w, p + self.PREFIX + f"{n}_proj", args)
                                                        for n in ("gate", "up", "down"))

    def gate_up(self, x: mx.array) -> tuple[mx.array, mx.array]:
        return self.gate_proj(x), self.up_proj(x)

    def __call__(self, h: mx.array, residual: mx.array | None = None) -> mx.array:
        """The block's output, plus `residual` where given (in down_proj's epilogue where one serves)."""
        return self.kernels.gated_mlp(h, self, residual=residual)

    @classmethod
    def fused_input(cls, a: ModelArgs, p: str, model: type["Model"]) -> dict | None:
        """The gate_up shape (less its rows M) of this block's norm, gate, up and activation, or
        None where the block is not the plain one that family computes."""
        quants = {a.quant_of(p + cls.PREFIX + f"{n}_proj") for n in ("gate", "up")}
        plain = (cls.gate_up is GatedMLP.gate_up and cls.make_projections is GatedMLP.make_projections
                 and cls.NORM is not None and issubclass(model.Norm, RMSNorm) and not a.mlp_bias
                 and model.ACTIVATION in ("silu", "gelu_approx"))
        if not plain or len(quants) != 1:
            return None
        bits, group_size, mode = quants.pop()
        if bits is None or mode not in (None, "affine"):
            return None
        return dict(N=cls.intermediate_size(a), K=a.hidden_size, bits=bits, group_size=group_size,
                    gelu=int(model.ACTIVATION == "gelu_approx"))

    @classmethod
    def linears(cls, a, p):
        i, h = cls.intermediate_size(a), a.hidden_size
        return {p + cls.PREFIX + "gate_proj": (i, h), p + cls.PREFIX + "up_proj": (i, h),
                p + cls.PREFIX + "down_proj": (h, i)}

    @classmethod
    def intermediate_size(cls, a: ModelArgs) -> int:
        return a.intermediate_size

    @classmethod
    def vectors(cls, a, p):
        out = super().vectors(a, p)
        if a.mlp_bias:
            out.update({n + ".bias": shape[0] for n, shape in cls.linears(a, p).items()})
        return out


class DecoderLayer:
    """h + attention(h), then h + mlp(h), each block's output through its post-norm where the
    model type has one (POST_* weight names: Gemma, OLMo 2) and scaled by `residual_scale`."""

    Attention = Attention
    MLP = GatedMLP
    POST_ATTENTION_NORM: str | None = None
    POST_MLP_NORM: str | None = None

    def __init__(self, args: ModelArgs, kernels: ops.Kernels, w: dict, layer: int, dtype, model: type["Model"]):
        p = f"model.layers.{layer}."
        self.attention = self.Attention(args, kernels, w, p, layer, dtype, model)
        self.mlp = self.mlp_class(args, layer)(args, kernels, w, p, layer, dtype, model)
        post = lambda name: model.make_norm(args, w, p + name) if name else identity
        self.post_attention, self.post_mlp = post(self.POST_ATTENTION_NORM), post(self.POST_MLP_NORM)
        self.residual_scale = model.residual_scale(args)
        self.plain_residual = self.plain_residuals(args, model)
        self.mlp_takes_residual = self.plain_residual and isinstance(self.mlp, GatedMLP)

    @classmethod
    def mlp_class(cls, args: ModelArgs, layer: int) -> type[Block]:
        """The MLP block of layer `layer` (MoE models may keep some layers dense)."""
        return cls.MLP

    def add(self, h: mx.array, r: mx.array) -> mx.array:
        return h + r if self.residual_scale == 1 else h + r * self.residual_scale

    @classmethod
    def plain_residuals(cls, args: ModelArgs, model: type["Model"]) -> bool:
        """h + block(h) with nothing between (no post-norm, no residual scale): the add may
        ride in the block's last projection (o_proj, down_proj)."""
        return not cls.POST_ATTENTION_NORM and not cls.POST_MLP_NORM and model.residual_scale(args) == 1

    def __call__(self, h: mx.array, step) -> mx.array:
        if self.plain_residual:
            h = self.attention(h, step, residual=h)
            return self.mlp(h, residual=h) if self.mlp_takes_residual else h + self.mlp(h)
        h = self.add(h, self.post_attention(self.attention(h, step)))
        return self.add(h, self.post_mlp(self.mlp(h)))

    @classmethod
    def fused_ops(cls, a: ModelArgs, layer: int, rows: int, model: type["Model"]) -> dict[str, ops.PlannedOp]:
        """The fused ops layer `layer` runs for `rows` rows (op_plan's part) where a family of
        ours serves them, by the weight names of the linears each one runs instead."""
        p = f"model.layers.{layer}."
        mlp = cls.mlp_class(a, layer)
        gated = issubclass(mlp, GatedMLP)
        attn = p + "self_attn."
        out = {}
        attention_input = cls.Attention.fused_input(a, p, model)
        if attention_input:
            out[(attn + "q_proj", attn + "k_proj", attn + "v_proj")] = \
                ops.PlannedOp("attention_input", dict(M=rows, **attention_input))
        gate_up = mlp.fused_input(a, p, model) if gated else None
        if gate_up:
            proj = p + mlp.PREFIX
            out[(proj + "gate_proj", proj + "up_proj")] = ops.PlannedOp("gated_mlp", dict(M=rows, **gate_up))
        if cls.plain_residuals(a, model):
            table = cls.linears(a, layer)
            projections = [(attn + "o_proj", a.attention_bias and "o" in cls.Attention.BIASED)]
            projections += [(p + mlp.PREFIX + "down_proj", a.mlp_bias)] if gated else []   # an MoE block adds h itself
            for name, biased in projections:
                bits, group_size, mode = a.quant_of(name)
                if bits is not None and mode in (None, "affine") and not biased:
                    N, K = table[name]
                    out[(name,)] = ops.PlannedOp("linear", dict(M=rows, N=N, K=K, bits=bits,
                                                                        group_size=group_size, residual=1))
        return {names: op for names, op in out.items() if ops.serves(op)}

    @classmethod
    def linears(cls, a: ModelArgs, layer: int) -> dict[str, tuple]:
        p = f"model.layers.{layer}."
        return {**cls.Attention.linears(a, p), **cls.mlp_class(a, layer).linears(a, p)}

    @classmethod
    def vectors(cls, a: ModelArgs, layer: int) -> dict[str, int]:
        p = f"model.layers.{layer}."
        out = {**cls.Attention.vectors(a, p), **cls.mlp_class(a, layer).vectors(a, p)}
        out.update({p + n + ".weight": a.hidden_size for n in (cls.POST_ATTENTION_NORM, cls.POST_MLP_NORM) if n})
        return out


class PostNormDecoderLayer(DecoderLayer):
    """Each block's output normed before it joins the residual, under Gemma's names (Gemma 2
    and 3, OLMo 2)."""

    POST_ATTENTION_NORM = "post_attention_layernorm"
    POST_MLP_NORM = "post_feedforward_layernorm"


class Model:
    """A decoder over an mlx-lm weight dictionary: embedding, layers, final norm, output head.
    Model type modules subclass it and name their norm kind and activation; their `ModelArgs`
    and `DecoderLayer` are found by name (see __init_subclass__)."""

    Args = ModelArgs
    Layer = DecoderLayer
    Norm = RMSNorm
    ACTIVATION = "silu"

    def __init_subclass__(cls, **kwargs):
        """A model type's module pairs its classes by name, as mlx-lm's loader pairs a module's
        Model and ModelArgs: the module's `ModelArgs` and `DecoderLayer` are its Model's `Args`
        and `Layer` unless the class names others (else the parent's are kept)."""
        super().__init_subclass__(**kwargs)
        module = sys.modules[cls.__module__]
        for attr, name in (("Args", "ModelArgs"), ("Layer", "DecoderLayer")):
            if attr not in cls.__dict__ and isinstance(getattr(module, name, None), type):
                setattr(cls, attr, getattr(module, name))

    def __init__(self, args: ModelArgs, weights: dict[str, mx.array], kernels: ops.Kernels):
        w = self.rename(dict(weights))
        args = self.adapt(args, w)
        self.args, self.kernels = args, kernels
        self.dtype = next((w[n].dtype for n in ("model.norm.weight", "model.layers.0.input_layernorm.weight")
                           if n in w), mx.float16)
        if kernels.cpu_float32 and args.quantization and self.dtype != mx.float32:
            # MLX's CPU kernels are several times slower in half precision (quantized matmul about
            # 50x, attention 2-3x at long contexts): on the CPU a quantized model computes in
            # float32 throughout, its KV cache included. Everything but the packed weights is
            # converted once (scales, biases, norms: a few percent of the model).
            self.dtype = mx.float32
            w = {n: a.astype(mx.float32) if a.dtype in (mx.float16, mx.bfloat16) else a for n, a in w.items()}
        self.check_weights(args, w)
        self.weights_bytes = sum(a.nbytes for a in w.values())
        self.embed_tokens = w["model.embed_tokens.weight"], w.get("model.embed_tokens.scales"), \
            w.get("model.embed_tokens.biases")
        self.embed_quant = args.quant_of("model.embed_tokens")
        self.embed_scale = self.embedding_scale(args)
        self.layers = [self.Layer(args, kernels, w, i, self.dtype, type(self)) for i in range(args.num_hidden_layers)]
        self.norm = self.make_norm(args, w, "model.norm")
        self.lm_head = Linear(kernels, w, "model.embed_tokens" if args.tie_word_embeddings else "lm_head", args)
        self.final_softcap, self.logits_scale = self.final_softcap_of(args), self.logits_scale_of(args)

    # ---- what model types vary -------------------------------------------------------------------
    @classmethod
    def make_norm(cls, args: ModelArgs, w: dict, name: str):
        return cls.Norm(w, name, args.rms_norm_eps)

    def rename(self, w: dict) -> dict:
        """The weights under the names the blocks read (Mistral 3: the language model's, unprefixed)."""
        return w

    def adapt(self, args: ModelArgs, w: dict) -> ModelArgs:
        """The args as the weights complete them (Gemma 3: the head is tied when the folder has none)."""
        return args

    def embedding_scale(self, args: ModelArgs) -> float:
        return 1.0

    @staticmethod
    def residual_scale(args: ModelArgs) -> float:
        return 1.0

    def final_softcap_of(self, args: ModelArgs) -> float | None:
        return None

    def logits_scale_of(self, args: ModelArgs) -> float:
        return 1.0

    # ---- the forward pass -------------------------------------------------------------------------
    def embed(self, tokens: mx.array) -> mx.array:
        weight, scales, biases = self.embed_tokens
        if scales is not None:
            bits, group_size, mode = self.embed_quant
            h = mx.dequantize(weight[tokens], scales[tokens], None if biases is None else biases[tokens],
                              group_size=group_size, bits=bits, mode=mode, dtype=self.dtype)
        else:
            h = weight[tokens]
        h = h.astype(self.dtype)
        return h if self.embed_scale == 1 else h * mx.array(self.embed_scale, dtype=self.dtype)

    def forward(self, step, ids: mx.array) -> mx.array:
        """The logits (rows, vocab) at the step's requested tokens (by default each sequence's
        last) after its new tokens `ids` (sequence after sequence)."""
        h = self.embed(ids)                                             # (tokens, hidden)
        for layer in self.layers:
            h = layer(h, step)
        rows = step.logit_rows
        picked = h[rows[0]:rows[0] + 1] if len(rows) == 1 else h[mx.array(rows, dtype=mx.int32)]
        logits = self.lm_head(self.norm(picked))
        if self.final_softcap is not None:
            logits = mx.tanh(logits / self.final_softcap) * self.final_softcap
        if self.logits_scale != 1:
            logits = logits * self.logits_scale
        return logits.astype(mx.float32)

    # ---- the weight table -------------------------------------------------------------------------
    @classmethod
    def linears(cls, args: ModelArgs) -> dict[str, tuple]:
        """Every linear layer's shape by weight name, (out, in) or (experts, out, in): the
        embedding table reads as one."""
        out = {"model.embed_tokens": (args.vocab_size, args.hidden_size)}
        for i in range(args.num_hidden_layers):
            out.update(cls.Layer.linears(args, i))
        if not args.tie_word_embeddings:
            out["lm_head"] = (args.vocab_size, args.hidden_size)
        return out

    @classmethod
    def vectors(cls, args: ModelArgs) -> dict[str, int]:
        """Every vector weight's size by name: norms, biases, sinks."""
        out = {"model.norm.weight": args.hidden_size}
        for i in range(args.num_hidden_layers):
            out.update(cls.Layer.vectors(args, i))
        return out

    @classmethod
    def check_weights(cls, args: ModelArgs, w: dict[str, mx.array]) -> None:
        """Every tensor the forward pass reads is present with the shape the config implies, so a
        mismatched checkpoint is one clear error at load instead of a failure mid-generation.
        Biases the config declares (attention_bias, mlp_bias) are required like any weight."""
        table, vecs = cls.linears(args), cls.vectors(args)
        required = [n + ".weight" for n in table] + list(vecs)
        missing = [n for n in required if n not in w]
        if missing:
            raise MetalforgeError(f"weights are missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        expected = {n: (s,) for n, s in vecs.items()}
        for name, shape in table.items():
            *lead, out, inp = shape
            if name + ".scales" in w:
                if args.quantization is None:
                    raise MetalforgeError(f"weight {name} is quantized but config.json has no 'quantization'")
                bits, group, _ = args.quant_of(name)
                if bits is None:
                    raise MetalforgeError(f"weight {name} is quantized but config.json's quantization "
                                          f"says {name!r}: false")
                expected[name + ".weight"] = (*lead, out, inp * bits // 32)
                expected[name + ".scales"] = expected[name + ".biases"] = (*lead, out, inp // group)
            else:
                expected[name + ".weight"] = shape
            if name + ".bias" in w:
                expected[name + ".bias"] = (*lead, out)
        for name, shape in expected.items():
            if name in w and tuple(w[name].shape) != shape:
                raise MetalforgeError(f"weight {name} has shape {tuple(w[name].shape)}, but config.json implies {shape}")

    # ---- what the tuner, bench and calibration ask ----------------------------------------------
    @classmethod
    def parameter_count(cls, args: ModelArgs) -> int:
        """Parameters as stored unquantized: every linear layer's, norm and bias of the weight table."""
        return sum(math.prod(s) for s in cls.linears(args).values()) + sum(cls.vectors(args).values())

    @classmethod
    def forward_linears(cls, args: ModelArgs) -> dict[str, tuple]:
        """The linears a forward pass multiplies by, by name (the op plan's and the step price's
        table): the weight table's without the embedding (looked up, not multiplied), with the
        LM head last, the embedding's matrix where the two are tied."""
        table = cls.linears(args)
        table.pop("model.embed_tokens")
        if args.tie_word_embeddings:
            table["lm_head"] = (args.vocab_size, args.hidden_size)
        return table

    @classmethod
    def op_plan(cls, args: ModelArgs, contexts=(), batch: int = 1, prefill=(),
                block_size: int = BLOCK_SIZE, num_draft: int = 0) -> list[ops.PlannedOp]:
        """The ops a forward pass runs and their shapes, distinct: decoding `batch` sequences at
        each of `contexts` (attention in the engine's paged layout with `block_size`; with
        `num_draft`, also its verify passes: num_draft + 1 tokens a sequence), and prompts of each
        `prefill` length. The embedding is looked up, not multiplied; each expert layer runs
        `top_k` experts per token (`expert_linear`)."""
        table = cls.forward_linears(args)
        head = "lm_head"
        fused = {}
        for layer in range(args.num_hidden_layers):
            fused.update(cls.Layer.fused_ops(args, layer, batch, cls))
        plan = list(fused.values())
        covered = {name for names in fused for name in names}
        decoded = [k for k in table if k not in covered]   # the rest run as linears
        for rows, names in [(batch, decoded)] + [(n, [k for k in table if k != head]) for n in prefill]:
            for k in names:
                bits, group_size, mode = args.quant_of(k)
                *experts, N, K = table[k]
                values = dict(M=rows, N=N, K=K, bits=bits, group_size=group_size)
                if mode not in (None, "affine"):
                    values["mode"] = mode   # MLX's op runs it: no family of ours takes it
                plan.append(ops.PlannedOp("expert_linear", dict(values, experts=experts[0], top_k=cls.top_k(args)))
                            if experts else ops.PlannedOp("linear", values))
        heads = dict(Hq=args.num_attention_heads, Hkv=args.num_key_value_heads, D=args.head_dim)
        plan += [ops.PlannedOp("attention", dict(B=batch, new=new, context=c, block_size=block_size, **heads))
                 for new in sorted({1, num_draft + 1}) for c in contexts]
        plan += [ops.PlannedOp("attention", dict(B=1, new=n, context=n, **heads)) for n in prefill]
        return list({(p.op, tuple(p.values.items())): p for p in plan}.values())

    @classmethod
    def top_k(cls, args: ModelArgs) -> int:
        """Experts per token (MoE model types' num_experts_per_tok)."""
        return getattr(args, "num_experts_per_tok", 0)
