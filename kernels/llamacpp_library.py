"""llama.cpp's Metal matrix-vector kernels (ggml-metal's `kernel_mul_mv_<type>_f32`) run in the
emulator as ggml-metal's host code runs them: its argument struct, function constants, threadgroup
memory and grid. The sources are fetched at run time from the `llama-cpp-python` source
distribution on PyPI (it vendors llama.cpp) and kept in the cache; nothing of llama.cpp is part of
metalforge. The host rules follow ggml-metal-device.cpp (`ggml_metal_library_get_pipeline_mul_mv`)
and ggml-metal-ops.cpp (`ggml_metal_op_mul_mat`, its matrix-vector branch) of that version.

    y = run_mul_mv("q4_0", blocks, x, N)     # x (M, K) float32 @ the (N, K) q4_0 weights -> (M, N)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from metalforge.emulator.library import Library
from metalforge.emulator.trace import Dispatch
from metalforge.errors import MetalforgeError

VERSION = "0.3.36"          # llama-cpp-python's sdist the kernels come from
_GGML = "vendor/llama.cpp/ggml/src/"
# what the kernels include, gathered into one folder (their includes name files, not paths)
_SOURCES = ("ggml-metal/kernels/", "ggml-metal/ggml-metal-impl.h", "ggml-common.h",
            "ggml-metal/ggml-metal-tuning.cpp", "ggml-metal/ggml-metal-tuning.h")   # the last two: data (fa_vec's table)
_MARKERS = ("mul_mv.metal", "ggml-metal-tuning.cpp")   # a folder holding these was extracted whole
# ggml's block formats: values per block and bytes per block (ggml-common.h's block_<type>)
BLOCKS = {"q4_0": (32, 18), "q4_K": (256, 144), "q6_K": (256, 210)}
FC_MUL_MV = "FC_MUL_MV"     # the function constants' base index, a macro of ggml-metal-impl.h


def cache_root() -> Path:
    root = os.environ.get("METALFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "metalforge")
    return Path(root) / "llama-cpp"


def download_command(into: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
            "--no-binary", ":all:", "--disable-pip-version-check", "-q", "-d", str(into)]


def include_root() -> Path:
    """The folder holding the kernels' sources and the headers they include, fetching the sdist
    with pip the first time (one already in the cache's `sdists/` folder is used offline)."""
    target = cache_root() / VERSION
    if all((target / m).exists() for m in _MARKERS):
        return target
    sdists = cache_root() / "sdists"
    sdist = sdists / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        sdists.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(download_command(sdists), capture_output=True, text=True)
        if not sdist.exists():
            reason = (proc.stderr.strip().splitlines() or ["no sdist"])[-1]
            raise MetalforgeError(f"llama.cpp's Metal sources (llama-cpp-python {VERSION}'s sdist) are not cached and "
                                  f"pip could not fetch them ({reason[:160]}): put {sdist.name} in {sdists}")
    _extract(sdist, target)
    return target


def _extract(sdist: Path, target: Path) -> None:
    """The kernels and their headers into a temporary folder renamed into place."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    prefix = f"llama_cpp_python-{VERSION}/{_GGML}"
    try:
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                inside = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                folder, _, name = inside.rpartition("/")
                if member.isfile() and (inside in _SOURCES or f"{folder}/" == _SOURCES[0]):
                    (tmp / name).write_bytes(tar.extractfile(member).read())
        missing = [m for m in _MARKERS if not (tmp / m).exists()]
        if missing:
            raise MetalforgeError(f"{sdist.name} holds no {missing[0]} under {_GGML}ggml-metal/")
        if target.exists():      # extracted by an earlier release of this module: add what it left out
            for f in tmp.iterdir():
                if not (target / f.name).exists():
                    os.replace(f, target / f.name)
        else:
            os.rename(tmp, target)
    except tarfile.TarError:
        raise MetalforgeError(f"{sdist} is not a readable source distribution: delete it and run again") from None
    except OSError:
        if not all((target / m).exists() for m in _MARKERS):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@lru_cache(maxsize=16)
def library(source: str = "mul_mv.metal", mode: str = "plain", races: bool = True, lockstep: bool = False) -> Library:
    """One of ggml-metal's kernel files (they include their headers by name) as an emulator library
    (`races`, `lockstep`: emulator.library.Library's)."""
    root = include_root()
    return Library((root / source).read_text(), headers=root, mode=mode, races=races, lockstep=lockstep)


def macro(name: str) -> int:
    """An integer `#define` of ggml-metal-impl.h (kernel tunings, function-constant bases)."""
    m = re.search(rf"^#define\s+{name}\s+(\d+)\s*$", (include_root() / "ggml-metal-impl.h").read_text(), re.M)
    if m is None:
        raise MetalforgeError(f"ggml-metal-impl.h of llama-cpp-python {VERSION} defines no {name}")
    return int(m.group(1))


ARGS = np.dtype([("ne00", "<i4"), ("ne01", "<i4"), ("ne02", "<i4"), ("nb00", "<u8"), ("nb01", "<u8"),
                 ("nb02", "<u8"), ("nb03", "<u8"), ("ne10", "<i4"), ("ne11", "<i4"), ("ne12", "<i4"),
                 ("nb10", "<u8"), ("nb11", "<u8"), ("nb12", "<u8"), ("nb13", "<u8"), ("ne0", "<i4"),
                 ("ne1", "<i4"), ("nr0", "<i4"), ("r2", "<i2"), ("r3", "<i2")], align=True)   # ggml_metal_kargs_mul_mv


def dispatch(qtype: str, M: int, N: int, K: int) -> dict:
    """What ggml-metal's host code sets for `kernel_mul_mv_<qtype>_f32` over weights (N, K) and x
    (M, K), one batch: the argument struct, function constants, threadgroup memory, grid."""
    if qtype not in BLOCKS:
        raise MetalforgeError(f"llama.cpp matrix-vector type {qtype!r} is not bound (bound: {', '.join(BLOCKS)})")
    per, nbytes = BLOCKS[qtype]
    if K % per:
        raise MetalforgeError(f"K = {K} is not a multiple of {qtype}'s block of {per} values")
    tag = qtype.upper()
    nsg, nr0 = macro(f"N_SG_{tag}"), macro(f"N_R0_{tag}")
    row = K // per * nbytes
    args = np.zeros((), ARGS)
    for name, value in dict(ne00=K, ne01=N, ne02=1, nb00=nbytes, nb01=row, nb02=row * N, nb03=row * N, ne10=K,
                            ne11=M, ne12=1, nb10=4, nb11=4 * K, nb12=4 * K * M, nb13=4 * K * M, ne0=N, ne1=M,
                            nr0=nr0, r2=1, r3=1).items():
        args[name] = value
    base = macro(FC_MUL_MV)
    return {"host_name": f"kernel_mul_mv_{qtype}_f32", "args": args,
            "constants": {base + 0: nsg, base + 2: 1, base + 3: 1, base + 4: 1, base + 5: False},
            "threadgroup_memory": {0: 0},
            "threadgroups": (-(-N // (nr0 * nsg)), M, 1), "threadgroup": (32, nsg, 1)}


def run_mul_mv(qtype: str, blocks: np.ndarray, x: np.ndarray, N: int, mode: str = "plain"):
    """y = x @ W.T with W the (N, K) weights as ggml's blocks (uint8, N rows of K / block values);
    returns y (M, N) float32 and the emulated function (its `last_trace` filled in traced mode)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    M, K = x.shape
    d = dispatch(qtype, M, N, K)
    if blocks.nbytes != int(d["args"]["nb01"]) * N:
        raise MetalforgeError(f"{qtype} weights of {N} x {K} take {int(d['args']['nb01']) * N} bytes, got {blocks.nbytes}")
    fn = library("mul_mv.metal", mode).function(d["host_name"], d["constants"], d["threadgroup_memory"])
    y = np.zeros((M, N), np.float32)
    fn(buffers={0: d["args"].tobytes(), 1: np.ascontiguousarray(blocks), 2: x, 3: y},
       threadgroups=d["threadgroups"], threadgroup=d["threadgroup"])
    return y, fn


# proxy shapes for traces (kernels/timing/traces.py): N cut to 64 rows, K to 4 blocks; the counters
# are scaled to the real N and K through traces at 2x and 4x each
MUL_MV_GROUPS = (("N",), ("K",))


def counted(qtype: str, shape: dict):
    """`kernel_mul_mv_<qtype>_f32`'s dispatch over x (M, K) and the (N, K) weights, counted at the
    real shape from traced runs at proxy shapes (random blocks: the counters do not read the values)."""
    from metalforge.kernels.timing import traces
    per = BLOCKS.get(qtype, (1, 1))[0]
    proxy = {**shape, "N": min(shape["N"], 64), "K": min(shape["K"], 4 * per)}

    def run(s: dict) -> list[Dispatch]:
        d = dispatch(qtype, s["M"], s["N"], s["K"])
        rng = np.random.default_rng(0)
        blocks = rng.integers(0, 256, (s["N"], int(d["args"]["nb01"])), dtype=np.uint8)
        blocks[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)   # a finite scale first
        _, fn = run_mul_mv(qtype, blocks, rng.standard_normal((s["M"], s["K"])).astype(np.float32), s["N"], "traced")
        return [Dispatch(fn.host_name, d["threadgroups"], d["threadgroup"], fn.last_trace)]
    return traces.scaled(f"llama.cpp {VERSION} mul_mv {qtype}", shape, proxy, MUL_MV_GROUPS, run)


def quantize_q4_0(w: np.ndarray) -> np.ndarray:
    """ggml's q4_0 blocks of w (N, K): per 32 values one fp16 scale d = (the value of largest
    magnitude) / -8 and 16 bytes of 4-bit q = min(15, trunc(v / d + 8.5)), value j in the low
    nibble of byte j, value j + 16 in its high nibble (ggml-quants.c's quantize_row_q4_0_ref)."""
    N, K = w.shape
    v = w.reshape(N, K // 32, 32).astype(np.float32)
    peak = np.take_along_axis(v, np.abs(v).argmax(-1)[..., None], -1)
    d = peak / -8.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, np.trunc(v * inv + 8.5)).astype(np.uint8)
    out = np.empty((N, K // 32, 18), np.uint8)
    out[..., :2] = d.astype(np.float16).view(np.uint8).reshape(N, K // 32, 2)
    out[..., 2:] = q[..., :16] | (q[..., 16:] << 4)
    return out.reshape(N, -1)


def dequantize_q4_0(blocks: np.ndarray, K: int) -> np.ndarray:
    N = blocks.shape[0]
    b = blocks.reshape(N, K // 32, 18)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([b[..., 2:] & 0x0F, b[..., 2:] >> 4], axis=-1).astype(np.float32)
    return ((q - 8.0) * d).reshape(N, K)
