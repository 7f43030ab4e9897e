"""Which implementation of `mx.fast.metal_kernel` runs our kernels: Metal on a Mac, the emulator
elsewhere; `METALFORGE_BACKEND` or an explicit argument overrides the choice."""
from __future__ import annotations

import os

import mlx.core as mx

from metalforge import emulator
from metalforge.errors import MetalforgeError, choices

BACKENDS = ("metal", "emulator")
_cache: dict = {}


def resolve(backend: str | None = None) -> str:
    name = (backend or os.environ.get("METALFORGE_BACKEND") or "auto").lower()
    if name == "auto":
        return "metal" if mx.metal.is_available() else "emulator"
    if name not in BACKENDS:
        raise MetalforgeError(f"unknown kernel backend '{name}'; valid backends: auto, {choices(BACKENDS)}")
    if name == "metal" and not mx.metal.is_available():
        raise MetalforgeError("backend 'metal' needs a Mac with Metal; use 'emulator' (or 'auto') here")
    return name


def kernel(src, backend: str | None = None, device=None):
    """The callable kernel for a KernelSource, built once per backend (and device limits)."""
    name = resolve(backend)
    key = (name, src.name, src.source, src.header, getattr(device, "name", device))
    if key not in _cache:
        if name == "metal":
            factory = mx.fast.metal_kernel
            extra = {}
        else:
            factory = emulator.metal_kernel
            extra = {"device": device}
        _cache[key] = factory(name=src.name, input_names=list(src.input_names),
                              output_names=list(src.output_names), source=src.source,
                              header=src.header, **extra)
    return _cache[key]
