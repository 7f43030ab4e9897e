"""Mistral 3 (Mistral Small 3.x, Ministral 3 folders): the text model of a vision-language
folder. config.json holds it as `text_config` (ministral3, or else llama; mistral4 is not
served), the weights under `language_model.`; the vision tower and projector are not loaded.
As mlx-lm's mistral3, whose text model keeps an untied head unless text_config says otherwise."""
from dataclasses import dataclass, fields

from metalforge.engine.models import base, ministral3
from metalforge.errors import MetalforgeError

PREFIX = "language_model."


@dataclass(frozen=True)
class ModelArgs(ministral3.ModelArgs):
    @classmethod
    def from_config(cls, config, where="config.json"):
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise MetalforgeError(f"{where}: a mistral3 folder needs text_config (an object), got {text!r}")
        kind = text.get("model_type", "llama")
        if kind not in ("ministral3", "llama", "mistral"):
            raise MetalforgeError(f"{where}: text_config.model_type {kind!r} is not supported; supported: "
                                  "llama, ministral3")
        quant = config.get("quantization") or config.get("quantization_config")
        if isinstance(quant, dict):   # per-layer overrides name the language model's layers unprefixed
            quant = {k.removeprefix(PREFIX): v for k, v in quant.items()}
        text = {**text, "tie_word_embeddings": text.get("tie_word_embeddings", False), "quantization": quant,
                "eos_token_id": text.get("eos_token_id", config.get("eos_token_id"))}
        where = f"{where}: text_config"
        if kind == "ministral3":
            args = ministral3.ModelArgs.from_config(text, where)
        else:   # llama: no position scaling, every layer global
            plain = base.ModelArgs.from_config(text, where)
            args = ministral3.ModelArgs(**{f.name: getattr(plain, f.name) for f in fields(plain)})
        return cls(**{**{f.name: getattr(args, f.name) for f in fields(args)}, "model_type": "mistral3"})


class Model(ministral3.Model):
    def rename(self, w):
        return {k.removeprefix(PREFIX): v for k, v in w.items()
                if "vision_tower" not in k and "multi_modal_projector" not in k}
