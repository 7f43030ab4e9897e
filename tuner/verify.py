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


class Verifier:
    """Holds one target's inputs and reference output, and checks configs against them."""

    def __init__(self, family, shape, dtype, backend=None, device=None, seed: int = 0):
        self.family = family
        self.backend = backends.resolve(backend)
        self.shape = shape if self.backend == "metal" else family.proxy_shape(shape)
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
