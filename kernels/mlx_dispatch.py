"""Which of MLX's own Metal kernels MLX launches for one of our jobs, as MLX's host code decides it.

Every "ours vs MLX" figure needs MLX's real kernel and geometry, not a description written by hand.
This module ports the decisions of MLX's host code (mlx/backend/metal/quantized.cpp,
scaled_dot_product_attention.cpp, and the split-K accumulation of matmul.cpp) for the MLX
versions pyproject allows (mlx>=0.29), keyed by the device's architecture string as Metal reports
it (`applegpu_g<gen><class>`; devices/*.yaml carry it): class g = base chips, s = Max chips and
at least the M2 and M4 Pro, d = Ultra.

API (frozen; the `mlxkernels` branch launches these in the emulator):

    qmm_dispatch(M, N, K, bits, group_size, dtype, device, mlx_version=None, batch=1) -> Choice
    decode_attention_dispatch(B, Hq, Hkv, S, D, dtype, device, mlx_version=None) -> Choice
    prefill_attention_dispatch(B, Hq, Hkv, L, D, dtype, device, mlx_version=None,
                               prefix=0, causal=True, mask=None) -> Choice

Our families' jobs reach these through their MLX op (Family.mlx_jobs; kernels/timing/mlx_jobs.py
keys the three by op: "matmul", "decode", "prefill"): nothing here knows our families.

A `Choice` holds one `Launch` per kernel MLX encodes, in order (a second one for the 2-pass
attention reduction and the split-K accumulation). A `Launch` names the kernel exactly as the
`[[host_name]]` in mlx.metallib spells it, its template arguments in declaration order, the grid
in threadgroups (MLX uses dispatch_threadgroups) or in threads (`grid_unit == "threads"`, MLX's
dispatch_threads), the threadgroup size, the function constants (index, name, value) and what is
bound at each buffer index (arrays and set_bytes scalars alike, by MLX's own argument names).

Where to read each rule: `SOURCES` pins MLX's source per version range. MLX 0.32.2 to 0.32.4 are
newer than every readable tag: their rules come from the newest readable source (main after
v0.32.1) plus what the 0.32.2-0.32.4 wheels themselves show: kernel names in mlx.metallib, kernel
signatures in the headers, and host functions disassembled from 0.32.4's libmlx.dylib: qmv()
(partial rows), sdpa_vector_2pass() (the GQA pass 1 for G 8/12/16) and qmm_splitk() (the float
partials' sum), while its get_qmv_batch_limit table, decode routing (2-pass from 1,024 keys on
Max/Ultra, from 4,096 with GQA), 2-pass block table and steel tile for head dims up to 128 were
checked there to be main's. A `Choice.notes` entry says so wherever a value rests on that reading.
Only affine quantization and transposed weights (as mlx-lm's quantized layers call it) are
ported. On generation 17+ (M5) MLX runs its NAX kernels for qmm and steel attention
(`is_nax_available()` in quantized.cpp's qmm and scaled_dot_product_attention.cpp): those are
refused there; its vector kernels (qmv, qmv_wide, sdpa_vector, 2-pass) are chosen by the same rules
on every generation, and are ported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from metalforge.devices import get as get_device
from metalforge.errors import MetalforgeError
from metalforge.intmath import cdiv
from metalforge.kernels import dtypes

# The source each version range was ported from: (first version, last version, commit, note).
SOURCES = (
    ((0, 29, 0), (0, 30, 3), "8ce49cd39e3063811c47024a7a3bcb907cd6fa64", "v0.29.0"),
    ((0, 30, 4), (0, 30, 5), "2f324cc3b200700b422db4811ae3ff8bd5bf48b4", "v0.30.4"),
    ((0, 30, 6), (0, 31, 1), "185b06d9efc1c869540eccfb5baff853fff3659d", "v0.30.6"),
    ((0, 31, 2), (0, 31, 99), "68cf2fddd8de5edd8ab3d926391772b2e2cedad8", "v0.31.2"),
    ((0, 32, 0), (0, 32, 0), "7a1d4f5c12ac82f4b4d0a6e71538d89ca0605247", "v0.32.0"),
    ((0, 32, 1), (0, 32, 1), "3a6219917e4535575ce5bce2fc2ba27a483a709b", "v0.32.1"),
    ((0, 32, 2), (0, 32, 99), "846d176227a0ac13d2667e58d2bb68b322109ab0",
     "main after v0.32.1, with 0.32.3/0.32.4 changes read from their wheels"),
)

# ---- version-dependent rules, as data: the first version each one holds from ----
AFFINE_BITS = (((0, 29, 0), (2, 3, 4, 5, 6, 8)), ((0, 32, 4), (1, 2, 3, 4, 5, 6, 8)))  # instantiated
AFFINE_GROUP_SIZES = (32, 64, 128)
QMV_K_ALIGN_FROM_BITS = (0, 32, 1)   # qmv_fast's K step derived from bits (PR 3965); 512 before
QMV_PARTIAL_ROWS = (0, 32, 4)        # qmv_fast serves N % 8 != 0 (`_pr_1`); names gain _pr/_hgs/_r
QMV_WIDE = (0, 32, 0)                # affine qmv_wide for 2 <= M < vector limit on gen >= 15
QMM_SPLITK = (0, 31, 2)              # few-tile qmm goes split-K (PR 3120)
QMM_SPLITK_ACCUM = (0, 32, 4)        # split-K partials summed by steel_gemm_splitk_accum
SDPA_2PASS_ON_MAX = (0, 30, 4)       # 's' devices go 2-pass from 1,024 keys; block table (PR 3023)
SDPA_2PASS_BLOCKS_AS_BYTES = (0, 30, 6)  # pass 2 takes `blocks` as bytes, not a constant
SDPA_SINKS = (0, 30, 0)              # function constants has_sinks (25 / 302)
SDPA_VECTOR_GQA_LIMIT = (0, 30, 4)   # vector kernels need query length x GQA <= 32
SDPA_GQA_KERNEL = (0, 32, 2)         # sdpa_vector_2pass_1_gqa (G = 8)
SDPA_GQA_KERNEL_G = (0, 32, 3)       # ... spelt _gqa_<G>, for G in 8, 12, 16
STEEL_BV_NAME = (0, 32, 3)           # steel_attention names carry _bv<V>
STEEL_SAVE_LSE = (0, 32, 4)          # steel_attention gains function constant save_lse (303)
STEEL_HEAD_DIMS = (((0, 29, 0), (64, 80, 128)), ((0, 32, 1), (64, 72, 80, 96, 128)))
VECTOR_HEAD_DIMS = (64, 96, 128, 256)   # query = value head dim, every version (192 runs unfused)
# From 0.32.3 MLX fuses more head dims (steel bd192/bd256 with wn 2, D 96/V 64, D 512) under rules
# read from no source: other head dims are refused as unported there, not as unfused.
OTHER_HEAD_DIMS_UNPORTED = (0, 32, 3)

# The tiles of MLX's kernels, the same in every ported version (threadgroups as (x, y, z) threads).
QMV_TILE = {"rows": 8, "threadgroup": (32, 2, 1)}                  # 2 SIMD-groups x 4 output rows
QMV_QUAD_TILE = {"k": (64, 128), "rows": 64, "threadgroup": (32, 1, 1)}
QMV_WIDE_TILE = {"max_vectors": 5, "k_lanes": 8, "rows": 8, "threadgroup": (32, 2, 1)}
QMM_TILE = {"bm": 32, "bn": 32, "bk": 32, "threadgroup": (32, 2, 2)}   # wn = wm = 2
QMM_SPLITK_TARGET = 512                                             # threadgroups split-K aims at
SDPA_VECTOR_THREADS = 1024                                          # sdpa_vector, 2-pass reduction
SDPA_2PASS_KEYS = (((0, 29, 0), 1), ((0, 32, 4), 4))   # keys a pass-1 SIMD-group loads before scoring (TK)
SDPA_2PASS_BEFORE_0304 = {"blocks": 32, "threadgroup": (256, 1, 1)}
STEEL_TILE = {"bq": 32, "bk": 32, "bk_from_d128": 16, "wm": 4, "wn": 1}

# get_qmv_batch_limit(K, N): the M at which qmv gives way to qmm, per version (the table changed
# in 0.32.1, PR 3791). Rows: (first gen, last gen, class test, limits for K and N <= 2048, <= 4096,
# larger); class test "d" = Ultra only, "not d", or "any"; the first match wins.
BATCH_LIMITS = (
    ((0, 29, 0), (
        (13, 14, "d", (32, 18, 12)), (13, 14, "any", (14, 10, 6)),
        (15, 99, "d", (32, 18, 12)), (15, 99, "any", (18, 12, 10)))),
    ((0, 32, 1), (
        (17, 99, "not d", (33, 25, 13)), (15, 99, "not d", (13, 15, 13)),
        (13, 99, "d", (32, 18, 12)), (13, 99, "any", (14, 10, 6)))),
)

# sdpa_vector_2pass block counts from 0.30.4, per device class: (class, rule rows) where a row is
# (min query simdgroups, max query simdgroups, first N, last N, blocks); the first match wins.
TWO_PASS_BLOCKS = {
    "s": ((5, 999, 1025, 8192, 128), (5, 999, 8193, 32768, 256), (5, 999, 32769, 65536, 512),
          (5, 999, 65537, 1 << 40, 1024), (0, 999, 0, 1 << 40, 64)),
    "d": ((0, 2, 8193, 1 << 40, 256), (6, 999, 16384, 65535, 512), (6, 999, 65536, 1 << 40, 1024),
          (0, 999, 0, 1 << 40, 128)),
    "g": ((4, 999, 0, 1 << 40, 64), (0, 999, 0, 1 << 40, 32)),
}
# The G x head-dim pairs the duplication-free GQA pass 1 is instantiated for, and its heads per
# SIMD-group (template argument HPT): main's scaled_dot_product_attention.metal for G = 8, the
# 0.32.3/0.32.4 metallib's mangled names for G = 12 and 16.
GQA_KERNEL_HPT = {(8, 64): 8, (8, 128): 4, (12, 128): 4, (16, 128): 2}
GQA_KERNEL_MIN_KEYS = 8192


@dataclass(frozen=True)
class Launch:
    """One kernel MLX encodes: enough to look it up in mlx.metallib and dispatch it."""
    kernel: str                       # host name, e.g. affine_qmv_fast_float16_t_gs_64_b_4_batch_0
    function: str                     # the [[kernel]] template it instantiates
    template: tuple                   # ((name, value), ...) in declaration order; defaults left out
    grid: tuple                       # (x, y, z) in threadgroups, or threads if grid_unit says so
    threadgroup: tuple                # (x, y, z) threads
    constants: tuple = ()             # ((index, name, value), ...) Metal function constants
    buffers: tuple = ()               # ((index, name), ...) what MLX binds at each buffer index
    grid_unit: str = "threadgroups"


@dataclass(frozen=True)
class Choice:
    """MLX's choice for one job: its launches in encoding order, and where the rules came from."""
    job: str                          # MLX's kernel family: qmv, qmm, sdpa_vector, steel_attention
    mlx_version: str
    architecture: str
    launches: tuple
    source: str                       # the MLX commit the rules were ported from
    notes: tuple = field(default=())  # values that rest on inference, said so

    @property
    def kernel(self) -> str:
        return self.launches[0].kernel


# ---------------------------------------------------------------------------- inputs

def parse_version(version) -> tuple:
    """(major, minor, patch) of an MLX version string; the installed MLX when None."""
    if version is None:
        import mlx.core as mx
        version = mx.__version__
    if isinstance(version, tuple):
        return version
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", str(version))
    if not m:
        raise MetalforgeError(f"MLX version '{version}' is not of the form X.Y.Z")
    v = tuple(int(x) for x in m.groups())
    if v < SOURCES[0][0] or v > SOURCES[-1][1]:
        raise MetalforgeError(
            f"MLX {version}'s dispatch rules are not ported; ported versions: 0.29.0 to 0.32.x")
    return v


def _source(v) -> str:
    return next(commit for lo, hi, commit, _ in SOURCES if lo <= v <= hi)


def architecture(device) -> tuple[int, str, str]:
    """(generation, class letter, architecture string) of a device profile, name or arch string."""
    is_arch = isinstance(device, str) and device.startswith("applegpu_")
    arch = device if is_arch else get_device(device).architecture
    m = re.fullmatch(r"applegpu_g(\d+)([a-z])", arch)
    if not m:
        raise MetalforgeError(f"architecture '{arch}' is not of the form applegpu_g<gen><class>")
    return int(m.group(1)), m.group(2), arch


NAX_FROM_GEN = 17


def _refuse_nax(gen: int, arch: str, what: str):
    if gen >= NAX_FROM_GEN:
        raise MetalforgeError(f"{arch}: MLX runs its NAX {what} kernel on generation {NAX_FROM_GEN} and later; "
                              "its dispatch rules are not ported")


def _type_string(dtype) -> str:
    """MLX's get_type_string (quantized and sdpa_vector kernel names)."""
    return dtypes.get(dtype).metal.replace("half", "float16_t")


def _type_name(dtype) -> str:
    """MLX's type_to_name (steel kernel names)."""
    return dtypes.get(dtype).name


def _version_str(v) -> str:
    return ".".join(map(str, v))


# ---------------------------------------------------------------------------- quantized matmul

def qmv_batch_limit(K: int, N: int, gen: int, cls: str, v) -> int:
    """MLX's get_qmv_batch_limit: the M from which qmm replaces the mat-vec kernels."""
    table = [rows for since, rows in BATCH_LIMITS if v >= since][-1]
    size = 0 if K <= 2048 and N <= 2048 else 1 if K <= 4096 and N <= 4096 else 2
    for first, last, test, limits in table:
        if first <= gen <= last and (test == "any" or (cls == "d") == (test == "d")):
            return limits[size]
    raise MetalforgeError(f"no qmv batch limit for generation {gen}")


def qmv_values_per_thread(bits: int) -> int:
    """K values each lane of qmv / qmv_fast takes a step: pack_factor * packs_per_thread."""
    pack_factor = 8 if bits in (3, 5) else 4 if bits == 6 else 32 // bits
    return pack_factor * (1 if bits == 2 else 2)


def qmv_fast_k_alignment(bits: int, v) -> int:
    """The K multiple qmv_fast needs: its K step, a SIMD-group's 32 lanes of values."""
    if v < QMV_K_ALIGN_FROM_BITS:
        return 512
    return qmv_values_per_thread(bits) * 32


def _quant_buffers(*extra) -> tuple:
    names = ("w", "scales", "biases", "x", "y", "K", "N") + extra
    return tuple(enumerate(names))


def _batch_buffers(first: int) -> tuple:
    names = ("x_batch_ndims", "x_shape", "x_strides", "w_batch_ndims", "w_shape", "w_strides",
             "s_strides", "b_strides")
    return tuple((first + i, n) for i, n in enumerate(names))


def qmm_dispatch(M: int, N: int, K: int, bits: int, group_size: int, dtype, device,
                 mlx_version=None, batch: int = 1) -> Choice:
    """MLX's kernels for y = x @ dequantize(w).T with x (batch, M, K) and w (N, K) affine-quantized."""
    v = parse_version(mlx_version)
    gen, cls, arch = architecture(device)
    bits_ok = [b for since, b in AFFINE_BITS if v >= since][-1]
    if bits not in bits_ok or group_size not in AFFINE_GROUP_SIZES:
        raise MetalforgeError(f"MLX {_version_str(v)} has affine kernels for bits {', '.join(map(str, bits_ok))} "
                              f"and group sizes {', '.join(map(str, AFFINE_GROUP_SIZES))}; got bits={bits}, "
                              f"group_size={group_size}")
    if min(M, N, K, batch) < 1 or K % group_size:
        raise MetalforgeError(f"M={M}, N={N}, K={K} must be positive and K a multiple of group_size={group_size}")
    t = _type_string(dtype)
    notes = []
    common = (("T", t), ("group_size", group_size), ("bits", bits))
    batched = batch > 1
    head = f"{t}_gs_{group_size}_b_{bits}"
    vector_limit = qmv_batch_limit(K, N, gen, cls, v)
    if M >= vector_limit:
        _refuse_nax(gen, arch, "qmm")
        if batch == 1 and v >= QMM_SPLITK:
            split = _qmm_splitk(M, N, K, group_size, dtype, common, head, v, notes)
            if split:
                return Choice("qmm", _version_str(v), arch, split, _source(v), tuple(notes))
        aligned = N % 32 == 0
        launch = Launch(
            f"affine_qmm_t_{head}_alN_{str(aligned).lower()}_batch_{int(batched)}", "affine_qmm_t",
            common + (("aligned_N", aligned), ("batched", batched)),
            (cdiv(N, QMM_TILE["bn"]), cdiv(M, QMM_TILE["bm"]), batch), QMM_TILE["threadgroup"], (),
            _quant_buffers("M") + (_batch_buffers(8) if batched else ()))
        return Choice("qmm", _version_str(v), arch, (launch,), _source(v), tuple(notes))
    if K in QMV_QUAD_TILE["k"] and bits in (1, 2, 4, 8):
        launch = Launch(
            f"affine_qmv_quad_{head}_d_{K}_batch_{int(batched)}", "affine_qmv_quad",
            common + (("D", K), ("batched", batched)), (M, cdiv(N, QMV_QUAD_TILE["rows"]), batch),
            QMV_QUAD_TILE["threadgroup"], (),
            _quant_buffers() + (_batch_buffers(7) if batched else ()))
        return Choice("qmv", _version_str(v), arch, (launch,), _source(v), tuple(notes))
    if M >= 2 and v >= QMV_WIDE and gen >= 15:
        nv = cdiv(M, cdiv(M, QMV_WIDE_TILE["max_vectors"]))   # fewest tiles, then the smallest that fills them
        kl = QMV_WIDE_TILE["k_lanes"]
        launch = Launch(
            f"affine_qmv_wide_{head}_nv_{nv}_kl_{kl}_batch_{int(batched)}", "affine_qmv_wide",
            common + (("vecs_per_tg", nv), ("k_lanes", kl), ("batched", batched)),
            (cdiv(M, nv), cdiv(N, QMV_WIDE_TILE["rows"]), batch), QMV_WIDE_TILE["threadgroup"], (),
            _quant_buffers("M") + (_batch_buffers(8) if batched else ()))
        return Choice("qmv", _version_str(v), arch, (launch,), _source(v), tuple(notes))
    k_aligned = K % qmv_fast_k_alignment(bits, v) == 0
    if v >= QMV_PARTIAL_ROWS:
        fast, partial = k_aligned, k_aligned and N % 8 != 0
        notes.append("0.32.4's qmv rule (fast = K aligned; partial rows when N % 8 != 0) read from "
                     "the disassembled qmv() of its libmlx.dylib")
        suffix = f"_batch_{int(batched)}_pr_{int(partial)}_hgs_0_r_4"
        extra = (("partial_rows", partial), ("has_global_scale", False), ("results_per_simdgroup", 4))
    else:
        fast, partial = k_aligned and N % 8 == 0, False
        suffix, extra = f"_batch_{int(batched)}", ()
    name = "affine_qmv_fast" if fast else "affine_qmv"
    launch = Launch(f"{name}_{head}{suffix}", name, common + (("batched", batched),) + extra,
                    (M, cdiv(N, QMV_TILE["rows"]), batch), QMV_TILE["threadgroup"], (),
                    _quant_buffers() + (_batch_buffers(7) if batched else ()))
    return Choice("qmv", _version_str(v), arch, (launch,), _source(v), tuple(notes))


def _qmm_splitk(M, N, K, group_size, dtype, common, head, v, notes):
    """qmm_splitk's launches, or None where it falls back to qmm (split_k <= 1)."""
    n_tiles, m_tiles = cdiv(N, QMM_TILE["bn"]), cdiv(M, QMM_TILE["bm"])
    k_align = max(group_size, 32)        # whole quantization groups and whole 32-wide K tiles
    split_k = min(max(1, QMM_SPLITK_TARGET // (n_tiles * m_tiles)), K // k_align)
    while split_k > 1 and K % (split_k * k_align):
        split_k -= 1
    if split_k <= 1:
        return None
    aligned = N % 32 == 0
    main = Launch(
        f"affine_qmm_t_splitk_{head}_alN_{str(aligned).lower()}", "affine_qmm_t_splitk",
        common + (("aligned_N", aligned),), (n_tiles, m_tiles, split_k), QMM_TILE["threadgroup"], (),
        _quant_buffers("M", "k_partition_size", "split_k_partition_stride"))
    return (main, _splitk_sum(M, N, split_k, dtype, v, notes))


def _splitk_sum(M, N, split_k, dtype, v, notes) -> Launch:
    """The kernel that sums the split_k partials (split_k, M, N) into y (M, N)."""
    if v >= QMM_SPLITK_ACCUM:
        notes.append("0.32.4 sums split-K partials with steel_gemm_splitk_accum over float32 partials (its header's "
                     "affine_qmm_t_splitk writes float); dispatch_threads over (N, M, 1) with get_block_dims(N, M, 1), "
                     "as its disassembled qmm_splitk() does")
        bx, by, _ = block_dims(N, M)
        return Launch(f"steel_gemm_splitk_accum_{_type_name(dtype)}_float32", "gemm_splitk_accum",
                      (("AccT", "float"), ("OutT", dtypes.get(dtype).metal)), (N, M, 1), (bx, by, 1),
                      (), ((0, "C_split"), (1, "D"), (2, "k_partitions"), (3, "partition_stride"),
                           (4, "ldd")), grid_unit="threads")
    # strided_reduce_general_dispatch (reduce.cpp) over axis 0 of the row-contiguous partials:
    # reduction size split_k, stride M * N, one output block.
    template = (("T", dtypes.get(dtype).metal), ("U", dtypes.get(dtype).metal), ("Op", "Sum"), ("IdxT", "int"),
                ("NDIMS", 1))
    buffers = ((0, "in"), (1, "out"), (2, "reduction_size"), (3, "reduction_stride"), (4, "shape"),
               (5, "strides"), (6, "ndim"), (7, "reduce_shape"), (8, "reduce_strides"), (9, "reduce_ndim"),
               (10, "non_col_reductions"))
    if split_k < 32:   # strided_reduce_small
        blocks = cdiv(M * N, 4)
        tx = min(blocks, 32)
        ty = min(8, 1024 // tx, split_k)
        notes.append("col_reduce_small's threadgroup assumes the pipeline's 1,024-thread maximum")
        return Launch(f"col_reduce_small_1_reduce_sum{_type_name(dtype)}", "col_reduce_small", template,
                      (cdiv(blocks, tx), 1, 1), (tx, ty, 1), (), buffers)
    if split_k > 256 and M * N // 32 < 1024:
        raise MetalforgeError(f"MLX {_version_str(v)} sums {split_k} split-K partials with col_reduce_2pass, "
                              "whose dispatch is not ported")
    # strided_reduce_looped: 8 SIMD-groups per threadgroup, BM x BN = 32 x 32 tiles, threads dispatched
    return Launch(f"col_reduce_looped_1_32_32_reduce_sum{_type_name(dtype)}", "col_reduce_looped",
                  template + (("BM", 32), ("BN", 32)), (256 * cdiv(M * N, 32), 1, 1), (256, 1, 1), (), buffers,
                  grid_unit="threads")


def block_dims(dim0: int, dim1: int, dim2: int = 1, pow2: int = 10) -> tuple:
    """MLX's get_block_dims_common: powers of two per axis, 2**pow2 threads at most."""
    pows, total = [0, 0, 0], 0
    while True:
        before = total
        for i, dim in enumerate((dim0, dim1, dim2)):
            if dim >= 1 << (pows[i] + 1):
                pows[i] += 1
                total += 1
            if total == 10:
                return tuple(1 << p for p in pows)
        if total == before or total == pow2:
            return tuple(1 << p for p in pows)


# ---------------------------------------------------------------------------- attention

def _vector_constants(v, blocks=None) -> tuple:
    out = [(20, "has_mask", False), (21, "query_transposed", False), (22, "do_causal", False),
           (23, "bool_mask", False), (24, "float_mask", False)]
    if v >= SDPA_SINKS:
        out.append((25, "has_sinks", False))
    if blocks is not None and v >= SDPA_2PASS_ON_MAX:
        out.append((26, "blocks", blocks))
    return tuple(out)


def decode_attention_dispatch(B: int, Hq: int, Hkv: int, S: int, D: int, dtype, device,
                              mlx_version=None) -> Choice:
    """MLX's kernels for one query token per head over a contiguous (B, Hkv, S, D) cache, no mask."""
    v = parse_version(mlx_version)
    gen, cls, arch = architecture(device)
    if min(B, Hq, Hkv, S) < 1 or Hq % Hkv:
        raise MetalforgeError(f"B={B}, Hq={Hq}, Hkv={Hkv}, S={S}: all positive and Hq a multiple of Hkv")
    if D not in VECTOR_HEAD_DIMS:
        raise _head_dim_error("decode", D, VECTOR_HEAD_DIMS, v)
    G = Hq // Hkv
    if v >= SDPA_VECTOR_GQA_LIMIT and G > 32:
        raise MetalforgeError(f"MLX's vector attention needs query length x GQA factor <= 32, got {G}; "
                              "it runs unfused ops")
    t = _type_string(dtype)
    big = cls in ("d", "s") if v >= SDPA_2PASS_ON_MAX else cls == "d"
    notes = []
    if not ((big and S >= 1024) or (Hkv < Hq and S >= 4096)):
        launch = Launch(f"sdpa_vector_{t}_{D}_{D}", "sdpa_vector", (("T", t), ("D", D), ("V", D)),
                        (B * Hq, 1, 1), (SDPA_VECTOR_THREADS, 1, 1), _vector_constants(v),
                        ((0, "queries"), (1, "keys"), (2, "values"), (3, "out"), (4, "gqa_factor"),
                         (5, "N"), (6, "k_head_stride"), (7, "k_seq_stride"), (8, "v_head_stride"),
                         (9, "v_seq_stride"), (10, "scale")))
        return Choice("sdpa_vector", _version_str(v), arch, (launch,), _source(v))
    buffers = ((0, "queries"), (1, "keys"), (2, "values"), (3, "out"), (4, "sums"), (5, "maxs"))
    if v < SDPA_2PASS_ON_MAX:
        blocks = SDPA_2PASS_BEFORE_0304["blocks"]
        first = Launch(f"sdpa_vector_2pass_1_{t}_{D}_{D}", "sdpa_vector_2pass_1",
                       (("T", t), ("D", D), ("V", D)), (B * Hq, 1, blocks), SDPA_2PASS_BEFORE_0304["threadgroup"],
                       _vector_constants(v), buffers + ((6, "gqa_factor"),) + _two_pass_tail())
    else:
        blocks = two_pass_blocks(cls, G, S)
        name, function, template = f"sdpa_vector_2pass_1_{t}_{D}_{D}", "sdpa_vector_2pass_1", \
            (("T", t), ("D", D), ("V", D))
        # the duplication-free GQA pass 1: G = 8 from 0.32.2 (spelt _gqa), G = 8, 12, 16 from 0.32.3 (_gqa_<G>)
        spelt_g = v >= SDPA_GQA_KERNEL_G
        if v >= SDPA_GQA_KERNEL and (G, D) in GQA_KERNEL_HPT and (spelt_g or G == 8) and S >= GQA_KERNEL_MIN_KEYS:
            tag = f"_gqa_{G}" if spelt_g else "_gqa"
            name, function = f"sdpa_vector_2pass_1{tag}_{t}_{D}_{D}", "sdpa_vector_2pass_1_gqa"
            template = template + (("G", G), ("HPT", GQA_KERNEL_HPT[(G, D)]))
            if spelt_g:
                notes.append("0.32.3+ GQA pass-1 rule (G in 8/12/16, N >= 8192) read from the "
                             "disassembled sdpa_vector_2pass of 0.32.4's libmlx.dylib; HPT from its metallib")
        first = Launch(name, function, template, (Hkv, B, blocks), (32, G, 1),
                       _vector_constants(v, blocks), buffers + _two_pass_tail())
    second_constants = ((26, "blocks", blocks),) if SDPA_2PASS_ON_MAX <= v < SDPA_2PASS_BLOCKS_AS_BYTES else ()
    second_buffers = ((0, "partials"), (1, "sums"), (2, "maxs"), (3, "out"))
    if v >= SDPA_2PASS_BLOCKS_AS_BYTES:
        second_buffers += ((4, "blocks"),)
    second = Launch(f"sdpa_vector_2pass_2_{t}_{D}", "sdpa_vector_2pass_2", (("T", t), ("D", D)),
                    (B * Hq, 1, 1), (SDPA_VECTOR_THREADS, 1, 1), second_constants, second_buffers)
    return Choice("sdpa_vector", _version_str(v), arch, (first, second), _source(v), tuple(notes))


def _head_dim_error(job: str, D: int, fused: tuple, v) -> MetalforgeError:
    listed = ", ".join(map(str, fused))
    if v >= OTHER_HEAD_DIMS_UNPORTED:
        return MetalforgeError(f"MLX {_version_str(v)}'s {job} attention rules for head dim {D} are not ported "
                               f"(ported: {listed})")
    return MetalforgeError(f"MLX {_version_str(v)} has no fused {job} attention for head dim {D} "
                           f"(fused: {listed}); it runs unfused ops")


def _two_pass_tail() -> tuple:
    return ((7, "N"), (8, "k_head_stride"), (9, "k_seq_stride"), (10, "v_head_stride"),
            (11, "v_seq_stride"), (12, "scale"))


def two_pass_blocks(cls: str, gqa: int, N: int) -> int:
    """sdpa_vector_2pass's block count (0.30.4+), query length 1 so query simdgroups = GQA factor."""
    for low, high, first, last, blocks in TWO_PASS_BLOCKS.get(cls, TWO_PASS_BLOCKS["g"]):
        if low <= gqa <= high and first <= N <= last:
            return blocks
    raise AssertionError("the block table's last row matches everything")


def prefill_attention_dispatch(B: int, Hq: int, Hkv: int, L: int, D: int, dtype, device,
                               mlx_version=None, prefix: int = 0, causal: bool = True,
                               mask=None) -> Choice:
    """MLX's steel_attention for L queries over prefix + L keys (mask: None, 'bool' or 'float')."""
    v = parse_version(mlx_version)
    gen, cls, arch = architecture(device)
    _refuse_nax(gen, arch, "steel attention")
    if min(B, Hq, Hkv, L) < 1 or Hq % Hkv or prefix < 0:
        raise MetalforgeError(f"B={B}, Hq={Hq}, Hkv={Hkv}, L={L}: all positive, Hq a multiple of Hkv")
    if L <= 8:
        raise MetalforgeError(f"L={L}: MLX runs up to 8 queries with its vector kernels, not steel_attention")
    head_dims = [dims for since, dims in STEEL_HEAD_DIMS if v >= since][-1]
    if D not in head_dims:
        raise _head_dim_error("prefill", D, head_dims, v)
    if mask not in (None, "bool", "float"):
        raise MetalforgeError(f"mask '{mask}' is not one of None, 'bool', 'float'")
    kL = prefix + L
    bq, wm, wn = STEEL_TILE["bq"], STEEL_TILE["wm"], STEEL_TILE["wn"]
    bk = STEEL_TILE["bk"] if D < 128 else STEEL_TILE["bk_from_d128"]
    t = _type_name(dtype)
    mask_name = "bool_" if mask == "bool" else t
    bv = f"_bv{D}" if v >= STEEL_BV_NAME else ""
    name = f"steel_attention_{t}_bq{bq}_bk{bk}_bd{D}{bv}_wm{wm}_wn{wn}_mask{mask_name}"
    constants = [(200, "align_Q", L % bq == 0), (201, "align_K", kL % bk == 0),
                 (300, "has_mask", mask is not None), (301, "do_causal", bool(causal))]
    if v >= SDPA_SINKS:
        constants.append((302, "has_sinks", False))
    if v >= STEEL_SAVE_LSE:
        constants.append((303, "save_lse", False))
    buffers = ((0, "Q"), (1, "K"), (2, "V"), (3, "O"), (4, "params"))
    if mask is not None:
        buffers += ((5, "mask_params"), (6, "mask"))
    notes = ("0.32.3+ names (with _bv) and 0.32.4's save_lse constant (set false: no logsumexp "
             "output in inference) from their wheels; rules of main after v0.32.1",) if v >= STEEL_BV_NAME else ()
    launch = Launch(name, "attention",
                    (("T", dtypes.get(dtype).metal), ("BQ", bq), ("BK", bk), ("BD", D))
                    + ((("BV", D),) if v >= STEEL_BV_NAME else ()) + (("WM", wm),
                     ("WN", wn), ("MaskType", "bool" if mask == "bool" else dtypes.get(dtype).metal)),
                    (cdiv(L, bq), Hq, B), (32, wm, wn), tuple(constants), buffers)
    return Choice("steel_attention", _version_str(v), arch, (launch,), _source(v), notes)
