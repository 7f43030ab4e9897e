"""An mlx-lm model folder's config.json, checked and normalised for the supported architectures."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from metalforge.errors import MetalforgeError, choices

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


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
    attention_bias: bool = False      # q/k/v biases (qwen2)
    qk_norm: bool = False             # RMSNorm on q and k per head (qwen3)
    quantization: dict | None = None  # {"bits": 4, "group_size": 64}
    eos_token_id: tuple = field(default_factory=tuple)

    @property
    def bits(self) -> int | None:
        return int(self.quantization["bits"]) if self.quantization else None

    @property
    def group_size(self) -> int | None:
        return int(self.quantization["group_size"]) if self.quantization else None


def parse(config: dict, where: str = "config.json") -> ModelArgs:
    mt = config.get("model_type")
    if mt not in ARCHITECTURES:
        raise MetalforgeError(f"{where}: model_type {mt!r} is not supported; supported: {choices(ARCHITECTURES)}")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        quant = config.get("quantization") or config.get("quantization_config")
        if quant is not None:
            quant = {"bits": int(quant["bits"]), "group_size": int(quant["group_size"])}
            if quant["bits"] not in (4, 8) or quant["group_size"] not in (32, 64, 128):
                raise MetalforgeError(f"{where}: quantization {quant} is not supported (bits 4 or 8, "
                                      "group_size 32, 64 or 128)")
        eos = config.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelArgs(
            model_type=mt, hidden_size=hidden, intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), vocab_size=int(config["vocab_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(config.get("rope_theta", 10000.0)),
            rope_scaling=config.get("rope_scaling"),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", mt == "qwen2")),
            qk_norm=mt == "qwen3", quantization=quant, eos_token_id=eos)
    except KeyError as e:
        raise MetalforgeError(f"{where}: missing required field {e}") from None
    except (TypeError, ValueError) as e:
        raise MetalforgeError(f"{where}: bad value ({e})") from None


def read(folder) -> dict:
    """The folder's config.json as a dict, or a clear error."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MetalforgeError(f"{folder}: not an mlx-lm model folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MetalforgeError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno})") from None


def load(folder) -> ModelArgs:
    return parse(read(folder), str(Path(folder) / "config.json"))
