"""Qwen3: llama with an RMS norm of q and k per head before RoPE."""
from dataclasses import dataclass

from metalforge.engine.models import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    qk_norm: bool = True


class Model(base.Model):
    pass
