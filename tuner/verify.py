"""Checking a candidate's output against its family's MLX reference before it is timed.

On a Mac the kernel runs at the tuned shape through Metal. Off a Mac it runs in the emulator on a
proxy shape: the same config and the same structure (head dim, GQA ratio, bits, group size, batch,
and the remainders that exercise tails), with sequence and row counts cut so a check takes
a moment instead of minutes.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from metalforge.errors import MetalforgeError
from metalforge.kernels import backends


class WrongAnswer(MetalforgeError):
    """A candidate kernel ran but its output differs from the reference."""


def _cut(n: int, keep: int, period: int) -> int:
    """n itself when small, else keep + (n mod period): the remainder (the tail) survives."""
    return n if n <= keep + period else keep + n % period


def proxy_shape(family, shape):
    fields = dict(shape.__dict__)
    if family.name == "qmv":
        fields.update(N=_cut(shape.N, 256, 256), K=_cut(shape.K, 1024, 1024))
    elif family.name == "decode_attention":
        g = shape.Hq // shape.Hkv
        hkv = min(shape.Hkv, 2)
        fields.update(B=min(shape.B, 2), Hkv=hkv, Hq=hkv * g, S=_cut(shape.S, 256, 256), num_blocks=0)
    elif family.name == "prefill_attention":
        g = shape.Hq // shape.Hkv
        fields.update(B=1, Hkv=1, Hq=g, L=_cut(shape.L, 64, 64), prefix=_cut(shape.prefix, 32, 32))
    return family.shape(fields)


class Verifier:
    """Holds one target's inputs and reference output, and checks configs against them."""

    def __init__(self, family, shape, dtype, backend=None, device=None, seed: int = 0):
        self.family = family
        self.backend = backends.resolve(backend)
        self.shape = shape if self.backend == "metal" else proxy_shape(family, shape)
        self.dtype = dtype
        self.device = device
        self.inputs = family.make_inputs(self.shape, dtype, seed=seed)
        self.expected = np.array(family.reference(self.shape, dtype, self.inputs).astype(mx.float32))

    def __call__(self, config: dict) -> None:
        out = self.family.run(config, self.shape, self.dtype, self.inputs, backend=self.backend, device=self.device)
        got = np.array(out.astype(mx.float32))
        atol, rtol = self.family.tolerance(config, self.dtype)
        if got.shape != self.expected.shape:
            raise WrongAnswer(f"output shape {got.shape} differs from the reference {self.expected.shape}")
        bad = ~np.isclose(got, self.expected, atol=atol, rtol=rtol)
        if bad.any():
            i = np.unravel_index(np.argmax(np.abs(got - self.expected) * bad), got.shape)
            raise WrongAnswer(f"{int(bad.sum())} of {got.size} outputs differ from the reference beyond "
                              f"atol={atol} rtol={rtol}; worst at {tuple(int(x) for x in i)}: "
                              f"{got[i]:.6g} instead of {self.expected[i]:.6g}")
