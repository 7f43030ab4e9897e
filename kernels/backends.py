"""Backends, one vocabulary for the whole project: `metal` (our kernels on the GPU), `emulator`
(our kernels on the CPU, for verification) and `mlx` (MLX's built-in ops, where a caller can use
them instead of ours: the engine). `auto` is metal on a Mac, else the emulator (or mlx where
allowed); an explicit argument, else `METALFORGE_BACKEND`, overrides it."""
from __future__ import annotations

import os

import mlx.core as mx

from metalforge import emulator
from metalforge.errors import MetalforgeError, choices

KERNEL_BACKENDS = ("metal", "emulator")       # what can run a kernel of ours
BACKENDS = KERNEL_BACKENDS + ("mlx",)           # and MLX's own ops, for callers that can use them
_cache: dict = {}


def requested(backend: str | None = None) -> str:
    """The name asked for: the argument, else METALFORGE_BACKEND, else auto."""
    return (backend or os.environ.get("METALFORGE_BACKEND") or "auto").lower()


def resolve(backend: str | None = None, *, allow_mlx: bool = False) -> str:
    name = requested(backend)
    valid = BACKENDS if allow_mlx else KERNEL_BACKENDS
    if name == "auto":
        return "metal" if mx.metal.is_available() else ("mlx" if allow_mlx else "emulator")
    if name not in valid:
        raise MetalforgeError(f"unknown backend '{name}'; valid backends: auto, {choices(valid)}")
    if name == "metal" and not mx.metal.is_available():
        others = " or ".join(f"'{b}'" for b in valid if b != "metal")
        raise MetalforgeError(f"backend 'metal' needs a Mac with Metal; use {others} (or 'auto') here")
    return name


def kernel(src, backend: str | None = None, device=None):
    """The callable kernel for a KernelSource, built once per backend (and device limits)."""
    name = resolve(backend)
    key = (name, src.name, src.source, getattr(device, "name", device))
    if key not in _cache:
        if name == "metal":
            factory = mx.fast.metal_kernel
            extra = {}
        else:
            factory = emulator.metal_kernel
            extra = {"device": device}
        _cache[key] = factory(name=src.name, input_names=list(src.input_names),
                              output_names=list(src.output_names), source=src.source,
                              **extra)
    return _cache[key]
