"""Mistral: as llama (mlx-lm remaps it to its llama module)."""
from metalforge.engine.models import base


class Model(base.Model):
    pass
