"""The per-kernel constants (model.py) fitted to published kernel timings
(benchmarks/data/kernel_measurements.yaml): each runnable point's kernels - MLX's, chosen by MLX's
rules for the point's chip and shape - traced (mlx_jobs.py) and priced, the constants chosen by
non-negative least squares on relative error. A point that cannot be priced yet is listed with
the reason and left out. A warm point (the same weights or K/V every call) whose data fit in the
system level cache (its chip's, devices/*.yaml) reads from it, not DRAM: its DRAM term is dropped, and the DRAM factor, which only cold reads show, is
fitted on the whole-model decode data (whole_model.py), where the weights come from DRAM. The error of a family is the median |predicted / measured - 1| of its
points when their chip is left out of the fit (leave-one-chip-out), per regime.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from metalforge import devices, files
from metalforge.errors import MetalforgeError
from metalforge.kernels import kernel_measurements
from metalforge.kernels.calibration import data_digest, nonnegative_lstsq
from metalforge.kernels.timing import mlx_jobs, model
from metalforge.kernels.timing.model import Constants

REGIME = {"qmv": "memory", "qmm": "compute", "decode_attention": "memory", "prefill_attention": "compute"}
# Why llama.cpp's kernels are not priced yet: its matrix-vector kernels run in the emulator
# (kernels/llamacpp_library.py) but not in traced mode, where device pointers are bounds-checked ones
LLAMA_CPP_NOT_RUN = ("llama.cpp's kernels are not traced yet: kernel_mul_mv_<type>_f32 runs in the emulator "
                     "(kernels/llamacpp_library.py), but in traced mode its library does not compile: ggml's "
                     "block structs are read through their members (`xb->qs`, `x[ib].scales`), raw arrays the "
                     "emulator's checked device pointers do not carry; flash_attn_ext's host side is not written")
ASSUMED_DTYPE = "float16"   # for points whose source does not state it (the point's `inferred` says so)


@dataclass(frozen=True)
class Row:
    """A priced point: what was measured and the coefficients of the constants in its model time."""
    point: kernel_measurements.KernelPoint
    family: str
    kernels: tuple
    terms: np.ndarray

    @property
    def chip(self) -> str:
        return self.point.profile


def job(p: kernel_measurements.KernelPoint) -> tuple[str, dict]:
    """The MLX op and shape of a point, or an error saying why it cannot be priced yet."""
    if p.library != "mlx":
        raise MetalforgeError(LLAMA_CPP_NOT_RUN)
    chip = p.device.device_name if p.device else p.chip
    variants = [name for name, d in devices.profiles().items() if d.device_name == chip]
    if p.gpu_cores is None and len(variants) > 1:
        raise MetalforgeError(f"GPU cores not stated, and {chip} has a profile per core count ({', '.join(variants)})")
    if p.device is None:
        raise MetalforgeError(f"no device profile for {p.chip}")
    s = dict(p.shape)
    if "N" in s:
        if s.get("bits") not in (2, 3, 4, 5, 6, 8) or "nvfp4" in p.kernel:
            raise MetalforgeError("not an affine-quantized matmul MLX's emulated kernels cover")
        return "matmul", {f: s[f] for f in ("M", "N", "K", "bits", "group_size")}
    L = s.get("L", 1)
    if L == 1:
        return "decode", {f: s[f] for f in ("B", "Hq", "Hkv", "S", "D")}
    if L <= 8:
        raise MetalforgeError(f"{L} queries: MLX's rule for its vector kernels with several queries is not ported")
    if "nax" in p.kernel.lower():
        raise MetalforgeError("the NAX attention kernel (M5) is not instantiated in the emulator")
    return "prefill", {"B": s["B"], "Hq": s["Hq"], "Hkv": s["Hkv"], "L": L, "D": s["D"], "prefix": s["S"] - L,
                       "causal": "causal" in p.kernel}


def family_of(op: str, kernels) -> str:
    if op == "matmul":
        return "qmm" if any(k.startswith("affine_qmm") for k in kernels) else "qmv"
    return {"decode": "decode_attention", "prefill": "prefill_attention"}[op]


def reads_dram(p: kernel_measurements.KernelPoint) -> bool:
    """A cold point reads DRAM; so does a warm one whose data its chip's system level cache cannot
    hold (devices/*.yaml system_cache_mb: 8 MB on the base chips, 24 on the Pro, 48 on the Max, 96 on
    an Ultra): a 42 MB weight re-read every call stays in an M3 Max's cache, not in an M4 Pro's."""
    if p.device is None or not p.device.system_cache_mb:
        raise MetalforgeError(f"no system cache size for {p.chip}: cannot tell a warm read from a DRAM read")
    return "cold" in p.timing or (p.min_bytes() or 0) > p.device.system_cache_mb * 2**20


def stated_family(p: kernel_measurements.KernelPoint) -> str | None:
    """qmv or qmm where the point's kernel names one of them only (MLX's batch limit moved between
    versions: a point is priced only where the installed MLX runs the kernel its source ran)."""
    named = {f for f in ("qmv", "qmm") if f in p.kernel}
    return named.pop() if len(named) == 1 else None


def rows(points=None) -> tuple[list[Row], list[tuple]]:
    """(priced rows, [(point, reason)] for points left out)."""
    points = kernel_measurements.usable(points if points is not None else kernel_measurements.load())
    out, skipped = [], []
    for p in points:
        try:
            op, shape = job(p)
            counted = mlx_jobs.counted(op, shape, p.dtype or ASSUMED_DTYPE, p.device)
            dram = reads_dram(p)
        except MetalforgeError as e:
            skipped.append((p, str(e)))
            continue
        kernels = tuple(c.kernel for c in counted)
        family = family_of(op, kernels)
        stated = stated_family(p)
        if stated and stated != family:
            skipped.append((p, f"the source's MLX ran {stated}; the installed MLX's rules choose {family} here "
                               f"({kernels[0]})"))
            continue
        terms = model.terms(counted, p.device)
        if not dram:     # warm: the data come from the system cache, priced by the cache term
            terms[model.TERMS.index("dram")] = 0.0
        out.append(Row(p, family, kernels, terms))
    return out, skipped


def fit(rows: list[Row]) -> Constants:
    """Least squares on relative error, every constant >= 0."""
    if len(rows) < len(model.TERMS):
        raise MetalforgeError(f"the fit needs at least {len(model.TERMS)} priced points, got {len(rows)}")
    a = np.array([r.terms / r.point.seconds for r in rows])
    return Constants.of(nonnegative_lstsq(a, np.ones(len(rows))))


def errors(rows: list[Row], c: Constants) -> list[float]:
    return [float(r.terms @ c.vector()) / r.point.seconds - 1.0 for r in rows]


def leave_one_chip_out(rows: list[Row]) -> list[tuple[Row, float]]:
    """Each row judged by the constants fitted without its chip."""
    out = []
    for chip in sorted({r.chip for r in rows}):
        held = [r for r in rows if r.chip == chip]
        c = fit([r for r in rows if r.chip != chip])
        out += list(zip(held, errors(held, c)))
    return out


def family_errors(rows: list[Row]) -> dict:
    """Per family: median held-out |error|, its regime, points and chips."""
    by: dict = {}
    for r, e in leave_one_chip_out(rows):
        by.setdefault(r.family, []).append((r.chip, abs(e)))
    return {f: {"regime": REGIME[f], "error": round(float(statistics.median(e for _, e in v)), 4),
                "points": len(v), "chips": len({c for c, _ in v})} for f, v in sorted(by.items())}


# ---- the shipped fit ---------------------------------------------------------------------------
def constants_path() -> Path:
    return Path(str(resources.files("metalforge.kernels.timing"))) / "constants.yaml"


def write(rows: list[Row], skipped: list[tuple], whole: dict, path=None) -> dict:
    """The shipped fit: the per-kernel constants with the DRAM factor and per-dispatch cost of the
    whole-model fit (`whole`: dram, dispatch_s, held_out_error, points)."""
    constants = dataclasses.replace(fit(rows), dram=whole["dram"])
    data = {"constants": constants.as_dict(), "families": family_errors(rows), "whole_model": whole,
            "points": len(rows),
            "chips": len({r.chip for r in rows}),
            "data": kernel_measurements_digest(),
            "left_out": [f"{p.chip} {p.kernel} {dict(p.shape)}: {why}" for p, why in skipped]}
    files.write_atomic(path or constants_path(),
                       "# Written by benchmarks/calibrate.py --write: the per-kernel time model's constants fitted to\n"
                       "# benchmarks/data/kernel_measurements.yaml. Do not edit by hand.\n"
                       + yaml.safe_dump(data, sort_keys=False))
    shipped.cache_clear()
    return data


def kernel_measurements_digest() -> str:
    return data_digest(kernel_measurements.DATA)


@lru_cache(maxsize=1)
def shipped() -> dict:
    path = constants_path()
    try:
        raw = yaml.safe_load(path.read_text())
        raw["constants"] = Constants(**raw["constants"])
        return raw
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise MetalforgeError(f"{path}: per-kernel constants unreadable ({e}); rebuild them with "
                              "python benchmarks/calibrate.py --write") from None


def family_error(family: str) -> float | None:
    """The family's per-kernel held-out error, or None where no kernel-level data validates it."""
    entry = shipped()["families"].get(family)
    return None if entry is None or entry["chips"] < 2 else float(entry["error"])
