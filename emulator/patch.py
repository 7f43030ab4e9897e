"""Making `mx.fast.metal_kernel` itself the emulator, for code we do not own."""
from __future__ import annotations

import contextlib

import mlx.core as mx

from .kernel import metal_kernel


@contextlib.contextmanager
def patch(metal_available: bool = False, device=None, checked=None):
    """Within the block `mx.fast.metal_kernel` is the emulator; with `metal_available=True`
    `mx.metal.is_available()` answers True too, for code that gates its kernels on it."""
    original_kernel = mx.fast.metal_kernel
    original_available = mx.metal.is_available

    def emulated(*args, **kwargs):
        kwargs.setdefault("device", device)
        kwargs.setdefault("checked", checked)
        return metal_kernel(*args, **kwargs)

    mx.fast.metal_kernel = emulated
    if metal_available:
        mx.metal.is_available = lambda: True
    try:
        yield emulated
    finally:
        mx.fast.metal_kernel = original_kernel
        mx.metal.is_available = original_available
