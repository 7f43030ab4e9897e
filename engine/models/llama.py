"""Llama: the base decoder as it is (GQA attention with RoPE, gated SiLU MLP, RMS norms)."""
from metalforge.engine.models import base


class Model(base.Model):
    pass
