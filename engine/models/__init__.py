"""The decoder model types, one module per `model_type` (as mlx-lm's models/ folder): each
defines `Model`, a subclass of base.Model naming what differs. A module added here is found by
its file name; nothing else lists the model types."""
from __future__ import annotations

import importlib
import pkgutil

from metalforge.engine.models import base
from metalforge.errors import MetalforgeError, choices

SHARED = ("base", "moe", "rope")   # modules of shared parts, not model types


def model_types() -> tuple[str, ...]:
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED))


def get(model_type, where: str = "config.json") -> type[base.Model]:
    """The model type's Model class; an unsupported model_type is one line naming the supported."""
    if model_type not in model_types():
        raise MetalforgeError(f"{where}: model_type {model_type!r} is not supported; supported: {choices(model_types())}")
    return importlib.import_module(f"{__name__}.{model_type}").Model


def parse(config, where: str = "config.json") -> base.ModelArgs:
    """A config.json's fields for its model type, checked."""
    if not isinstance(config, dict):
        raise MetalforgeError(f"{where}: expected a JSON object, got a {type(config).__name__}")
    return get(config.get("model_type"), where).Args.from_config(config, where)
