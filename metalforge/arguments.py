"""Checks for numbers users give (CLI flags and API arguments), one wording everywhere."""
from __future__ import annotations

import math
import os

from metalforge.errors import MetalforgeError


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MetalforgeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def positive_number(name: str, value) -> float:
    """A finite number > 0 (NaN and infinities are refused: they fail or pass every comparison)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise MetalforgeError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def seed(value) -> int:
    """Seeds are 32-bit unsigned integers (MLX's, NumPy's and Optuna's generators take no more)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise MetalforgeError(f"seed must be an integer in 0..{2**32 - 1}, got {value!r}")
    return value


def env_number(name: str, default: float, minimum: float) -> float:
    """A number of the environment ($name), else `default`; one wording for every variable."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        raise MetalforgeError(f"{name} must be a number >= {minimum:g}, got {raw!r}")
    return value
