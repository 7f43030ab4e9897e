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
    vector: str   # the Metal vector types' stem: vector_of(name, 4) is half4, bfloat4, float4
    size: int
    atol: float
    rtol: float


DTYPES = {
    "float32": DType("float32", mx.float32, "float", "float", 4, 2e-4, 2e-4),
    "float16": DType("float16", mx.float16, "half", "half", 2, 2e-2, 2e-2),
    "bfloat16": DType("bfloat16", mx.bfloat16, "bfloat16_t", "bfloat", 2, 8e-2, 8e-2),
}


def get(name) -> DType:
    if isinstance(name, DType):
        return name
    key = str(name).replace("mlx.core.", "")
    if key in DTYPES:
        return DTYPES[key]
    raise MetalforgeError(f"unsupported dtype '{name}'; valid dtypes: {choices(DTYPES)}")


def vector_of(stem: str, n: int) -> str:
    """Metal's name for n elements of a vector stem (a scalar when n is 1)."""
    return stem if n == 1 else f"{stem}{n}"
