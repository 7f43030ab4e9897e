"""Trace mode's counters, each pinned by a kernel whose counts are worked out by hand."""
import math

import mlx.core as mx
import numpy as np
import pytest

from metalforge.emulator.library import Library
from metalforge.kernels import mlx_library

COPY = """
[[kernel]] void copy(const device float* in [[buffer(0)]], device float* out [[buffer(1)]],
                     const constant uint& stride [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  out[i] = in[i * stride];
}
"""


def _copy(stride):
    fn = Library(COPY, mode="traced").function("copy")
    x = np.arange(256 * stride, dtype=np.float32)
    out = np.zeros(256, np.float32)
    fn(buffers={0: x, 1: out, 2: stride}, threadgroups=(2, 1, 1), threadgroup=(128, 1, 1))
    assert np.array_equal(out, x[::stride])
    return fn.last_trace


def test_a_coalesced_copy_touches_one_128_byte_line_per_simdgroup_access():
    t = _copy(1)
    assert (t.threads, t.threadgroups, t.barriers, t.simd_functions) == (256, 2, 0, 0)
    for name in ("in", "out"):
        b = t.device[name]
        # 8 SIMD-groups, one access each; 32 lanes x 4 bytes = 128 contiguous, aligned bytes
        assert (b.accesses, b.instructions, b.footprint_bytes) == (256, 8, 1024)
        assert b.sectors == {32: 8 * 4, 64: 8 * 2, 128: 8 * 1}


def test_a_strided_read_touches_a_sector_per_lane():
    t = _copy(8)
    b = t.device["in"]
    # lanes 32 bytes apart: 32 sectors of 32 bytes, 16 of 64, 8 of 128 per access; 4 bytes of each 32 used
    assert (b.accesses, b.instructions, b.footprint_bytes) == (256, 8, 1024)
    assert b.sectors == {32: 8 * 32, 64: 8 * 16, 128: 8 * 8}
    assert t.device["out"].sectors == {32: 32, 64: 16, 128: 8}


TRANSPOSE = """
[[kernel]] void transpose(const device float* in [[buffer(0)]], device float* out [[buffer(1)]],
                          uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float tile[32][WIDTH];
  for (uint r = 0; r < 8; r++) {
    tile[sg * 8 + r][lane] = in[(sg * 8 + r) * 32 + lane];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[sg * 32 + lane] = tile[lane][sg];
}
"""


@pytest.mark.parametrize("width,conflicts", [(32, 4 * 31), (33, 0)])
def test_a_transposed_threadgroup_read_has_the_bank_conflicts_of_its_layout(width, conflicts):
    fn = Library(TRANSPOSE.replace("WIDTH", str(width)), mode="traced").function("transpose")
    x = np.arange(1024, dtype=np.float32)
    out = np.zeros(128, np.float32)
    fn(buffers={0: x, 1: out}, threadgroups=(1, 1, 1), threadgroup=(128, 1, 1))
    assert np.array_equal(out, x.reshape(32, 32)[:, :4].T.reshape(-1))
    t = fn.last_trace
    assert (t.threadgroup_memory_bytes, t.barriers) == (32 * width * 4, 1)
    # 4 SIMD-groups: 8 row writes each (lanes on consecutive words: no conflict), one column read
    # each: with 32 floats a row every lane's word is in bank sg (32 words, one bank: 31 extra
    # passes); with 33 the words spread over all 32 banks
    assert (t.threadgroup_accesses, t.threadgroup_instructions) == (4 * 32 * 9, 4 * 9)
    assert t.bank_conflicts == conflicts


MMA = """
[[kernel]] void mma(const device float* a [[buffer(0)]], const device float* b [[buffer(1)]], device float* c [[buffer(2)]],
                    uint sg [[simdgroup_index_in_threadgroup]]) {
  simdgroup_float8x8 A, B, C = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  simdgroup_load(A, a + sg * 64, 8);
  simdgroup_load(B, b, 8);
  threadgroup_barrier(mem_flags::mem_none);
  for (int k = 0; k < 3; k++) {
    simdgroup_barrier(mem_flags::mem_none);
    simdgroup_multiply_accumulate(C, A, B, C);
  }
  threadgroup_barrier(mem_flags::mem_none);
  float s = simd_sum(1.0f);
  simdgroup_store(C, c + sg * 64, 8);
  if (s != 32.0f) c[0] = -1.0f;
}
"""


def test_barriers_matrix_operations_and_simd_functions_are_counted_per_simdgroup():
    fn = Library(MMA, mode="traced").function("mma")
    a = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
    b = np.eye(8, dtype=np.float32)
    c = np.zeros((2, 8, 8), np.float32)
    fn(buffers={0: a, 1: b, 2: c}, threadgroups=(1, 1, 1), threadgroup=(64, 1, 1))
    assert np.allclose(c, 3 * a)
    t = fn.last_trace
    # 2 SIMD-groups x (2 loads, 3 multiply-accumulates, 1 store, 1 simd_sum, 3 fences); 2 barriers;
    # a simdgroup_barrier fence is counted apart from the functions that exchange lanes' data
    assert (t.matrix_loads, t.matrix_multiplies, t.matrix_stores) == (4, 6, 2)
    assert (t.barriers, t.simd_functions, t.simd_fences) == (2, 2, 6)
    # a matrix load is one operation, not 64 element reads per lane: from device memory each lane
    # reads its 2 elements, as a store writes them (b's one tile shared by both SIMD-groups)
    assert (t.device["a"].accesses, t.device["a"].footprint_bytes) == (128, 512)
    assert (t.device["b"].accesses, t.device["b"].footprint_bytes) == (128, 256)
    assert (t.device["c"].accesses, t.device["c"].footprint_bytes) == (128, 512)


LONG = """
[[kernel]] void long_sum(const device float* in [[buffer(0)]], device float* out [[buffer(1)]],
                         uint t [[thread_index_in_threadgroup]]) {
  float s = 0.0f;
  for (uint i = 0; i < 4; i++) {
    for (uint j = 0; j < 1024; j++) s += in[(i * 1024 + j) * 1024 + t];
    threadgroup_barrier(mem_flags::mem_none);
  }
  out[t] = s;
}
"""


def test_a_dispatch_of_millions_of_accesses_is_counted_exactly():
    """4M reads in one threadgroup: counted as they go (the runtime keeps counts, not events), also
    part-way through the threadgroup, where its lanes wait at a barrier."""
    fn = Library(LONG, mode="traced").function("long_sum")
    x = np.ones((4096, 1024), np.float32)
    out = np.zeros(1024, np.float32)
    fn(buffers={0: x, 1: out}, threadgroups=(1, 1, 1), threadgroup=(1024, 1, 1))
    assert np.all(out == 4096)
    t = fn.last_trace
    assert (t.threads, t.barriers) == (1024, 4)
    b = t.device["in"]
    # 4,096 reads a lane, 32 lanes' floats side by side: one 128-byte line (4 sectors of 32 B) per instruction
    assert (b.accesses, b.instructions, b.footprint_bytes) == (4096 * 1024, 4096 * 32, 4096 * 1024 * 4)
    assert b.sectors == {32: 4096 * 32 * 4, 64: 4096 * 32 * 2, 128: 4096 * 32}


HELPER = """
float read_at(threadgroup float* tile, uint i) { return tile[i]; }

[[kernel]] void strided(const device float* in [[buffer(0)]], device float* out [[buffer(1)]],
                        uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float tile[32 * 33];
  for (uint k = 0; k < 33; k++) tile[k * 32 + lane] = in[k * 32 + lane];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[lane] = read_at(tile, lane * STRIDE);
}
"""


@pytest.mark.parametrize("stride,conflicts", [(1, 0), (2, 1), (32, 31), (33, 0)])
def test_threadgroup_reads_through_a_helpers_pointer_are_counted_with_their_conflicts(stride, conflicts):
    fn = Library(HELPER.replace("STRIDE", str(stride)), mode="traced").function("strided")
    x = np.arange(32 * 33, dtype=np.float32)
    out = np.zeros(32, np.float32)
    fn(buffers={0: x, 1: out}, threadgroups=(1, 1, 1), threadgroup=(32, 1, 1))
    assert np.array_equal(out, x[np.arange(32) * stride])
    t = fn.last_trace
    # 33 conflict-free row writes into the array, then one read through the helper's pointer: lane l
    # reads word l * stride, in bank (l * stride) % 32; stride 2 puts two words in each of 16 banks
    assert (t.threadgroup_accesses, t.threadgroup_instructions) == (33 * 32 + 32, 34)
    assert t.bank_conflicts == conflicts


@pytest.mark.usefixtures("mlx_kernel_headers")
def test_mlx_qmm_and_its_split_k_trace_the_same_tiles():
    """MLX's affine_qmm_t and affine_qmm_t_splitk (steel's loaders and MMA tiles, threadgroup memory
    through helpers' pointers) traced at M=33 N=72 K=1024, the split-K case of test_mlx_kernels.py."""
    M, N, K, gs, bits, split = 33, 72, 1024, 64, 4, 16
    mx.random.seed(3)
    x = mx.random.normal((M, K)).astype(mx.float16)
    w, s, b = mx.quantize(mx.random.normal((N, K)).astype(mx.float16), group_size=gs, bits=bits)
    ref = np.array(mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=bits), np.float32)
    whole, parts = [], []
    for y in (mlx_library.qmm_t(x, w, s, b, group_size=gs, bits=bits, traces=whole),
              mlx_library.qmm_t_splitk(x, w, s, b, group_size=gs, bits=bits, split_k=split, traces=parts)):
        assert np.allclose(np.array(y, np.float32), ref, atol=1.0, rtol=1e-2)
    (one,), (split_t, accum) = [d.trace for d in whole], [d.trace for d in parts]
    tiles = math.ceil(N / 32) * math.ceil(M / 32)          # 32 x 32 output tiles, 4 SIMD-groups of 16 x 16 each
    assert (one.threadgroups, split_t.threadgroups) == (tiles, tiles * split)
    # a SIMD-group's 16 x 16 of a 32-deep K block: 2 x 2 fragments x 4 steps of 8 = 16 multiply-accumulates
    assert one.matrix_multiplies == split_t.matrix_multiplies == tiles * 4 * (K // 32) * 16
    # two barriers a K block, and one more
    assert (one.barriers, split_t.barriers) == (2 * K // 32 + 1, 2 * K // split // 32 + 1)
    # the same tiles staged through threadgroup memory, however K is cut
    assert one.threadgroup_accesses == split_t.threadgroup_accesses > 0
    assert one.threadgroup_instructions == split_t.threadgroup_instructions > 0
    for t in (one, split_t):
        assert t.device["w"].footprint_bytes == N * K * bits // 8 and t.device["x"].footprint_bytes == M * K * 2
    assert one.device["y"].footprint_bytes == M * N * 2
    assert split_t.device["y"].footprint_bytes == split * M * N * 4   # float partials, one slab a partition
    # steel_gemm_splitk_accum: a thread an output reads its split partials, no threadgroup memory
    assert accum.threads == M * N and accum.device["C_split"].footprint_bytes == split * M * N * 4
    assert accum.device["D"].footprint_bytes == M * N * 2 and accum.threadgroup_instructions == 0
