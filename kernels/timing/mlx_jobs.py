"""MLX's real kernels for a job, chosen by MLX's rules (kernels/mlx_dispatch.py) at the real shape
and run in the emulator (kernels/mlx_library.py) at proxy shapes, their counters scaled to the
real shape (traces.py). A job is MLX's op as mlx-lm calls it: quantized_matmul with transposed
weights ("matmul": M, N, K, bits, group_size), attention over a contiguous cache with a few
queries ("decode": B, Hq, Hkv, S, D; one query) or causal/unmasked prefill ("prefill": B, Hq, Hkv,
L, D, prefix, causal).
"""
from __future__ import annotations

import mlx.core as mx

from metalforge.errors import MetalforgeError
from metalforge.intmath import cdiv
from metalforge.kernels import dtypes, mlx_dispatch, mlx_library
from metalforge.kernels.prefill_attention import prefill_proxy
from metalforge.kernels.timing import traces

# per job: the axes scaled from a proxy (groups scaled together) and each axis's proxy value
MATMUL_GROUPS = (("M",), ("N",), ("K",))
DECODE_GROUPS = (("B",), ("Hq", "Hkv"), ("S",))
PREFILL_GROUPS = (("B",), ("Hq", "Hkv"), ("L", "prefix"))
# A row of float16 scales (and biases) at least a 32-byte sector long: a SIMD-group's reads of them
# then meet one sector a row, as at the real K, so their sectors grow linearly with K from the proxy
# (at 256 values and groups of 64, 8-byte rows share sectors and the scaled count is 4x off at K = 4096).
QMM_MIN_GROUPS = 16


def _proxy_matmul(shape: dict, choice) -> dict:
    fn, K = choice.launches[0].function, shape["K"]
    if fn in ("affine_qmv_fast", "affine_qmv_wide"):   # qmv_fast wants K in whole 512-value blocks (4 bits)
        k = 512
    elif fn == "affine_qmv":                             # qmv keeps K's tail
        k = 512 + K % 512
    else:   # qmm: whole 32 x 32 tiles, and K of QMM_MIN_GROUPS groups at least
        k = max(256, QMM_MIN_GROUPS * shape["group_size"])
        if fn == "affine_qmm_t_splitk":   # the real shape's partitions (grid z), each whole 32-wide tiles and groups
            part = choice.launches[0].grid[2] * max(32, shape["group_size"])
            k = part * cdiv(k, part)
    m = min(shape["M"], 64) if fn.startswith("affine_qmm") else shape["M"]
    return {**shape, "M": m, "N": min(shape["N"], 64), "K": min(K, k)}


def _proxy_decode(shape: dict, choice) -> dict:
    gqa = shape["Hq"] // shape["Hkv"]
    blocks = choice.launches[0].grid[2] if len(choice.launches) == 2 else 1
    return {**shape, "B": 1, "Hkv": 1, "Hq": gqa, "S": min(shape["S"], max(256, 2 * blocks))}


def _proxy_prefill(shape: dict, choice) -> dict:
    """steel_attention's BQ x BK tiles whole (prefill_proxy); it has no window (the runner's mask is causal)."""
    tile = dict(choice.launches[0].template)
    return prefill_proxy(shape, tile["BQ"], tile["BK"], window=0)


def choose(op: str, shape: dict, dtype: str, device, mlx_version=None):
    """MLX's Choice for the job at its real shape."""
    if op == "matmul":
        return mlx_dispatch.qmm_dispatch(shape["M"], shape["N"], shape["K"], shape["bits"], shape["group_size"],
                                         dtype, device, mlx_version)
    if op == "decode":
        if shape.get("L", 1) > 1:
            # a verify pass: MLX's vector kernel takes L query rows a head and a causal mask among
            # them, a launch not ported here; priced at one query it would compare 4 tokens with 1
            raise MetalforgeError(f"MLX's vector attention over L={shape['L']} query tokens is not traced "
                                  "(its one-query launch is): no evidence for a verify pass")
        return mlx_dispatch.decode_attention_dispatch(shape["B"], shape["Hq"], shape["Hkv"], shape["S"], shape["D"],
                                                      dtype, device, mlx_version)
    if op == "prefill":
        return mlx_dispatch.prefill_attention_dispatch(shape["B"], shape["Hq"], shape["Hkv"], shape["L"], shape["D"],
                                                       dtype, device, mlx_version, prefix=shape.get("prefix", 0),
                                                       causal=shape.get("causal", True))
    raise MetalforgeError(f"unknown MLX job '{op}'; valid: matmul, decode, prefill")


# kernels traceable at a proxy shape (split-K with the real shape's partitions: _proxy_matmul)
RUNNABLE = ("affine_qmv_fast", "affine_qmv", "affine_qmv_wide", "affine_qmv_quad", "affine_qmm_t",
            "affine_qmm_t_splitk", "sdpa_vector", "sdpa_vector_2pass_1", "sdpa_vector_2pass_1_gqa", "attention")


def _runner(op: str, choice, dtype: str):
    """run(shape) -> MLX's dispatches for the chosen kernels at `shape`, on random inputs of the job."""
    mdt = dtypes.get(dtype).mlx

    def run(s: dict):
        out: list = []
        key = mx.random.key(0)
        if op == "matmul":
            x = mx.random.normal((s["M"], s["K"]), key=key).astype(mdt)
            w = mx.random.normal((s["N"], s["K"]), key=key).astype(mdt)
            wq, scales, biases = mx.quantize(w, group_size=s["group_size"], bits=s["bits"])
            mlx_library.run(choice, dict(x=x, w=wq, scales=scales, biases=biases), traces=out)
            return out
        kL = s["S"] if op == "decode" else s.get("prefix", 0) + s["L"]
        qL = 1 if op == "decode" else s["L"]
        q = mx.random.normal((s["B"], s["Hq"], qL, s["D"]), key=key).astype(mdt)
        k = mx.random.normal((s["B"], s["Hkv"], kL, s["D"]), key=key).astype(mdt)
        v = mx.random.normal((s["B"], s["Hkv"], kL, s["D"]), key=key).astype(mdt)
        mlx_library.run(choice, dict(queries=q, keys=k, values=v), traces=out)
        return out
    return run


def counted(op: str, shape: dict, dtype: str, device, mlx_version=None) -> list[traces.Counted]:
    """MLX's dispatches for the job on `device`, counted at the real shape."""
    choice = choose(op, shape, dtype, device, mlx_version)
    fn = choice.launches[0].function
    if fn not in RUNNABLE:
        raise MetalforgeError(f"MLX's {fn} is not instantiated by kernels/mlx_library.py: cannot be traced yet")
    proxy, groups = {"matmul": (_proxy_matmul, MATMUL_GROUPS), "decode": (_proxy_decode, DECODE_GROUPS),
                     "prefill": (_proxy_prefill, PREFILL_GROUPS)}[op]
    p = proxy(shape, choice)
    key = f"mlx {mx.__version__} {op} {dtype} " + " ".join(l.kernel + str(l.grid[2]) for l in choice.launches)
    try:
        return traces.scaled(key, shape, p, groups, _runner(op, choice, dtype))
    except MetalforgeError as e:     # a compile failure lists MSL lines: one line says it
        if "failed to compile" not in str(e):
            raise
        raise MetalforgeError(f"MLX's {choice.launches[0].kernel} cannot be traced yet: "
                              f"{str(e).splitlines()[0]} {str(e).splitlines()[1].strip()}") from None


def traced(op: str, shape: dict, dtype: str, device) -> list:
    """MLX's dispatches for the job on `device`, traced at the shape itself (`metalforge trace`)."""
    return _runner(op, choose(op, shape, dtype, device), dtype)(shape)
