"""The dispatches of a decode step that are not priced kernels (norms, RoPE, bias and residual
adds, SwiGLU, cache writes, casts, the embedding row), counted by engine/dispatches.py's counter on
MLX's graph of a small folder of the model's architecture built by mlx-lm's own classes (same
model type, head dim and GQA ratio; counts per layer do not depend on the width): mlx-lm's, and
the engine's Metal path's with any mix of its ops run by MLX's op. engine/step_price.py prices them.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from metalforge.engine import dispatches, models

PRICED = ("QuantizedMatmul", "mx.fast.scaled_dot_product_attention")   # kinds priced as kernels, with ours


@dataclass(frozen=True)
class Glue:
    """Dispatches of a decode step that are not priced kernels, per layer and outside the layers."""
    per_layer: float
    outside: int


def _glue(counts) -> int:
    return sum(v for k, v in counts.items() if k not in PRICED and not k.startswith("metal_kernel:"))


def small_config(config: dict) -> dict:
    """A 2-layer config of `config`'s model type, head dim and GQA ratio (no quantization)."""
    args = models.parse(config, "config")
    ratio = args.num_attention_heads // args.num_key_value_heads
    hidden = ratio * args.head_dim
    return {**{k: v for k, v in config.items() if k != "quantization"}, "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_attention_heads": ratio, "num_key_value_heads": 1,
            "head_dim": args.head_dim, "num_hidden_layers": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False}


def small_folder(config: dict, root: Path) -> Path:
    """small_config's model as mlx-lm's classes build it (its module found as mlx-lm's loader finds
    it: Mistral runs llama's), quantized as `config` says, saved as a model folder."""
    from mlx_lm.utils import MODEL_REMAPPING, quantize_model, save_config, save_model
    small = small_config(config)
    module = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(config['model_type'], config['model_type'])}")
    mx.random.seed(0)
    m = module.Model(module.ModelArgs.from_dict(small))
    mx.eval(m.parameters())
    q = config["quantization"]
    m, small = quantize_model(m, small, group_size=q["group_size"], bits=q["bits"])
    folder = root / config["model_type"]
    save_model(folder, m)
    save_config(small, folder / "config.json")
    return folder


class GlueCounts:
    """The dispatches of a decode step after `context` tokens that are not priced kernels,
    counted on a small folder of `config`'s architecture (small_folder): mlx-lm's (and of its
    prompt chunk before that step), and the engine's Metal path's with the ops `Roles` names run by MLX's op (each mix counted once)."""

    def __init__(self, config: dict, context: int):
        self.context = context
        self._tmp = tempfile.TemporaryDirectory()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            self.folder = small_folder(config, Path(self._tmp.name))
            # one token short of the context: mlx-lm's cache grows (Full, Concatenate) once every 256
            # tokens, at a multiple of 256; the counted step is a steady one
            layers, decode, prefill = dispatches.mlx_lm_counts(self.folder, context - 1, 16)
        self.mlx_lm = _glue_of_step(layers, decode)
        self.mlx_lm_prefill = _glue_of_step(layers, prefill)   # a 16-token prompt chunk's
        self.roles = Roles(models.parse(json.loads((self.folder / "config.json").read_text()), "config"))
        self._ours: dict[frozenset, Glue] = {}

    def ours(self, mlx_roles=frozenset()) -> Glue:
        """The engine's Metal path, our kernels wherever they serve but for the ops whose roles
        (Roles.of) are in `mlx_roles`, which run MLX's op (its composition, for a fused one)."""
        mlx_roles = frozenset(mlx_roles)
        if mlx_roles not in self._ours:
            with contextlib.redirect_stderr(io.StringIO()):
                layers, decode, _ = dispatches.engine_counts(
                    self.folder, "metal", "m3-max-40", self.context - 1, 16,
                    mlx_for=lambda op, values: self.roles.of(op, values) in mlx_roles)
            self._ours[mlx_roles] = _glue_of_step(layers, decode)
        return self._ours[mlx_roles]


_COUNTED: dict[tuple, GlueCounts] = {}


def counts_for(config: dict, context: int) -> GlueCounts:
    """GlueCounts of `config`'s architecture at `context`, counted once per process: models of one
    architecture (the same small_config) share them."""
    key = (json.dumps(small_config(config), sort_keys=True), json.dumps(config.get("quantization"), sort_keys=True),
           context)
    if key not in _COUNTED:
        _COUNTED[key] = GlueCounts(config, context)
    return _COUNTED[key]


class Roles:
    """What each op of a decode step is for, alike in a model and a smaller one of its
    architecture: a fused op by the weights it runs (a layer's q/k/v, gate/up, o_proj or
    down_proj with the residual add), attention as itself; None for a plain linear (ours or
    MLX's, one priced kernel and no other dispatch)."""

    def __init__(self, args):
        cls = models.get(args.model_type)
        fused = cls.Layer.fused_ops(args, 0, 1, cls)
        self._fused = [(p.op, p.values, tuple(n.removeprefix("model.layers.0.") for n in names))
                       for names, p in fused.items()]

    def all(self) -> list:
        return [role for _, _, role in self._fused] + ["attention"]

    def of(self, op: str, values: dict):
        if op == "attention":
            return op
        return next((role for o, v, role in self._fused if o == op and v == values), None)


def _glue_of_step(layers: int, decode) -> Glue:
    return Glue(_glue(dispatches.per_layer(*decode, layers)), _glue(decode[1].kernels))
