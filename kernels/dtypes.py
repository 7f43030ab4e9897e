"""Activation dtypes: their MLX type, Metal spelling, size and verification tolerance."""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from metalforge.errors import MetalforgeError, choices


@dataclass(frozen=True)
class DType:
    name: str
    mlx: mx.Dtype
    metal: str
    size: int
    atol: float
    rtol: float


DTYPES = {
    "float32": DType("float32", mx.float32, "float", 4, 2e-4, 2e-4),
    "float16": DType("float16", mx.float16, "half", 2, 2e-2, 2e-2),
    "bfloat16": DType("bfloat16", mx.bfloat16, "bfloat16_t", 2, 8e-2, 8e-2),
}


def get(name) -> DType:
    if isinstance(name, DType):
        return name
    key = str(name).replace("mlx.core.", "")
    if key in DTYPES:
        return DTYPES[key]
    raise MetalforgeError(f"unsupported dtype '{name}'; valid dtypes: {choices(DTYPES)}")
