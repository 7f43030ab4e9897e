"""Llama-family decoder (llama, mistral, qwen2, qwen3) over an mlx-lm weight dictionary.

Every linear layer and attention call goes through `ops.Kernels`; the KV cache is the block pool.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

from metalforge.engine.config import ModelArgs
from metalforge.engine.kv_pool import Step
from metalforge.engine.ops import Kernels
from metalforge.engine.rope import Rope
from metalforge.errors import MetalforgeError


def load_weights(folder) -> dict[str, mx.array]:
    """All tensors of the folder's safetensors files (sharded or not, with or without an index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise MetalforgeError(f"{index}: corrupt index ({e})") from None
        paths = [folder / f for f in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise MetalforgeError(f"{folder}: no *.safetensors weight files")
    weights = {}
    for p in paths:
        if not p.is_file():
            raise MetalforgeError(f"{p}: listed in the index but missing")
        try:
            weights.update(mx.load(str(p)))
        except Exception as e:  # MLX raises RuntimeError/ValueError on truncated or corrupt files
            raise MetalforgeError(f"{p}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    return weights


class Model:
    def __init__(self, args: ModelArgs, weights: dict[str, mx.array], kernels: Kernels):
        self.args = args
        self.kernels = kernels
        self.w = dict(weights)
        self.dtype = self._activation_dtype()
        if kernels.cpu_float32 and args.quantization and self.dtype != mx.float32:
            # MLX's CPU kernels are several times slower in half precision (quantized matmul about
            # 50x, attention 2-3x at long contexts): on the CPU a quantized model computes in
            # float32 throughout, its KV cache included. Everything but the packed weights is
            # converted once (scales, biases, norms: a few percent of the model).
            self.dtype = mx.float32
            for name in [n for n, a in self.w.items() if a.dtype in (mx.float16, mx.bfloat16)]:
                self.w[name] = self.w[name].astype(mx.float32)
        self.rope = Rope(args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)
        self.scale = 1 / math.sqrt(args.head_dim)   # yarn's magnitude factor is applied inside the rotation
        self._check()

    def _activation_dtype(self):
        for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
            if name in self.w:
                return self.w[name].dtype
        return mx.float16

    def _check(self) -> None:
        """Every tensor the forward pass reads is present with the shape the config implies, so
        a mismatched checkpoint is one clear error at load instead of a failure mid-generation."""
        a = self.args
        heads, kv, hd = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim, a.head_dim
        linears = {"model.embed_tokens": (a.vocab_size, a.hidden_size)}
        vectors = {"model.norm": a.hidden_size}
        if not a.tie_word_embeddings:
            linears["lm_head"] = (a.vocab_size, a.hidden_size)
        for i in range(a.num_hidden_layers):
            p = f"model.layers.{i}."
            linears.update({p + "self_attn.q_proj": (heads, a.hidden_size), p + "self_attn.k_proj": (kv, a.hidden_size),
                            p + "self_attn.v_proj": (kv, a.hidden_size), p + "self_attn.o_proj": (a.hidden_size, heads),
                            p + "mlp.gate_proj": (a.intermediate_size, a.hidden_size),
                            p + "mlp.up_proj": (a.intermediate_size, a.hidden_size),
                            p + "mlp.down_proj": (a.hidden_size, a.intermediate_size)})
            vectors.update({p + "input_layernorm": a.hidden_size, p + "post_attention_layernorm": a.hidden_size})
            if a.qk_norm:
                vectors.update({p + "self_attn.q_norm": hd, p + "self_attn.k_norm": hd})
        missing = [n + ".weight" for n in [*linears, *vectors] if n + ".weight" not in self.w]
        if missing:
            raise MetalforgeError(f"weights are missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        expected = {n + ".weight": (size,) for n, size in vectors.items()}
        for name, (out, inp) in linears.items():
            if name + ".scales" in self.w:
                if a.quantization is None:
                    raise MetalforgeError(f"weight {name} is quantized but config.json has no 'quantization'")
                expected[name + ".weight"] = (out, inp * a.bits // 32)
                expected[name + ".scales"] = expected[name + ".biases"] = (out, inp // a.group_size)
            else:
                expected[name + ".weight"] = (out, inp)
        for name, shape in expected.items():
            if name in self.w and tuple(self.w[name].shape) != shape:
                raise MetalforgeError(f"weight {name} has shape {tuple(self.w[name].shape)}, but config.json "
                                      f"implies {shape}")

    def linear(self, name: str, x: mx.array) -> mx.array:
        w = {k: self.w[f"{name}.{k}"] for k in ("weight", "scales", "biases", "bias") if f"{name}.{k}" in self.w}
        return self.kernels.linear(x, w, self.args.bits, self.args.group_size)

    def norm(self, name: str, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.w[f"{name}.weight"], self.args.rms_norm_eps)

    def embed(self, tokens: mx.array) -> mx.array:
        w = self.w["model.embed_tokens.weight"]
        if "model.embed_tokens.scales" in self.w:
            return mx.dequantize(w[tokens], self.w["model.embed_tokens.scales"][tokens],
                                 self.w["model.embed_tokens.biases"][tokens], group_size=self.args.group_size,
                                 bits=self.args.bits).astype(self.dtype)
        return w[tokens].astype(self.dtype)

    def logits(self, h: mx.array) -> mx.array:
        name = "model.embed_tokens" if self.args.tie_word_embeddings else "lm_head"
        return self.linear(name, h).astype(mx.float32)

    def forward(self, step: Step, ids: mx.array) -> mx.array:
        """The logits (B, vocab) after the new tokens `ids` (B * step.new ids, sequence-major) of
        the step's sequences: either one sequence with any number of tokens (prefill) or several
        with one token each (batched decode)."""
        B, L = len(step.sids), step.new
        h = self.embed(ids)                                             # (B*L, hidden)
        for i in range(self.args.num_hidden_layers):
            p = f"model.layers.{i}."
            h = h + self.attention(p, i, self.norm(p + "input_layernorm", h), step)
            h = h + self.mlp(p, self.norm(p + "post_attention_layernorm", h))
        last = h.reshape(B, L, -1)[:, -1, :]
        return self.logits(self.norm("model.norm", last))

    def attention(self, p: str, layer: int, x: mx.array, step: Step) -> mx.array:
        a = self.args
        B, L = len(step.sids), step.new
        q = self.linear(p + "self_attn.q_proj", x).reshape(B, L, a.num_attention_heads, a.head_dim)
        k = self.linear(p + "self_attn.k_proj", x).reshape(B, L, a.num_key_value_heads, a.head_dim)
        v = self.linear(p + "self_attn.v_proj", x).reshape(B, L, a.num_key_value_heads, a.head_dim)
        if a.qk_norm:
            q = self.norm(p + "self_attn.q_norm", q)
            k = self.norm(p + "self_attn.k_norm", k)
        q = self.rope(q.transpose(0, 2, 1, 3), step.positions)
        k = self.rope(k.transpose(0, 2, 1, 3), step.positions)
        kv = step.update_and_fetch(layer, k, v.transpose(0, 2, 1, 3))
        if L == 1:
            o = self.kernels.decode_attention(q, kv, self.scale)
        else:
            o = self.kernels.prefill_attention(q, kv, self.scale)
        o = o.astype(self.dtype).transpose(0, 2, 1, 3).reshape(B * L, a.num_attention_heads * a.head_dim)
        return self.linear(p + "self_attn.o_proj", o)

    def mlp(self, p: str, x: mx.array) -> mx.array:
        gate = self.linear(p + "mlp.gate_proj", x)
        up = self.linear(p + "mlp.up_proj", x)
        return self.linear(p + "mlp.down_proj", (silu(gate) * up).astype(self.dtype))


def silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)
