"""Timers: `MetalTimer` measures on a Mac; `ModelTimer` estimates anywhere and says so.

A measured result always beats a modelled one (see results.merge); every Timing carries its kind.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import mlx.core as mx

from metalforge.errors import MetalforgeError
from metalforge.kernels import dtypes


@dataclass(frozen=True)
class Timing:
    seconds: float | None   # median (None: a baseline the model cannot price yet)
    spread: float       # (p90 - p10) / median over the repeats; 0 for a model
    kind: str           # "metal" or "model"
    repeats: int = 1


class Timer(Protocol):
    """What tuning needs of a timer: its `kind`, which every timing carries. "metal" measures
    kernels run on the device (tuning makes inputs for them and watches for thermal drift);
    "model" estimates without running anything."""

    kind: str

    def time(self, run: Callable | None, *, family, config, shape, dtype, device) -> Timing: ...

    def baseline(self, run: Callable | None, *, family, shape, dtype, device) -> Timing: ...


def measures(timer: Timer) -> bool:
    """Whether the timer runs kernels on a device (inputs needed, thermal drift watched)."""
    return timer.kind != "model"


class ModelTimer:
    """The per-kernel model's price of a config's counted work (Family.modelled_seconds) ranks our
    configs; MLX's baseline is its real kernel priced by the same model (a modelled entry is
    re-priced from traces too: tuner.study.entry)."""

    kind = "model"

    def time(self, run: Callable | None, *, family, config, shape, dtype, device) -> Timing:
        return Timing(family.modelled_seconds(config, shape, dtype, device), 0.0, self.kind)

    def baseline(self, run: Callable | None, *, family, shape, dtype, device) -> Timing:
        """MLX's real kernel for the job, chosen by MLX's rules, priced by the per-kernel model
        (seconds None where that kernel cannot be traced yet: then the entry carries no ratio)."""
        from metalforge.kernels.timing import compare, fit, model
        try:
            counted = compare.mlx_counted(family.name, dict(shape.__dict__), dtypes.get(dtype), device)
        except MetalforgeError:
            return Timing(None, 0.0, self.kind)
        return Timing(model.price(counted, device, fit.shipped()["constants"]), 0.0, self.kind)


class MetalTimer:
    """Wall-clock timing on the GPU: warm-up, then synchronised repeats until a time budget."""

    kind = "metal"

    def __init__(self, warmup: int = 3, budget_s: float = 0.25, min_repeats: int = 5, max_repeats: int = 200):
        self.warmup, self.budget_s, self.min_repeats, self.max_repeats = warmup, budget_s, min_repeats, max_repeats

    def _measure(self, run: Callable) -> Timing:
        for _ in range(self.warmup):
            mx.eval(run())
        mx.synchronize()
        samples = []
        start = time.perf_counter()
        while len(samples) < self.min_repeats or (time.perf_counter() - start < self.budget_s
                                                  and len(samples) < self.max_repeats):
            t = time.perf_counter()
            mx.eval(run())
            mx.synchronize()
            samples.append(time.perf_counter() - t)
        samples.sort()
        median = statistics.median(samples)
        lo, hi = samples[len(samples) // 10], samples[(len(samples) * 9) // 10]
        return Timing(median, (hi - lo) / median if median else 0.0, self.kind, len(samples))

    def time(self, run: Callable, *, family, config, shape, dtype, device) -> Timing:
        return self._measure(run)

    def baseline(self, run: Callable, *, family, shape, dtype, device) -> Timing:
        return self._measure(run)


def timer_to_dict(timer: Timer) -> dict:
    """A timer as JSON, for a worker process: its kind and its options."""
    if type(timer) not in (MetalTimer, ModelTimer):
        raise MetalforgeError(f"a {type(timer).__name__} cannot be sent to worker processes (only MetalTimer, ModelTimer)")
    return {"kind": timer.kind, **vars(timer)}


def timer_from_dict(data: dict) -> Timer:
    options = {k: v for k, v in data.items() if k != "kind"}
    return MetalTimer(**options) if data["kind"] == "metal" else ModelTimer()


def default_timer():
    """MetalTimer on a Mac, ModelTimer elsewhere."""
    return MetalTimer() if mx.metal.is_available() else ModelTimer()
