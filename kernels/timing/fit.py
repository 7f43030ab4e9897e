"""The per-kernel constants (model.py) fitted to published kernel timings
(benchmarks/data/kernel_measurements.yaml): each runnable point's kernels - MLX's, chosen by MLX's
rules for the point's chip and shape (mlx_jobs.py), or llama.cpp's matrix-vector or flash-attention
kernels as ggml-metal dispatches them (kernels/llamacpp_library.py, llamacpp_attention.py) - traced and priced, the constants chosen by
non-negative least squares on relative error. A point that cannot be priced yet is listed with
the reason and left out. A warm point (the same weights or K/V every call) whose data fit in the
system level cache (its chip's, devices/*.yaml) reads from it, not DRAM: its DRAM term is dropped, and the DRAM factor, which only cold reads show, is
fitted on the whole-model decode data (engine/whole_model.py), where the weights come from DRAM. The error of a family is the median |predicted / measured - 1| of its
points when their chip is left out of the fit (leave-one-chip-out), per regime.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import statistics
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from metalforge import devices, files
from metalforge.errors import MetalforgeError
from metalforge.kernels import kernel_measurements, llamacpp_attention, llamacpp_library
from metalforge.kernels.families import FAMILIES, get as get_family
from metalforge.kernels.timing import mlx_jobs, model
from metalforge.kernels.timing.model import Constants

# llama.cpp's kernels traced so far: its matrix-vector kernels with one row of x (kernels/llamacpp_library.py)
LLAMA_CPP_MUL_MV = re.compile(r"MUL_MAT (q4_0|q4_K|q6_K) x f32")
LLAMA_CPP_OP = "llama.cpp mul_mv"
# ... and its flash attention (kernels/llamacpp_attention.py); a point naming the queries per
# threadgroup ("(Q=2)") ran that vec configuration, else the tuning table's for its chip ran
LLAMA_CPP_ATTENTION = re.compile(r"FLASH_ATTN_EXT\b")
LLAMA_CPP_QUERIES = re.compile(r"\(Q=(\d+)\)")
LLAMA_CPP_ATTENTION_OP = "llama.cpp flash_attn_ext"
ATTENTION_FIELDS = ("B", "Hq", "Hkv", "L", "S", "D")
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
    chip = p.device.device_name if p.device else p.chip
    variants = [name for name, d in devices.profiles().items() if d.device_name == chip]
    if p.gpu_cores is None and len(variants) > 1:
        raise MetalforgeError(f"GPU cores not stated, and {chip} has a profile per core count ({', '.join(variants)})")
    if p.device is None:
        raise MetalforgeError(f"no device profile for {p.chip}")
    if p.library == "llama.cpp":
        return _llama_cpp_job(p)
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


def _llama_cpp_job(p: kernel_measurements.KernelPoint) -> tuple[str, dict]:
    if LLAMA_CPP_ATTENTION.search(p.kernel):
        missing = [f for f in ATTENTION_FIELDS if not p.get(f)]
        if missing:
            raise MetalforgeError(f"FLASH_ATTN_EXT's {', '.join(missing)} not stated")
        if p.dtype not in llamacpp_attention.DTYPES:
            raise MetalforgeError(f"llama.cpp's flash attention over {p.dtype} K/V is not bound "
                                  f"(bound: {', '.join(llamacpp_attention.DTYPES)})")
        q = LLAMA_CPP_QUERIES.search(p.kernel)
        return LLAMA_CPP_ATTENTION_OP, {**{f: p.get(f) for f in ATTENTION_FIELDS}, "Q": int(q.group(1)) if q else 0}
    m = LLAMA_CPP_MUL_MV.search(p.kernel)
    if m is None or p.get("M") != 1:
        raise MetalforgeError("llama.cpp's kernel is not traced yet: kernels/llamacpp_library.py binds its "
                              "matrix-vector kernels with one row of x (kernel_mul_mv_<q4_0|q4_K|q6_K>_f32) only")
    return LLAMA_CPP_OP, {"qtype": m.group(1), "M": 1, "N": p.get("N"), "K": p.get("K")}


def counted(op: str, shape: dict, dtype: str, device):
    """The dispatches of a job, counted at its shape: llama.cpp's or MLX's kernels."""
    if op == LLAMA_CPP_OP:
        return llamacpp_library.counted(shape["qtype"], {f: shape[f] for f in ("M", "N", "K")})
    if op == LLAMA_CPP_ATTENTION_OP:
        config = (shape["Q"], llamacpp_attention.baseline_ne(shape["D"], shape["D"])) if shape["Q"] else None
        return llamacpp_attention.counted({f: shape[f] for f in ATTENTION_FIELDS}, device, config)
    return mlx_jobs.counted(op, shape, dtype, device)


def family_of(op: str, shape: dict) -> str:
    """The family of ours whose job the point is: the first registered family (in registry order, as
    the engine asks them) whose shape takes the job's fields, a prefill's causal flag aside (ours
    are causal: an unmasked MLX point stands in). llama.cpp's product at q4_0's layout (4 bits,
    groups of 32): the family follows the rows, not the format."""
    fields = {k: v for k, v in shape.items() if k != "causal"}
    if op == LLAMA_CPP_OP:
        fields = {"M": shape["M"], "N": shape["N"], "K": shape["K"], "bits": 4, "group_size": 32}
    if op == LLAMA_CPP_ATTENTION_OP:
        fields = llamacpp_attention.family_fields({f: shape[f] for f in ATTENTION_FIELDS})
    for name, family in FAMILIES.items():
        try:
            family.shape(fields)
        except MetalforgeError:
            continue
        return name
    raise MetalforgeError(f"no family of ours serves {fields}")


def reads_dram(p: kernel_measurements.KernelPoint) -> bool:
    """Whether a point's data come from DRAM: unless its timing says cache-hot (a read faster than
    the chip's DRAM, which the loader refuses without that word), they do. A warm re-read that fits
    the system level cache is no evidence of the cache serving it: the 17.7 MB of weights an M3 Pro
    re-reads (llama.cpp PR 27776) and the 21 MB an M4 Pro does (mlx issue 3852), each under its
    24 MB cache, run at 125 and 176 GB/s, below DRAM's 150 and 273 GB/s."""
    if "cache-hot" not in p.timing:
        return True
    if p.device is None or not p.device.system_cache_mb:
        raise MetalforgeError(f"no system cache size for {p.chip}: cannot price a cache-hot read")
    if (p.min_bytes() or 0) > p.device.system_cache_mb * 2**20:
        raise MetalforgeError(f"cache-hot, but its {p.min_bytes() / 2**20:.0f} MiB do not fit the chip's "
                              f"{p.device.system_cache_mb} MB system level cache")
    return False


# MLX's quantized matmul kernels by kind (affine_qmv*, affine_qmm*): which one ran moved between
# MLX versions with its batch limit
MLX_MATMUL_KINDS = ("qmv", "qmm")


def stated_kind(p: kernel_measurements.KernelPoint) -> str | None:
    """The kind of MLX quantized matmul kernel the point's text names, where it names one only."""
    named = {k for k in MLX_MATMUL_KINDS if k in p.kernel}
    return named.pop() if len(named) == 1 else None


def point_terms(p: kernel_measurements.KernelPoint, dispatches) -> np.ndarray:
    """The coefficients of the constants in a point's time: its dispatches as its timer saw them
    with its share of the host's round trips, a cache-hot point's bytes priced by the cache term
    instead of DRAM's."""
    terms = model.terms(dispatches, p.device, p.timer, p.host_waits)
    if not reads_dram(p):
        dram, cache = model.TERMS.index("dram"), model.TERMS.index("cache")
        terms[[dram, cache]] = 0.0, terms[dram]
    return terms


def rows(points=None) -> tuple[list[Row], list[tuple]]:
    """(priced rows, [(point, reason)] for points left out)."""
    points = kernel_measurements.usable(points if points is not None else kernel_measurements.load())
    out, skipped = [], []
    for p in points:
        try:
            op, shape = job(p)
            dispatches = counted(op, shape, p.dtype or ASSUMED_DTYPE, p.device)
            terms = point_terms(p, dispatches)
        except MetalforgeError as e:
            skipped.append((p, str(e)))
            continue
        kernels = tuple(c.kernel for c in dispatches)
        stated = stated_kind(p)
        if stated and not kernels[0].startswith(f"affine_{stated}"):
            skipped.append((p, f"the source's MLX ran {stated}; the installed MLX's rules choose {kernels[0]} here"))
            continue
        try:
            family = family_of(op, shape)
        except MetalforgeError as e:
            skipped.append((p, str(e)))
            continue
        out.append(Row(p, family, kernels, terms))
    return out, skipped


def nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: the best over subsets of free coefficients
    (a handful of constants, so trying every subset is exact and instant)."""
    best, best_err = np.zeros(a.shape[1]), np.inf
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (x < 0).any():
                continue
            full = np.zeros(a.shape[1])
            full[list(cols)] = x
            err = float(np.sum((a @ full - b) ** 2))
            if err < best_err:
                best, best_err = full, err
    return best


def fit(rows: list[Row], held: tuple = ()) -> Constants:
    """Least squares on relative error, every constant >= 0; the terms `held` stay at 0."""
    free = [i for i, t in enumerate(model.TERMS) if t not in held]
    if len(rows) < len(free):
        raise MetalforgeError(f"the fit needs at least {len(free)} priced points, got {len(rows)}")
    a = np.array([r.terms[free] / r.point.seconds for r in rows])
    values = np.zeros(len(model.TERMS))
    values[free] = nonnegative_lstsq(a, np.ones(len(rows)))
    return Constants.of(values)


def errors(rows: list[Row], c: Constants) -> list[float]:
    return [float(r.terms @ c.vector()) / r.point.seconds - 1.0 for r in rows]


def leave_one_chip_out(rows: list[Row], held: tuple = ()) -> list[tuple[Row, float]]:
    """Each row judged by the constants fitted without its chip."""
    out = []
    for chip in sorted({r.chip for r in rows}):
        on_chip = [r for r in rows if r.chip == chip]
        c = fit([r for r in rows if r.chip != chip], held)
        out += list(zip(on_chip, errors(on_chip, c)))
    return out


# what a point's price is made of, its fixed costs (host round trip, launch) aside: its bytes, or its on-chip work
MEMORY_TERMS = ("dram", "cache")
COMPUTE_TERMS = ("onchip", "mma", "sync")


def bound(row: Row, c: Constants) -> str:
    """What limits the point's kernels by their price under `c`: "memory" where their bytes (DRAM or
    system cache) cost at least what their on-chip work does (sectors and threadgroup passes, MMAs,
    barriers and SIMD-group functions), else "compute"."""
    cost = dict(zip(model.TERMS, row.terms * c.vector()))
    return "memory" if sum(cost[t] for t in MEMORY_TERMS) >= sum(cost[t] for t in COMPUTE_TERMS) else "compute"


def regime_errors(rows: list[Row], held: tuple = ()) -> dict:
    """Per family and what bounds its points (`bound` under the all-point fit): the median held-out
    |error|, points and chips; {(family, bound): {...}}."""
    c = fit(rows, held)
    by: dict = {}
    for r, e in leave_one_chip_out(rows, held):
        by.setdefault((r.family, bound(r, c)), []).append((r.chip, abs(e)))
    return {k: {"error": round(float(statistics.median(e for _, e in v)), 4), "points": len(v),
                "chips": len({ch for ch, _ in v})} for k, v in sorted(by.items())}


def family_errors(rows: list[Row], held: tuple = ()) -> dict:
    """Per family: median held-out |error|, its regime, points and chips."""
    by: dict = {}
    for r, e in leave_one_chip_out(rows, held):
        by.setdefault(r.family, []).append((r.chip, abs(e)))
    return {f: {"regime": get_family(f).bound, "error": round(float(statistics.median(e for _, e in v)), 4),
                "points": len(v), "chips": len({c for c, _ in v})} for f, v in sorted(by.items())}


# Terms the data may not identify: each is fitted only where freeing it lowers the held-out error.
# host_call: the round trip of a call timed on its own; cache: bytes a cache-hot point's system
# level cache serves (at 0 they cost nothing beyond the on-chip terms).
OPTIONAL = ("host_call", "cache")


def ablation(rows: list[Row]) -> dict:
    """{terms held at 0: family_errors} for every choice of OPTIONAL terms to hold."""
    choices = itertools.chain.from_iterable(itertools.combinations(OPTIONAL, k) for k in range(len(OPTIONAL) + 1))
    return {held: family_errors(rows, held) for held in choices}


def held_terms(rows: list[Row], table: dict | None = None) -> tuple:
    """The OPTIONAL terms held at 0: the choice with the lowest mean of the families' held-out
    errors (each family counts once, whatever its points), the one holding more on a tie."""
    table = table or ablation(rows)
    return min(table, key=lambda held: (statistics.mean(e["error"] for e in table[held].values()), -len(held)))


# ---- the shipped fit ---------------------------------------------------------------------------
def constants_path() -> Path:
    return Path(str(resources.files("metalforge.kernels.timing"))) / "constants.yaml"


def write(rows: list[Row], skipped: list[tuple], whole: dict, held: tuple, path=None) -> dict:
    """The shipped fit: the per-kernel constants (the terms `held` at 0) with the DRAM factor and
    per-dispatch cost of the whole-model fit (`whole`: dram, dispatch_s, held_out_error, points)."""
    constants = dataclasses.replace(fit(rows, held), dram=whole["dram"])
    data = {"constants": constants.as_dict(), "held": list(held), "families": family_errors(rows, held),
            "whole_model": whole,
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
    return files.digest(kernel_measurements.DATA)


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
