"""MLX's real Metal kernels for our four jobs, run in the emulator: quantized mat-vec (qmv_fast,
qmv, qmv_quad, qmv_wide), quantized mat-mat (qmm_t and its split-K), decode attention (sdpa_vector, the
2-pass pair) and prefill attention (steel_attention).

MLX's headers come from the mlx-metal wheel (kernels/mlx_headers.py); the instantiations, which
MLX keeps in .metal files the wheel does not ship, are written here the way MLX's quantized.metal
and scaled_dot_product_attention.metal write them, under the host names MLX 0.32's metallib
lists. Buffers, function constants and grids follow MLX's host code (mlx/backend/metal/
quantized.cpp, scaled_dot_product_attention.cpp) at the given shape; which kernel MLX picks for
a shape and chip is kernels/mlx_dispatch.py's business, so each runner takes the kernel to use.
"""
from __future__ import annotations

import math
import struct

import mlx.core as mx
import numpy as np

from metalforge.emulator.library import Library
from metalforge.emulator.trace import Dispatch
from metalforge.errors import MetalforgeError
from metalforge.kernels import mlx_dispatch, mlx_headers

_K = "mlx/backend/metal/kernels"
QUANTIZED_INCLUDES = (f"{_K}/utils.h", f"{_K}/steel/gemm/gemm.h", f"{_K}/quantized_utils.h", f"{_K}/quantized.h")
SDPA_INCLUDES = (f"{_K}/utils.h", f"{_K}/sdpa_vector.h")
STEEL_ATTENTION_INCLUDES = (f"{_K}/utils.h", f"{_K}/steel/attn/kernels/steel_attention.h")
SPLITK_ACCUM_INCLUDES = (f"{_K}/utils.h", f"{_K}/steel/gemm/gemm.h", f"{_K}/steel/gemm/kernels/steel_gemm_splitk.h")

# MLX's type names: in kernel host names and template arguments, and in steel's names
METAL_TYPE = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t"}
STEEL_TYPE = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16", mx.bool_: "bool_"}
_NUMPY = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16}


def instantiation(host_name: str, function: str, arguments: str) -> str:
    """One line as MLX's instantiate_kernel macro writes it."""
    return (f'template [[host_name("{host_name}")]] [[kernel]] decltype({function}<{arguments}>) '
            f"{function}<{arguments}>;")


def library_source(includes: tuple[str, ...], host_name: str, name: str, arguments: str) -> str:
    return "".join(f'#include "{i}"\n' for i in includes) + instantiation(host_name, name, arguments) + "\n"


_libraries: dict[tuple[str, str], Library] = {}   # (host name, mode) -> its one-instantiation library


def function(includes: tuple[str, ...], host_name: str, name: str, arguments: str, constants=None, mode="plain"):
    """MLX's kernel `name<arguments>` under its host name, specialised for `constants`."""
    if (host_name, mode) not in _libraries:
        _libraries[host_name, mode] = Library(library_source(includes, host_name, name, arguments),
                                              headers=mlx_headers.include_root(), mode=mode)
    return _libraries[host_name, mode].function(host_name, dict(constants or {}))


def host_names_run() -> list[str]:
    """The MLX kernels this process has instantiated, by host name."""
    return sorted({host for host, _ in _libraries})


def _run(fn, traces: list | None, *, buffers, threadgroup, threadgroups=None, threads=None) -> None:
    """One dispatch: a grid of `threadgroups` (MLX's dispatch_threadgroups) or of `threads`, the
    edge threadgroups partial (dispatch_threads)."""
    fn(buffers=buffers, threadgroups=threadgroups, threads=threads, threadgroup=threadgroup)
    if traces is not None:
        if threads is not None:
            threadgroup = tuple(min(t, g) for t, g in zip(threadgroup, threads))
            threadgroups = tuple(math.ceil(g / t) for g, t in zip(threads, threadgroup))
        traces.append(Dispatch(fn.host_name, tuple(threadgroups), tuple(threadgroup), fn.last_trace))


def _mode(traces) -> str:
    return "plain" if traces is None else "traced"


def _out(shape, dtype) -> np.ndarray:
    return np.zeros(shape, dtype=_NUMPY.get(dtype, np.float32))


def _mx(out: np.ndarray, dtype) -> mx.array:
    arr = mx.array(out)
    return arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr


def _type(dtype) -> str:
    try:
        return METAL_TYPE[dtype]
    except KeyError:
        raise MetalforgeError(f"MLX's kernels run float32, float16 and bfloat16, not {dtype}") from None


# ---- quantized matmuls (quantized.cpp) -----------------------------------------------------------------
def qmv_fast_applies(N: int, K: int, bits: int) -> bool:
    """quantized.cpp qmv(): `fast = N % bn == 0 && K % qmv_fast_k_alignment(bits) == 0`, bn = 8."""
    pack_factor = 8 if bits in (3, 5) else 4 if bits == 6 else 32 // bits   # get_pack_factor<bits, 32>
    return N % 8 == 0 and K % (pack_factor * (1 if bits == 2 else 2) * 32) == 0


def _quantized(name: str, host_tail: str, arguments: str, x, w, scales, biases, group_size: int, bits: int,
               extra: dict, threadgroups, threadgroup, traces) -> mx.array:
    """One of MLX's quantized kernels on y = x w^T: host name `<name>_<type>_gs_<gs>_b_<bits><tail>`,
    template arguments `<type>, <gs>, <bits>, <arguments>`, MLX's first seven buffers plus `extra`."""
    (M, K), N, t = x.shape, w.shape[0], _type(x.dtype)
    fn = function(QUANTIZED_INCLUDES, f"{name}_{t}_gs_{group_size}_b_{bits}{host_tail}", name,
                  f"{t}, {group_size}, {bits}, {arguments}", mode=_mode(traces))
    y = _out((M, N), x.dtype)
    _run(fn, traces, buffers={0: w, 1: scales, 2: biases, 3: x, 4: y, 5: K, 6: N, **extra},
         threadgroups=threadgroups, threadgroup=threadgroup)
    return _mx(y, x.dtype)


def qmv(x, w, scales, biases, *, group_size: int, bits: int, fast: bool, traces: list | None = None) -> mx.array:
    """affine_qmv_fast or affine_qmv: x (M, K) times w (N, K) quantized; grid (M, ceil(N/8), 1) of (32, 2, 1)."""
    (M, _), N = x.shape, w.shape[0]
    return _quantized("affine_qmv_fast" if fast else "affine_qmv", "_batch_0_pr_0_hgs_0_r_4", "false, false, false, 4",
                      x, w, scales, biases, group_size, bits, {}, (M, math.ceil(N / 8), 1), (32, 2, 1), traces)


def qmv_quad(x, w, scales, biases, *, group_size: int, bits: int, traces: list | None = None) -> mx.array:
    """affine_qmv_quad for K = 64 or 128: quad-groups of 4 lanes, 8 quads x 8 rows per 32-thread
    threadgroup; grid (M, ceil(N/64), 1)."""
    (M, K), N = x.shape, w.shape[0]
    return _quantized("affine_qmv_quad", f"_d_{K}_batch_0", f"{K}, false", x, w, scales, biases, group_size, bits,
                      {}, (M, math.ceil(N / 64), 1), (32, 1, 1), traces)


def qmv_wide(x, w, scales, biases, *, group_size: int, bits: int, traces: list | None = None) -> mx.array:
    """affine_qmv_wide for 2 <= M: vecs_per_tg = ceil(M / ceil(M / 5)) vectors per threadgroup,
    k_lanes 8, (32 / 8) * 2 rows per threadgroup of (32, 2, 1)."""
    (M, _), N = x.shape, w.shape[0]
    vecs = math.ceil(M / ((M + 4) // 5))
    return _quantized("affine_qmv_wide", f"_nv_{vecs}_kl_8_batch_0", f"{vecs}, 8, false", x, w, scales, biases,
                      group_size, bits, {7: M}, (math.ceil(M / vecs), math.ceil(N / 8), 1), (32, 2, 1), traces)


def qmm_t(x, w, scales, biases, *, group_size: int, bits: int, traces: list | None = None) -> mx.array:
    """affine_qmm_t: 32x32 output tiles, grid (ceil(N/32), ceil(M/32), 1) of (32, 2, 2)."""
    (M, _), N = x.shape, w.shape[0]
    aligned = str(N % 32 == 0).lower()
    return _quantized("affine_qmm_t", f"_alN_{aligned}_batch_0", f"{aligned}, false", x, w, scales, biases,
                      group_size, bits, {7: M}, (math.ceil(N / 32), math.ceil(M / 32), 1), (32, 2, 2), traces)


def qmm_t_splitk(x, w, scales, biases, *, group_size: int, bits: int, split_k: int,
                 traces: list | None = None) -> mx.array:
    """affine_qmm_t_splitk then steel_gemm_splitk_accum, as 0.32.4's qmm_splitk() launches them: K cut
    in `split_k` partitions (grid z; kernels/mlx_dispatch.py says how many MLX takes), each writing
    its float32 partial (M, N) slab, then one thread an output summing the slabs into y."""
    M, K = x.shape
    N = w.shape[0]
    if split_k <= 1 or K % split_k or (K // split_k) % max(group_size, 32):
        raise MetalforgeError(f"qmm split-K cannot cut K={K} in {split_k} partitions of whole 32-wide K tiles and "
                              f"groups of {group_size} (MLX's rule never does: kernels/mlx_dispatch.py)")
    aligned = str(N % 32 == 0).lower()
    t = _type(x.dtype)
    fn = function(QUANTIZED_INCLUDES, f"affine_qmm_t_splitk_{t}_gs_{group_size}_b_{bits}_alN_{aligned}",
                  "affine_qmm_t_splitk", f"{t}, {group_size}, {bits}, {aligned}", mode=_mode(traces))
    partials = np.zeros((split_k, M, N), dtype=np.float32)
    _run(fn, traces, buffers={0: w, 1: scales, 2: biases, 3: x, 4: partials, 5: K, 6: N, 7: M, 8: K // split_k, 9: M * N},
         threadgroups=(math.ceil(N / 32), math.ceil(M / 32), split_k), threadgroup=(32, 2, 2))
    return splitk_accum(partials, x.dtype, traces=traces)


def splitk_accum(partials: np.ndarray, dtype, *, traces: list | None = None) -> mx.array:
    """steel_gemm_splitk_accum_<out>_float32 over float32 partials (split_k, M, N): dispatch_threads
    over (N, M, 1) in get_block_dims(N, M, 1) threadgroups, partition stride and ldd M * N and N."""
    split_k, M, N = partials.shape
    fn = function(SPLITK_ACCUM_INCLUDES, f"steel_gemm_splitk_accum_{STEEL_TYPE[dtype]}_float32", "gemm_splitk_accum",
                  f"float, {_type(dtype)}", mode=_mode(traces))
    y = _out((M, N), dtype)
    _run(fn, traces, buffers={0: partials, 1: y, 2: split_k, 3: M * N, 4: N}, threads=(N, M, 1),
         threadgroup=mlx_dispatch.block_dims(N, M))
    return _mx(y, dtype)


# ---- decode attention (scaled_dot_product_attention.cpp) -------------------------------------------------
def _sdpa_constants(do_causal: bool, blocks: int | None = None) -> dict:
    out = {20: False, 21: False, 22: do_causal, 23: False, 24: False, 25: False}
    if blocks is not None:
        out[26] = blocks
    return out


def _kv_strides(k) -> tuple[int, int]:
    """(head stride, sequence stride) in elements of a row-contiguous (B, heads, L, D) array, as the
    host code reads them (`k.shape(1) == 1 ? k.strides(0) : k.strides(1)`: L * D either way)."""
    return k.shape[2] * k.shape[3], k.shape[3]


def sdpa_vector(q, k, v, *, scale: float, do_causal: bool = False, traces: list | None = None) -> mx.array:
    """sdpa_vector: one threadgroup of 1024 threads per (batch x query head, query)."""
    B, H, qL, D = q.shape
    V = v.shape[-1]
    t = _type(q.dtype)
    host = f"sdpa_vector_{t}_{D}_{V}"
    fn = function(SDPA_INCLUDES, host, "sdpa_vector", f"{t}, {D}, {V}", _sdpa_constants(do_causal), mode=_mode(traces))
    out = _out((B, H, qL, V), q.dtype)
    k_head, k_seq = _kv_strides(k)
    v_head, v_seq = _kv_strides(v)
    _run(fn, traces, buffers={0: q, 1: k, 2: v, 3: out, 4: H // k.shape[1], 5: k.shape[2], 6: k_head, 7: k_seq,
                       8: v_head, 9: v_seq, 10: scale},
         threadgroups=(B * H, qL, 1), threadgroup=(1024, 1, 1))
    return _mx(out, q.dtype)


def sdpa_vector_2pass(q, k, v, *, scale: float, blocks: int, do_causal: bool = False, gqa: tuple | None = None,
                      traces: list | None = None) -> mx.array:
    """sdpa_vector_2pass_1 over `blocks` key blocks (grid (kv heads, batch, blocks) of (32, gqa, qL)),
    then sdpa_vector_2pass_2 merging the partials (1024 threads per query). `gqa` = (G, HPT): pass 1
    is sdpa_vector_2pass_1_gqa instead, each SIMD group holding HPT of the KV head's G query heads
    over 1/HPT of the block's keys (one query, no mask), its partials laid out alike."""
    B, H, qL, D = q.shape
    V = v.shape[-1]
    t = _type(q.dtype)
    if gqa:
        G, hpt = gqa
        if G != H // k.shape[1] or qL != 1:
            raise MetalforgeError(f"sdpa_vector_2pass_1_gqa_{G} runs one query of {G} heads per KV head, "
                                  f"got {qL} of {H // k.shape[1]}")
        first = function(SDPA_INCLUDES, f"sdpa_vector_2pass_1_gqa_{G}_{t}_{D}_{V}", "sdpa_vector_2pass_1_gqa",
                         f"{t}, {D}, {V}, {G}, {hpt}", _sdpa_constants(do_causal, blocks), mode=_mode(traces))
    else:
        first = function(SDPA_INCLUDES, f"sdpa_vector_2pass_1_{t}_{D}_{V}", "sdpa_vector_2pass_1", f"{t}, {D}, {V}",
                         _sdpa_constants(do_causal, blocks), mode=_mode(traces))
    partials = _out((B, H, qL, blocks, V), q.dtype)
    sums = np.zeros((B, H, qL, blocks), np.float32)
    maxs = np.zeros((B, H, qL, blocks), np.float32)
    k_head, k_seq = _kv_strides(k)
    v_head, v_seq = _kv_strides(v)
    _run(first, traces, buffers={0: q, 1: k, 2: v, 3: partials, 4: sums, 5: maxs, 7: k.shape[2], 8: k_head, 9: k_seq,
                       10: v_head, 11: v_seq, 12: scale},
         threadgroups=(k.shape[1], B, blocks), threadgroup=(32, H // k.shape[1], qL))
    second = function(SDPA_INCLUDES, f"sdpa_vector_2pass_2_{t}_{V}", "sdpa_vector_2pass_2", f"{t}, {V}",
                      mode=_mode(traces))
    out = _out((B, H, qL, V), q.dtype)
    _run(second, traces, buffers={0: partials, 1: sums, 2: maxs, 3: out, 4: blocks},
         threadgroups=(B * H, qL, 1), threadgroup=(1024, 1, 1))
    return _mx(out, q.dtype)


# ---- prefill attention (steel_attention) -----------------------------------------------------------------
def _attn_params(q, k, scale: float, bq: int, bk: int) -> bytes:
    """steel/attn/params.h AttnParams: 14 four-byte fields, then four int64[3] stride triples."""
    B, H, qL, D = q.shape
    kL = k.shape[2]
    NQ, NK = math.ceil(qL / bq), math.ceil(kL / bk)
    q_strides = (H * qL * D, qL * D, D)
    k_strides = (k.shape[1] * kL * D, kL * D, D)
    ints = (B, H, D, qL, kL, H // k.shape[1])
    tail = (NQ, NK, qL // bq, kL // bk, qL - (qL // bq) * bq, kL - (kL // bk) * bk, kL - qL)
    return (struct.pack("<6if7i", *ints, scale, *tail) + struct.pack("<12q", *q_strides, *k_strides, *k_strides,
                                                                         *q_strides))


def steel_attention(q, k, v, *, scale: float, do_causal: bool, traces: list | None = None) -> mx.array:
    """steel_attention: bq 32, bk 32 below D=128 else 16, wm 4, wn 1; grid (ceil(qL/32), H, B) of (32, 4, 1)."""
    B, H, qL, D = q.shape
    kL = k.shape[2]
    bq, bk = 32, (32 if D < 128 else 16)
    name = STEEL_TYPE[q.dtype]
    host = f"steel_attention_{name}_bq{bq}_bk{bk}_bd{D}_bv{D}_wm4_wn1_mask{name}"
    t = _type(q.dtype)
    constants = {200: qL % bq == 0, 201: kL % bk == 0, 300: False, 301: do_causal, 302: False, 303: False}
    fn = function(STEEL_ATTENTION_INCLUDES, host, "attention", f"{t}, {bq}, {bk}, {D}, {D}, 4, 1, {t}, float",
                  constants, mode=_mode(traces))
    out = _out((B, H, qL, D), q.dtype)
    _run(fn, traces, buffers={0: q, 1: k, 2: v, 3: out, 4: _attn_params(q, k, scale, bq, bk)},
         threadgroups=(math.ceil(qL / bq), H, B), threadgroup=(32, 4, 1))
    return _mx(out, q.dtype)


# ---- MLX's choice, run ------------------------------------------------------------------------------------
def run(choice, inputs: dict, *, traces: list | None = None) -> mx.array:
    """Run the kernels MLX's rules chose (a kernels/mlx_dispatch.Choice) on a job's inputs (x, w,
    scales, biases; or queries, keys, values): the one place that maps a choice to a runner, so
    what runs is what mlx_dispatch says MLX launches."""
    first = choice.launches[0]
    fn, t = first.function, dict(first.template)
    if fn.startswith("affine_"):
        args = [inputs[n] for n in ("x", "w", "scales", "biases")]
        q = dict(group_size=t["group_size"], bits=t["bits"], traces=traces)
        if fn == "affine_qmv_quad":
            return qmv_quad(*args, **q)
        if fn == "affine_qmv_wide":
            return qmv_wide(*args, **q)
        if fn == "affine_qmm_t_splitk":
            second = choice.launches[1].function
            if second != "gemm_splitk_accum":   # before 0.32.4 MLX summed them with col_reduce_*
                raise MetalforgeError(f"MLX {choice.mlx_version} sums split-K partials with {second}, which "
                                      "kernels/mlx_library.py does not instantiate (it runs 0.32.4's gemm_splitk_accum)")
            return qmm_t_splitk(*args, split_k=first.grid[2], **q)
        if fn == "affine_qmm_t":
            return qmm_t(*args, **q)
        if fn in ("affine_qmv_fast", "affine_qmv"):
            return qmv(*args, fast=fn == "affine_qmv_fast", **q)
    if fn in ("sdpa_vector", "sdpa_vector_2pass_1", "sdpa_vector_2pass_1_gqa", "attention"):
        q, k, v = inputs["queries"], inputs["keys"], inputs["values"]
        scale = 1 / math.sqrt(q.shape[-1])
        causal = any(name == "do_causal" and value for _, name, value in first.constants)
        if fn == "attention":
            return steel_attention(q, k, v, scale=scale, do_causal=causal, traces=traces)
        if fn.startswith("sdpa_vector_2pass_1"):
            gqa = (t["G"], t["HPT"]) if fn.endswith("_gqa") else None
            return sdpa_vector_2pass(q, k, v, scale=scale, blocks=first.grid[2], do_causal=causal, gqa=gqa,
                                     traces=traces)
        return sdpa_vector(q, k, v, scale=scale, do_causal=causal, traces=traces)
    raise MetalforgeError(f"MLX's {fn} is not instantiated by kernels/mlx_library.py: cannot run it yet")
