"""An mlx-lm model folder's config.json and the checks every model type shares: the sizes a
decoder's kernels see, in sane ranges. What a model type adds is engine/models/."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from metalforge.errors import MetalforgeError, choices

# Sane ranges for a decoder's sizes, checked before anything is allocated: a typo such as
# `num_hidden_layers: 1e9` must be an error, not a machine filling its memory. The largest
# published models sit well inside these (hidden 16384, 128 heads, 126 layers, 256k vocabularies).
LIMITS = {
    "hidden_size": 131072, "intermediate_size": 1 << 20, "num_hidden_layers": 1024, "num_attention_heads": 1024,
    "num_key_value_heads": 1024, "head_dim": 1024, "vocab_size": 1 << 22, "max_position_embeddings": 2**31 - 1,
}


def size(config: dict, name: str, where: str, default=None, most: int | None = None) -> int:
    """A whole number in 1..most: LIMITS' bound for the sizes above; a model type's own field
    (engine/models/) names its bound, in terms of these (a window: max_position_embeddings')."""
    most = LIMITS[name] if most is None else most
    value = config.get(name, default)
    if value is None:
        raise KeyError(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise MetalforgeError(f"{where}: {name} must be an integer, got {value!r}")
    if not 1 <= value <= most:
        raise MetalforgeError(f"{where}: {name}={value} is outside 1..{most}")
    return int(value)


def positive(config: dict, name: str, where: str, default: float) -> float:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MetalforgeError(f"{where}: {name} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Sizes:
    """The shapes a model's kernels see: what the tuner needs of any decoder, whatever its
    model type, and the part of ModelArgs both read the same way."""
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    quantization: "Quantization | None"


# What mx.quantize (affine) writes; our qmv/qmm kernels take 4 and 8 bits, MLX's ops the rest.
BITS, GROUP_SIZES = (2, 3, 4, 5, 6, 8), (32, 64, 128)
# mx.quantize's modes: (bits, group sizes) each writes. The floating-point ones (gpt-oss's MXFP4)
# have one scale per group and no biases; MLX's ops run them, our kernels take affine.
MODES = {"affine": (BITS, GROUP_SIZES), "mxfp4": ((4,), (32,)), "mxfp8": ((8,), (32,)), "nvfp4": ((4,), (16,))}


@dataclass(frozen=True)
class Quantization:
    """config.json's "quantization" as mlx-lm writes it: the default bits and group size, and
    per-layer overrides by module path ({"bits": 8, "group_size": 64}, or None for a layer left
    unquantized). Whether a layer is quantized is whether its weights have scales (as mlx-lm's
    loader decides); these are the parameters it was quantized with."""
    bits: int
    group_size: int
    mode: str = "affine"
    layers: tuple = ()     # ((module path, (bits, group_size, mode) or None), ...)

    def of(self, path: str) -> tuple[int, int, str] | None:
        """(bits, group_size, mode) of the layer at `path` (e.g. "model.layers.0.mlp.gate")."""
        return dict(self.layers).get(path, (self.bits, self.group_size, self.mode))

    def __str__(self) -> str:
        extra = f", {len(self.layers)} layer override(s)" if self.layers else ""
        mode = "" if self.mode == "affine" else f" {self.mode}"
        return f"{self.bits}-bit{mode}, group size {self.group_size}{extra}"


def _quant_params(value, where: str, name: str) -> tuple[int, int, str]:
    """(bits, group_size, mode) of a quantization object. A per-layer one without "mode" is
    affine, whatever the default's (mlx-lm's loader passes it to to_quantized as it is)."""
    if not isinstance(value, dict):
        raise MetalforgeError(f"{where}: {name} must be an object with bits and group_size, got {value!r}")
    mode = value.get("mode", "affine")
    if mode not in MODES:
        raise MetalforgeError(f"{where}: {name}.mode {mode!r} is not supported; supported: {choices(sorted(MODES))}")
    if value.get("global_scale"):
        raise MetalforgeError(f"{where}: {name}.global_scale is not supported (per-expert nvfp4 tensor scales)")
    try:
        bits, group = int(value["bits"]), int(value["group_size"])
    except KeyError as e:
        raise MetalforgeError(f"{where}: {name} has no {e.args[0]!r}") from None
    widths, groups = MODES[mode]
    if bits not in widths or group not in groups:
        raise MetalforgeError(f"{where}: {name} {{bits: {bits}, group_size: {group}}} is not supported for mode "
                              f"{mode} (bits {choices(widths)}; group_size {choices(groups)})")
    return bits, group, mode


def quantization(config: dict, where: str = "config.json") -> Quantization | None:
    """The folder's quantization, every per-layer override checked (mlx-lm's converter keeps e.g.
    MoE routers at 8 bits while the rest is 4-bit)."""
    quant = config.get("quantization") or config.get("quantization_config")
    if quant is None:
        return None
    bits, group, mode = _quant_params(quant, where, "quantization")
    layers = []
    for path, value in quant.items():
        if path in ("bits", "group_size", "mode"):
            continue
        layers.append((path, None if value is False else _quant_params(value, where, f"quantization[{path!r}]")))
    return Quantization(bits, group, mode, tuple(layers))


def sizes(config: dict, where: str = "config.json") -> Sizes:
    if not isinstance(config, dict):
        raise MetalforgeError(f"{where}: expected a JSON object, got a {type(config).__name__}")
    try:
        heads = size(config, "num_attention_heads", where)
        hidden = size(config, "hidden_size", where)
        kv_heads = size(config, "num_key_value_heads", where, config.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise MetalforgeError(f"{where}: num_attention_heads={heads} is not a multiple of "
                                  f"num_key_value_heads={kv_heads}")
        head_dim = size(config, "head_dim", where, config.get("head_dim") or max(1, hidden // heads))
        quant = quantization(config, where)
        return Sizes(hidden, size(config, "intermediate_size", where), heads, kv_heads, head_dim,
                     size(config, "vocab_size", where), quant)
    except KeyError as e:
        raise MetalforgeError(f"{where}: missing required field {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise MetalforgeError(f"{where}: bad value ({e})") from None


def read(folder) -> dict:
    """The folder's config.json as a dict, or a clear error."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MetalforgeError(f"{folder}: not an mlx-lm model folder (no config.json)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise MetalforgeError(f"{path}: not UTF-8 text (a corrupt or binary file?)") from None
    except json.JSONDecodeError as e:
        raise MetalforgeError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise MetalforgeError(f"{path}: cannot read ({e.strerror})") from None
