"""llama.cpp's flash attention (ggml-metal's `kernel_flash_attn_ext_vec_*` for a few queries and
`kernel_flash_attn_ext_*` with SIMD-group matrices for many) run in the emulator as ggml-metal's
host code runs them: ggml_metal_op_flash_attn_ext (ggml-metal-ops.cpp) and the pipeline getters of
ggml-metal-device.cpp of llama-cpp-python's sdist (kernels/llamacpp_library.py fetches it). One
op is up to three launches: the pad kernel when the keys are not a multiple of the kernel's block
(the last block copied, zero-filled, with the mask padded at -inf), the mask's block map before the
matrix kernel, the attention kernel, and the vec kernel's reduction of its 32 workgroups. Bound:
f16 K/V (the quantized caches' dequantize pass and the sparse path are not), no ALiBi, sinks or
softcap. The kernels run bounds-checked with the emulator's lanes in lockstep (see `execute`).

    out, launches = run(q, k, v, mask, device)   # q (B, Hq, L, D) float32, k/v (B, Hkv, S, D) float16,
                                         # mask (B, L, S) float16 or None -> out (B, Hq, L, D)

Tensors are laid out as test-backend-ops' FLASH_ATTN_EXT builds them: q [D, L, Hq, B] float32,
K/V [D, S, Hkv, B], the mask [S, L, 1, B] float16 and the result [D, Hq, L, B] float32 (ggml's
innermost axis first). Which vec configuration runs (queries per threadgroup Q, head elements
per thread NE) is ggml-metal-tuning.cpp's table for the chip's GPU family, read from the sdist.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from metalforge.emulator.errors import EmulatorError
from metalforge.emulator.trace import Dispatch
from metalforge.errors import MetalforgeError
from metalforge.kernels import llamacpp_library as sources

VEC_SOURCE = {"f16": "fa_vec_f16.metal"}     # the vec kernels per K/V type bound so far
MATRIX_SOURCE = {"f16": "fa_f16.metal"}
AUX_SOURCE = "fa_aux.metal"                  # pad, block map, vec reduction
VEC_WORKGROUPS = 32                          # nwg of the non-sparse vec path (ggml_metal_op_flash_attn_ext)
VEC_MAX_QUERIES = 20                         # ggml_metal_op_flash_attn_ext_use_vec: ne01 < 20 ...
DTYPES = {"float16": "f16"}                  # our dtype names -> ggml's K/V type names


def _i32(*names):
    return [(n, "<i4") for n in names]


def _u64(*names):
    return [(n, "<u8") for n in names]


# ggml-metal-impl.h's argument structs
_ATTN_FIELDS = (_i32("ne01", "ne02", "ne03") + _u64("nb01", "nb02", "nb03") + _i32("ne11", "ne_12_2", "ne_12_3", "ns10")
                + _u64("nb11", "nb12", "nb13") + _i32("ns20") + _u64("nb21", "nb22", "nb23") + _i32("ne31", "ne32", "ne33")
                + _u64("nb31", "nb32", "nb33") + _i32("ne1", "ne2", "ne3") + [(n, "<f4") for n in ("scale", "max_bias", "m0", "m1")]
                + _i32("n_head_log2") + [("logit_softcap", "<f4")])
ARGS_ATTN = np.dtype(_ATTN_FIELDS, align=True)                                   # ggml_metal_kargs_flash_attn_ext
ARGS_VEC = np.dtype(_ATTN_FIELDS + _i32("n_kv_max_padded"), align=True)         # ..._flash_attn_ext_vec
ARGS_PAD = np.dtype(_i32("ne11", "ne_12_2", "ne_12_3") + _u64("nb11", "nb12", "nb13", "nb21", "nb22", "nb23")
                    + _i32("ne31", "ne32", "ne33") + _u64("nb31", "nb32", "nb33"), align=True)
ARGS_BLK = np.dtype(_i32("ne01", "ne30", "ne31", "ne32", "ne33") + _u64("nb31", "nb32", "nb33"), align=True)
ARGS_REDUCE = np.dtype(_i32("nrows"), align=True)


def _pack(dtype: np.dtype, **values) -> np.ndarray:
    args = np.zeros((), dtype)
    for name, value in values.items():
        args[name] = value
    return args


def _pad(x: int, n: int) -> int:
    return -(-x // n) * n


@dataclass(frozen=True)
class Shape:
    """An attention op in our field names: B batches of Hq query heads over Hkv K/V heads, L query
    rows against S keys, head size D (K and V alike), K/V of ggml type `kv`, with or without a mask."""
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    D: int
    kv: str = "f16"
    mask: bool = True

    def __post_init__(self):
        if min(self.B, self.Hq, self.Hkv, self.L, self.S, self.D) < 1:
            raise MetalforgeError(f"attention sizes must be positive, got {self}")
        if self.Hq % self.Hkv:
            raise MetalforgeError(f"Hq = {self.Hq} is not a multiple of Hkv = {self.Hkv}")
        if self.kv not in VEC_SOURCE:
            raise MetalforgeError(f"llama.cpp K/V type {self.kv!r} is not bound (bound: {', '.join(VEC_SOURCE)})")
        if self.D % 4:
            raise MetalforgeError(f"head size D = {self.D} is not a multiple of 4 (ggml-metal asserts ne00 % 4 == 0)")

    @property
    def vec(self) -> bool:
        """ggml_metal_op_flash_attn_ext_use_vec: few queries and a head size of whole SIMD-groups."""
        return self.L < VEC_MAX_QUERIES and self.D % 32 == 0

    def strides(self) -> dict:
        """ggml's byte strides (nb) of contiguous q, K/V and mask as test-backend-ops allocates them."""
        kv = 2 * self.D
        return dict(nb01=4 * self.D, nb02=4 * self.D * self.L, nb03=4 * self.D * self.L * self.Hq,
                    nb11=kv, nb12=kv * self.S, nb13=kv * self.S * self.Hkv,
                    nb31=2 * self.S, nb32=2 * self.S * self.L, nb33=2 * self.S * self.L)


@dataclass
class Launch:
    """One kernel dispatch as the encoder sets it: the source file, host name, argument bytes,
    function constants, threadgroup memory, grid in threadgroups, and the buffer at each index."""
    source: str
    host_name: str
    args: np.ndarray
    constants: dict
    threadgroups: tuple
    threadgroup: tuple
    buffers: dict = field(default_factory=dict)      # index -> tensor name ("q", "k", "v", "mask", "pad", ...)
    threadgroup_memory: dict = field(default_factory=dict)


# ---- ggml-metal-tuning.cpp: the vec configuration per GPU family -----------------------------------
_ROW = re.compile(r"\{\s*\{\s*(\d+),\s*GGML_TYPE_(\w+),\s*(\d+),\s*(\d+),\s*(-?\d+),\s*(\d+)\s*\},\s*\{\s*(\d+),\s*(\d+)\s*\}\s*\}")
_BASELINE = re.compile(r"if \(dk == (\d+) && dv == (\d+)\) \{\s*return (\d+);")


@lru_cache(maxsize=1)
def _tuning() -> tuple[dict, dict, list, list]:
    """(tuned table {(family, type, dk, dv, ne11 bucket, ne01 bucket): (Q, NE)}, baseline NE by (dk, dv),
    the KV-length bucket edges, the query-row bucket edges), parsed from ggml-metal-tuning.{cpp,h}."""
    root = sources.include_root()
    cpp, h = (root / "ggml-metal-tuning.cpp").read_text(), (root / "ggml-metal-tuning.h").read_text()
    table = {(int(f), t.lower(), int(dk), int(dv), int(b11), int(b01)): (int(q), int(ne))
             for f, t, dk, dv, b11, b01, q, ne in _ROW.findall(cpp)}
    baseline = {(int(dk), int(dv)): int(ne) for dk, dv, ne in _BASELINE.findall(cpp)}

    def edges(name):
        m = re.search(rf"{name}\[\]\s*=\s*\{{([^}}]*)\}}", h)
        if m is None:
            raise MetalforgeError(f"ggml-metal-tuning.h of llama-cpp-python {sources.VERSION} defines no {name}")
        return [int(x) for x in m.group(1).split(",")]
    if not table or not baseline:
        raise MetalforgeError(f"ggml-metal-tuning.cpp of llama-cpp-python {sources.VERSION}: no fa_vec table read")
    return table, baseline, edges("FA_VEC_NE11_BUCKETS"), edges("FA_VEC_NE01_BUCKETS")


def _bucket(x: int, edges: list) -> int:
    return next((i for i, e in enumerate(edges) if x < e), len(edges))


def baseline_ne(dk: int, dv: int) -> int:
    return _tuning()[1].get((dk, dv), 4)       # fa_vec_baseline_ne: 4, the template's default, elsewhere


def gpu_family(device) -> int:
    """The MTLGPUFamilyApple<n> ggml-metal reads (M1 7, M2 8, M3 and M4 9, M5 10) from our
    profile's architecture (applegpu_g13 ... g17)."""
    m = re.match(r"applegpu_g(\d+)", device.architecture)
    if m is None:
        raise MetalforgeError(f"{device.name}: architecture {device.architecture!r} names no Apple GPU generation")
    gen = int(m.group(1))
    return {13: 7, 14: 8, 15: 9, 16: 9}.get(gen, 10 if gen >= 17 else 7)


def vec_config(family: int, shape: Shape) -> tuple[int, int]:
    """ggml_metal_tuning::fa_vec_pick: (Q, NE) for the vec kernel: the baseline (Q = 1) under 1024
    keys, else the family's exact bucket, else its decode / batch default, else the baseline."""
    table, _, ne11_edges, ne01_edges = _tuning()
    baseline = (1, baseline_ne(shape.D, shape.D))
    b11 = _bucket(shape.S, ne11_edges)
    if b11 == 0:
        return baseline
    b01 = _bucket(shape.L, ne01_edges)
    key = (family, shape.kv, shape.D, shape.D)
    return table.get(key + (b11, b01)) or table.get(key + (-1, 0 if b01 == 0 else 1)) or baseline


# ---- ggml_metal_op_flash_attn_ext ------------------------------------------------------------------
def _attention_args(dtype: np.dtype, s: Shape, scale: float, **extra) -> np.ndarray:
    nb = s.strides()
    return _pack(dtype, ne01=s.L, ne02=s.Hq, ne03=s.B, nb01=nb["nb01"], nb02=nb["nb02"], nb03=nb["nb03"],
                 ne11=s.S, ne_12_2=s.Hkv, ne_12_3=s.B, ns10=s.D, nb11=nb["nb11"], nb12=nb["nb12"], nb13=nb["nb13"],
                 ns20=s.D, nb21=nb["nb11"], nb22=nb["nb12"], nb23=nb["nb13"],
                 ne31=s.L, ne32=1, ne33=s.B, nb31=nb["nb31"], nb32=nb["nb32"], nb33=nb["nb33"],
                 ne1=s.Hq, ne2=s.L, ne3=s.B, scale=scale, max_bias=0.0, m0=1.0, m1=1.0,
                 n_head_log2=1 << int(math.floor(math.log2(s.Hq))), logit_softcap=0.0, **extra)


def _pad_launch(s: Shape, ncpsg: int) -> Launch:
    """kernel_flash_attn_ext_pad: the last (S mod C) keys and values copied into the pad buffer, the
    rest of its C rows zeroed, the mask's last block copied with -inf beyond S."""
    nb = s.strides()
    args = _pack(ARGS_PAD, ne11=s.S, ne_12_2=s.Hkv, ne_12_3=s.B, nb11=nb["nb11"], nb12=nb["nb12"], nb13=nb["nb13"],
                 nb21=nb["nb11"], nb22=nb["nb12"], nb23=nb["nb13"], ne31=s.L, ne32=1, ne33=s.B,
                 nb31=nb["nb31"], nb32=nb["nb32"], nb33=nb["nb33"])
    base = sources.macro("FC_FLASH_ATTN_EXT_PAD")
    return Launch(AUX_SOURCE, "kernel_flash_attn_ext_pad", args, {base + 0: s.mask, base + 25: ncpsg},
                  (ncpsg, max(s.Hkv, 1), s.B), (32, 1, 1), {1: "k", 2: "v", 3: "mask" if s.mask else "q", 4: "pad"})


def pad_bytes(s: Shape) -> int:
    """ggml_metal_op_flash_attn_ext_extra_pad: C = NCPSG rows of K and V per head (and of the mask)."""
    nb = s.strides()
    return sources.macro("OP_FLASH_ATTN_EXT_NCPSG") * (2 * nb["nb11"] * s.Hkv * s.B + (2 * s.L * s.B if s.mask else 0))


def vec_simdgroups(S: int) -> int:
    """SIMD-groups a vec threadgroup takes: doubled (up to 4) while 32 workgroups of them would
    each see fewer than two blocks of NCPSG keys."""
    ncpsg, nsg = sources.macro("OP_FLASH_ATTN_EXT_VEC_NCPSG"), 1
    while 2 * VEC_WORKGROUPS * nsg * ncpsg < S and nsg < 4:
        nsg *= 2
    return nsg


def vec_launches(s: Shape, device, config: tuple[int, int] | None = None, scale: float | None = None,
                 nsg: int | None = None) -> list[Launch]:
    """The half4x4 (vec) branch: pad (S not a multiple of NCPSG), the vec kernel over 32
    workgroups of the keys into a temporary, and the reduction. `config` (Q, NE) overrides the
    tuning table as ggml_metal_tuning::fa_vec_set_override does; `nsg` the SIMD-groups S gives
    (a trace at fewer keys keeps the real shape's)."""
    ncpsg = sources.macro("OP_FLASH_ATTN_EXT_VEC_NCPSG")
    Q, NE = config or vec_config(gpu_family(device), s)
    launches = [_pad_launch(s, ncpsg)] if s.S % ncpsg else []
    nwg, nsg = VEC_WORKGROUPS, nsg or vec_simdgroups(s.S)
    dk_pad = dv_pad = _pad(s.D, 128)

    def smem(q):
        return _pad((dk_pad + 4 * ncpsg + 2 * dv_pad) * q * nsg * 2, 16)
    if smem(Q) > device.threadgroup_memory_bytes:
        Q, NE = 1, baseline_ne(s.D, s.D)
    suffix = "" if (Q, NE) == (1, baseline_ne(s.D, s.D)) else f"_q{Q}_ne{NE}"
    base = sources.macro("FC_FLASH_ATTN_EXT_VEC")
    constants = {base + 0: s.mask, base + 1: False, base + 2: False, base + 3: False, base + 4: s.S % ncpsg != 0,
                 base + 5: False, base + 20: s.D, base + 21: s.D, base + 22: nsg, base + 23: nwg}
    scale = 1.0 / math.sqrt(s.D) if scale is None else scale
    launches.append(Launch(VEC_SOURCE[s.kv], f"kernel_flash_attn_ext_vec_{s.kv}_dk{s.D}_dv{s.D}{suffix}",
                           _attention_args(ARGS_VEC, s, scale, n_kv_max_padded=0), constants,
                           (-(-s.L // Q), s.Hq, s.B * nwg), (32, nsg, 1),
                           {1: "q", 2: "k", 3: "v", 4: "mask" if s.mask else "q", 5: "q", 6: "pad", 7: "tmp", 8: "q"},
                           {0: smem(Q)}))
    rbase = sources.macro("FC_FLASH_ATTN_EXT_VEC_REDUCE")
    nrows = s.Hq * s.L * s.B
    launches.append(Launch(AUX_SOURCE, "kernel_flash_attn_ext_vec_reduce", _pack(ARGS_REDUCE, nrows=nrows),
                           {rbase + 0: s.D, rbase + 1: nwg}, (nrows, 1, 1), (32 * nwg, 1, 1), {1: "tmp", 2: "dst"}))
    return launches


def matrix_launches(s: Shape, device, scale: float | None = None) -> list[Launch]:
    """The half8x8 branch (many queries): pad (S not a multiple of NCPSG = 64), the mask's block
    map (which C x Q blocks are all -inf, all zero, or mixed), and the attention kernel, Q = NQPSG
    query rows a threadgroup, 4 SIMD-groups (8 from a head size of 512)."""
    nqptg, ncpsg = sources.macro("OP_FLASH_ATTN_EXT_NQPSG"), sources.macro("OP_FLASH_ATTN_EXT_NCPSG")
    launches = [_pad_launch(s, ncpsg)] if s.S % ncpsg else []
    nb = s.strides()
    if s.mask:
        bbase = sources.macro("FC_FLASH_ATTN_EXT_BLK")
        launches.append(Launch(AUX_SOURCE, "kernel_flash_attn_ext_blk",
                               _pack(ARGS_BLK, ne01=s.L, ne30=s.S, ne31=s.L, ne32=1, ne33=s.B,
                                     nb31=nb["nb31"], nb32=nb["nb32"], nb33=nb["nb33"]),
                               {bbase + 24: nqptg, bbase + 25: ncpsg},
                               (-(-s.S // ncpsg), -(-s.L // nqptg), s.B), (32, 1, 1), {1: "mask", 2: "blk"}))
    nsg = 8 if s.D >= 512 else 4
    smem = _pad(nqptg * (s.D + 2 * _pad(s.D, 64) + 4 * ncpsg) * 2, 16)
    base = sources.macro("FC_FLASH_ATTN_EXT")
    constants = {base + 0: s.mask, base + 1: False, base + 2: False, base + 3: False, base + 4: s.S % ncpsg != 0,
                 base + 10: s.mask and s.L % 8 != 0, base + 20: s.D, base + 21: s.D, base + 22: nsg}
    scale = 1.0 / math.sqrt(s.D) if scale is None else scale
    launches.append(Launch(MATRIX_SOURCE[s.kv], f"kernel_flash_attn_ext_{s.kv}_dk{s.D}_dv{s.D}",
                           _attention_args(ARGS_ATTN, s, scale), constants,
                           (-(-s.L // nqptg), s.Hq, s.B), (32, nsg, 1),
                           {1: "q", 2: "k", 3: "v", 4: "mask" if s.mask else "q", 5: "q", 6: "pad",
                            7: "blk" if s.mask else "q", 8: "dst"}, {0: smem}))
    return launches


def launches(s: Shape, device, config: tuple[int, int] | None = None, scale: float | None = None,
             nsg: int | None = None) -> list[Launch]:
    """ggml_metal_op_flash_attn_ext's dispatches for the op (the sparse and quantized-K/V paths aside)."""
    if s.vec:
        return vec_launches(s, device, config, scale, nsg)
    if config is not None:
        raise MetalforgeError(f"{s.L} query rows run the matrix kernel, which has no (Q, NE) configuration")
    return matrix_launches(s, device, scale)


def blk_bytes(s: Shape) -> int:
    """ggml_metal_op_flash_attn_ext_extra_blk: a byte per block of NCPSG keys x NQPSG query rows."""
    nq, nc = sources.macro("OP_FLASH_ATTN_EXT_NQPSG"), sources.macro("OP_FLASH_ATTN_EXT_NCPSG")
    return _pad(-(-s.S // nc) * -(-s.L // nq) * s.B, 32)


def family_fields(shape: dict) -> dict:
    """The job in the fields of our families' shapes: the vec kernel's few query rows are a decode
    step's (B, Hq, Hkv, S, D, L), the matrix kernel's many a prompt's (its keys before the
    queries a cached prefix)."""
    s = Shape(*(shape[f] for f in ("B", "Hq", "Hkv", "L", "S", "D")))
    if s.vec:
        return {"B": s.B, "Hq": s.Hq, "Hkv": s.Hkv, "S": s.S, "D": s.D, "L": s.L}
    return {"B": s.B, "Hq": s.Hq, "Hkv": s.Hkv, "L": s.L, "D": s.D, "prefix": s.S - s.L}


def _buffers(s: Shape, q, k, v, mask) -> dict:
    """The tensors in ggml's layouts, and the scratch the op's launches share (pad, block map,
    the vec kernel's per-workgroup results), each sized as ggml-metal reserves it."""
    nrows = s.Hq * s.L * s.B
    return {"q": np.ascontiguousarray(q, np.float32), "k": np.ascontiguousarray(k, np.float16),
            "v": np.ascontiguousarray(v, np.float16),
            "mask": None if mask is None else np.ascontiguousarray(mask, np.float16),
            "pad": np.zeros(max(pad_bytes(s), 16), np.uint8),
            "blk": np.zeros(blk_bytes(s), np.uint8),
            "tmp": np.zeros(nrows * VEC_WORKGROUPS * (s.D + 2), np.float32),
            "dst": np.zeros((s.B, s.L, s.Hq, s.D), np.float32)}


def execute(s: Shape, plan: list[Launch], q, k, v, mask, mode: str = "checked") -> tuple[np.ndarray, list]:
    """Run the launches in order over the tensors (ggml's layouts); (dst [B, L, Hq, D], the functions run).
    Bounds-checked (Metal does not check, and ggml's vec kernel at some tunings writes past its
    threadgroup memory: refused here, with the line), with the lanes in lockstep at threadgroup
    accesses: these kernels share threadgroup memory between a SIMD-group's lanes without
    barriers (the vec kernel's lane 0 overwrites the scores the others still read), relying on
    Metal's lanes executing together. Never race-checked: the detector would report exactly that
    sharing, and the same values written by several SIMD-groups. A traced run counts without
    lockstep (the counts do not depend on the order)."""
    bufs, functions = _buffers(s, q, k, v, mask), []
    for launch in plan:
        fn = sources.library(launch.source, mode, races=False, lockstep=mode == "checked").function(
            launch.host_name, launch.constants, launch.threadgroup_memory)
        try:
            fn(buffers={0: launch.args.tobytes(), **{i: bufs[name] for i, name in launch.buffers.items()}},
               threadgroups=launch.threadgroups, threadgroup=launch.threadgroup)
        except EmulatorError as e:
            if "out-of-bounds access to threadgroup array 'threadgroup memory'" not in str(e):
                raise
            raise MetalforgeError(f"{launch.host_name} writes past the {launch.threadgroup_memory[0]} bytes of threadgroup "
                                  f"memory ggml-metal gives it ({str(e).splitlines()[0].split(' by ')[0]}); Metal does "
                                  "not check, the emulator refuses it") from None
        functions.append(fn)
    return bufs["dst"], functions


def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, device,
        config: tuple[int, int] | None = None, scale: float | None = None):
    """softmax(scale q k^T + mask) v with q (B, Hq, L, D) float32, k and v (B, Hkv, S, D) float16
    and mask (B, L, S) float16 (or None), as ggml-metal runs FLASH_ATTN_EXT on `device`;
    returns (out (B, Hq, L, D) float32, the launches)."""
    B, Hq, L, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise MetalforgeError(f"K {k.shape} and V {v.shape} must both be (B, Hkv, S, D) for q {q.shape}")
    s = Shape(B, Hq, k.shape[1], L, k.shape[2], D, mask=mask is not None)
    if mask is not None and mask.shape != (B, L, s.S):
        raise MetalforgeError(f"mask {mask.shape} must be (B, L, S) = {(B, L, s.S)}")
    plan = launches(s, device, config, scale)
    out, _ = execute(s, plan, q, k, v, mask)
    return out.transpose(0, 2, 1, 3), plan


# ---- traced at proxy shapes -----------------------------------------------------------------------
def _split(s: Shape) -> dict:
    """The shape as the traces scale it: keys and query rows in whole blocks of the kernel (keys,
    rows) and what is left over (tail, rtail), so a proxy at 2x and 4x the blocks keeps the real
    shape's leftovers and with them the pad launch's work and the partial tiles."""
    c = sources.macro("OP_FLASH_ATTN_EXT_VEC_NCPSG" if s.vec else "OP_FLASH_ATTN_EXT_NCPSG")
    r = 1 if s.vec else sources.macro("OP_FLASH_ATTN_EXT_NQPSG")
    return {"B": s.B, "Hq": s.Hq, "Hkv": s.Hkv, "rows": s.L - s.L % r, "rtail": s.L % r,
            "keys": s.S - s.S % c, "tail": s.S % c, "D": s.D}


def _joined(sh: dict) -> Shape:
    return Shape(sh["B"], sh["Hq"], sh["Hkv"], sh["rows"] + sh["rtail"], sh["keys"] + sh["tail"], sh["D"])


def proxy(s: Shape) -> tuple[dict, tuple]:
    """(the proxy, the groups of axes scaled from it): one batch and one K/V head with its query
    heads; keys cut to one round of the kernel's blocks (the vec kernel's 32 workgroups x its
    SIMD-groups x 32 keys, so every SIMD-group loops as often; the matrix kernel's 256), the
    matrix kernel's query rows to 32 (4 threadgroups of 8)."""
    real = _split(s)
    cut = {"B": 1, "Hq": s.Hq // s.Hkv, "Hkv": 1,
           "keys": min(real["keys"], VEC_WORKGROUPS * vec_simdgroups(s.S) * 32 if s.vec else 256),
           "rows": real["rows"] if s.vec else min(real["rows"], 32)}
    groups = tuple(g for g in (("B",), ("Hq", "Hkv"), ("rows",), ("keys",)) if cut[g[0]] and real[g[0]] != cut[g[0]])
    return {**real, **cut}, groups


def counted(shape: dict, device, config: tuple[int, int] | None = None) -> list:
    """The op's dispatches at shape {B, Hq, Hkv, L, S, D} (mask on, f16 K/V, as test-backend-ops
    times it), counted from traced runs at proxy shapes scaled to the real one (kernels/timing/traces.py),
    each with the configuration, SIMD-groups and workgroups of the real shape."""
    from metalforge.kernels.timing import traces
    s = Shape(shape["B"], shape["Hq"], shape["Hkv"], shape["L"], shape["S"], shape["D"])
    Q, NE = config or (vec_config(gpu_family(device), s) if s.vec else (0, 0))
    nsg = vec_simdgroups(s.S) if s.vec else 0

    def one(sh: dict) -> list[Dispatch]:
        p = _joined(sh)
        plan = launches(p, device, (Q, NE), nsg=nsg) if p.vec else launches(p, device)
        rng = np.random.default_rng(0)
        q = rng.standard_normal((p.B, p.Hq, p.L, p.D)).astype(np.float32)
        kv = rng.standard_normal((p.B, p.Hkv, p.S, p.D)).astype(np.float16)
        _, fns = execute(p, plan, q, kv, kv, np.zeros((p.B, p.L, p.S), np.float16), "traced")
        return [Dispatch(fn.host_name, l.threadgroups, l.threadgroup, fn.last_trace) for fn, l in zip(fns, plan)]
    kind = f"vec q{Q} ne{NE} nsg{nsg}" if s.vec else "matrix"
    key = f"llama.cpp {sources.VERSION} flash_attn_ext {kind} (device matrix loads counted)"
    cut, groups = proxy(s)
    return traces.scaled(key, _split(s), cut, groups, one)
