"""What a modelled ratio may claim: a family's per-kernel error (fit.py, earned on published kernel
timings with the chip held out) gates every "ours vs MLX" figure. No kernel-level data for the
family (fewer than two chips): "unvalidated", no number. Within the error: "within model error".
Beyond it: the ratio with the error beside it.
"""
from __future__ import annotations

from metalforge.kernels.timing import fit

UNVALIDATED = "unvalidated"
WITHIN = "within model error"


def within_error(speedup: float, error: float) -> bool:
    """Whether a modelled ratio is indistinguishable from 1 given the model's error."""
    return abs(speedup - 1.0) <= error


def claim(ratio: float | None, family: str) -> str:
    """The words for a modelled ratio (MLX's time / ours) of `family`."""
    error = fit.family_error(family)
    if error is None:
        return f"{UNVALIDATED} (no per-kernel measurements of {family} on two chips)"
    if not ratio:
        return "-"
    if within_error(ratio, error):
        return f"{WITHIN} ({error:.0%})"
    return f"{ratio:.2f}x ({'ours' if ratio > 1 else 'MLX'} faster; model error {error:.0%})"


def evidence(ratio: float | None, family: str) -> bool:
    """Whether a modelled ratio shows ours faster: beyond the family's per-kernel error."""
    error = fit.family_error(family)
    return bool(ratio) and error is not None and ratio - 1.0 > error


GAIN = "gain beyond model error"
PARITY = "parity (within model error)"
MLX_RUNS = "MLX faster: MLX's kernel runs"


def verdict(ratio: float | None, family: str) -> str:
    """Which kernel a modelled bucket ships, in words: MLX's wherever it is modelled faster,
    whatever the error (the model's best estimate; so the worst case is parity), ours only on a
    gain beyond the family's per-kernel error; unvalidated families claim nothing else."""
    if not ratio:
        return "-"
    if ratio < 1.0:
        return MLX_RUNS
    if fit.family_error(family) is None:
        return UNVALIDATED
    return GAIN if evidence(ratio, family) else PARITY
