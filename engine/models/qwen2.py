"""Qwen2: llama with biases on the q, k and v projections."""
from dataclasses import dataclass

from metalforge.engine.models import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    attention_bias: bool = True


class Model(base.Model):
    pass
