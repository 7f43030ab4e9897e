"""An mlx-lm model folder's config.json and the checks every model type shares: the sizes a
decoder's kernels see, in sane ranges. What a model type adds is engine/models/."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from metalforge.errors import MetalforgeError

# Sane ranges for a decoder's sizes, checked before anything is allocated: a typo such as
# `num_hidden_layers: 1e9` must be an error, not a machine filling its memory. The largest
# published models sit well inside these (hidden 16384, 128 heads, 126 layers, 256k vocabularies).
LIMITS = {
    "hidden_size": 131072, "intermediate_size": 1 << 20, "num_hidden_layers": 1024, "num_attention_heads": 1024,
    "num_key_value_heads": 1024, "head_dim": 1024, "vocab_size": 1 << 22, "max_position_embeddings": 2**31 - 1,
}


def size(config: dict, name: str, where: str, default=None) -> int:
    value = config.get(name, default)
    if value is None:
        raise KeyError(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise MetalforgeError(f"{where}: {name} must be an integer, got {value!r}")
    if not 1 <= value <= LIMITS[name]:
        raise MetalforgeError(f"{where}: {name}={value} is outside 1..{LIMITS[name]}")
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
    quantization: dict | None


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
        quant = config.get("quantization") or config.get("quantization_config")
        if quant is not None:
            quant = {"bits": int(quant["bits"]), "group_size": int(quant["group_size"])}
            # what mx.quantize (affine) writes; our qmv/qmm kernels take 4 and 8 bits, MLX's ops the rest
            if quant["bits"] not in (2, 3, 4, 5, 6, 8) or quant["group_size"] not in (32, 64, 128):
                raise MetalforgeError(f"{where}: quantization {quant} is not supported (bits 2, 3, 4, 5, 6 "
                                      "or 8, group_size 32, 64 or 128)")
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
