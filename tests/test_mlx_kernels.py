"""MLX's real Metal kernels (from the mlx-metal wheel, fetched with pip) run in the emulator and
match MLX's own CPU ops: quantized mat-vec and mat-mat, decode and prefill attention, in the
dtypes MLX instantiates, at shapes with tails."""
import math

import mlx.core as mx
import numpy as np
import pytest

from metalforge.errors import MetalforgeError
from metalforge.kernels import mlx_dispatch, mlx_headers, mlx_library

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# The reference is MLX's CPU ops in float32 on the same (rounded) inputs: MLX's CPU
# quantized_matmul accumulates bfloat16 in bfloat16 (7.4 off at a scale of 113 at K = 1024, where
# MLX's Metal kernel is 0.47 off), so it would not tell a right kernel from a wrong one.
# |kernel - reference| <= TOL * max |reference|: float32 sums in another order, float16 and
# bfloat16 also round the output (2^-11 and 2^-8 of it).
TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}


pytestmark = pytest.mark.usefixtures("mlx_kernel_headers")


def _close(out, ref, dtype):
    out, ref = np.array(out.astype(mx.float32)), np.array(ref.astype(mx.float32))
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    err = np.max(np.abs(out - ref))
    assert err <= TOL[dtype] * np.max(np.abs(ref)), f"max error {err} at scale {np.max(np.abs(ref))}"


def _quantized(M, N, K, dtype, group_size, bits, seed):
    mx.random.seed(seed)
    x = mx.random.normal((M, K)).astype(dtype)
    w, scales, biases = mx.quantize(mx.random.normal((N, K)).astype(dtype), group_size=group_size, bits=bits)
    f32 = lambda a: a.astype(mx.float32)
    ref = mx.quantized_matmul(f32(x), w, f32(scales), f32(biases), transpose=True, group_size=group_size, bits=bits)
    return x, w, scales, biases, ref


# (M, N, K, group size, bits): qmv_fast needs N % 8 == 0 and K % 512 (4-bit) / 256 (8-bit) == 0
QMV_FAST = [(1, 64, 512, 64, 4), (1, 40, 256, 32, 8)]
QMV = [(1, 70, 320, 64, 4), (1, 13, 192, 32, 8)]          # tails: N % 8 != 0, K off the fast step
QMV_WIDE = [(3, 44, 256, 64, 4), (7, 24, 384, 128, 4)]     # M = 3: one tile of 3; M = 7: two tiles of 4
QMM_T = [(40, 70, 256, 64, 4), (33, 64, 128, 32, 8)]       # partial row and column tiles, unaligned N


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QMV_FAST + QMV, ids=str)
def test_qmv_matches_quantized_matmul(shape, dtype):
    M, N, K, gs, bits = shape
    fast = mlx_library.qmv_fast_applies(N, K, bits)
    assert fast == (shape in QMV_FAST)
    x, w, s, b, ref = _quantized(M, N, K, dtype, gs, bits, seed=N)
    _close(mlx_library.qmv(x, w, s, b, group_size=gs, bits=bits, fast=fast), ref, dtype)


QMV_QUAD = [(1, 100, 128, 64, 4), (2, 64, 64, 32, 8)]       # K = 128 and 64; a row tail


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("runner,shape", [*(("qmv_quad", s) for s in QMV_QUAD), *(("qmv_wide", s) for s in QMV_WIDE),
                                          *(("qmm_t", s) for s in QMM_T)], ids=str)
def test_quad_wide_and_qmm_t_match_quantized_matmul(runner, shape, dtype):
    M, N, K, gs, bits = shape
    x, w, s, b, ref = _quantized(M, N, K, dtype, gs, bits, seed=M + N + K)
    _close(getattr(mlx_library, runner)(x, w, s, b, group_size=gs, bits=bits), ref, dtype)


# (M, N, K, group size, bits, split_k MLX's qmm_splitk takes on an M3 Max at 0.32.4): ~512 threadgroups
# of 32 x 32 tiles, at most K / max(group size, 32) partitions, lowered until they divide K
QMM_SPLITK = [
    (33, 72, 1024, 64, 4, 16),   # 512 // (3 x 2 tiles) = 85, capped at K / 64 = 16
    (40, 2040, 256, 64, 4, 4),   # 512 // 128 tiles: M and N tails (N unaligned), one group a partition
    (20, 5470, 128, 64, 4, 2),   # 512 // 171 tiles, N unaligned
    (20, 2000, 640, 64, 4, 5),   # 512 // 63 = 8, but K = 10 groups: 8, 7 and 6 do not divide it
    (16, 1000, 768, 128, 8, 6),  # 8 bits, groups of 128: 512 // 32 = 16, capped at K / 128 = 6
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QMM_SPLITK, ids=str)
def test_qmm_split_k_and_its_accumulation_match_quantized_matmul(shape, dtype):
    """affine_qmm_t_splitk's float partials summed by steel_gemm_splitk_accum, as MLX's rules launch them."""
    M, N, K, gs, bits, split_k = shape
    choice = mlx_dispatch.qmm_dispatch(M, N, K, bits, gs, "float16", "m3-max-40")
    main, accum = choice.launches
    assert (main.function, main.grid[2], accum.function) == ("affine_qmm_t_splitk", split_k, "gemm_splitk_accum")
    x, w, s, b, ref = _quantized(M, N, K, dtype, gs, bits, seed=split_k)
    traces = []
    _close(mlx_library.run(choice, dict(x=x, w=w, scales=s, biases=b), traces=traces), ref, dtype)
    # the partials go through device memory: the accumulation reads every partition's slab once
    first, second = traces
    assert first.trace.device["y"].footprint_bytes == split_k * M * N * 4
    assert second.kernel == accum.kernel.replace("float16", {mx.float32: "float32", mx.float16: "float16",
                                                            mx.bfloat16: "bfloat16"}[dtype], 1)
    assert second.trace.device["C_split"].footprint_bytes == split_k * M * N * 4
    assert second.trace.threads == M * N


def test_qmm_split_k_refuses_partitions_mlx_never_takes():
    x, w, s, b, _ = _quantized(16, 64, 384, mx.float16, 64, 4, seed=0)
    with pytest.raises(MetalforgeError, match="cannot cut K=384 in 4 partitions"):
        mlx_library.qmm_t_splitk(x, w, s, b, group_size=64, bits=4, split_k=4)


def _attention(B, H, Hk, qL, kL, D, dtype, causal, seed):
    mx.random.seed(seed)
    q = mx.random.normal((B, H, qL, D)).astype(dtype)
    k = mx.random.normal((B, Hk, kL, D)).astype(dtype)
    v = mx.random.normal((B, Hk, kL, D)).astype(dtype)
    scale = 1 / math.sqrt(D)
    f32 = lambda a: a.astype(mx.float32)
    ref = mx.fast.scaled_dot_product_attention(f32(q), f32(k), f32(v), scale=scale, mask="causal" if causal else None)
    return q, k, v, scale, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 2, 1, 100, 64), (2, 2, 1, 1, 45, 128)], ids=str)
def test_sdpa_vector_matches_mlx_attention(shape, dtype):
    q, k, v, scale, ref = _attention(*shape, dtype, causal=False, seed=shape[4])
    _close(mlx_library.sdpa_vector(q, k, v, scale=scale), ref, dtype)


TWO_PASS = [((1, 4, 1, 1, 77, 128), 32), ((1, 8, 2, 1, 130, 64), 64)]   # blocks as MLX picks them per chip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,blocks", TWO_PASS, ids=str)
def test_sdpa_vector_2pass_matches_mlx_attention(shape, blocks, dtype):
    q, k, v, scale, ref = _attention(*shape, dtype, causal=False, seed=blocks)
    _close(mlx_library.sdpa_vector_2pass(q, k, v, scale=scale, blocks=blocks), ref, dtype)


# MLX's GQA pass 1 (0.32.2+): (G, HPT) as mlx_dispatch.GQA_KERNEL_HPT has them, blocks a multiple of 32 as
# MLX picks them (pass 2 merges 32 a SIMD group); keys not a whole number of blocks nor of sub-chunks
TWO_PASS_GQA = [((1, 16, 2, 1, 150, 64), 32, (8, 8)), ((1, 12, 1, 1, 301, 128), 32, (12, 4)),
                ((1, 16, 1, 1, 777, 128), 64, (16, 2))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,blocks,gqa", TWO_PASS_GQA, ids=str)
def test_sdpa_vector_2pass_gqa_matches_mlx_attention(shape, blocks, gqa, dtype):
    q, k, v, scale, ref = _attention(*shape, dtype, causal=False, seed=blocks)
    _close(mlx_library.sdpa_vector_2pass(q, k, v, scale=scale, blocks=blocks, gqa=gqa), ref, dtype)


# causal prefill: square (no prefix) and with a prefix of cached keys (kL > qL); tails in both
STEEL = [(1, 2, 2, 40, 40, 64), (1, 2, 1, 20, 52, 64), (1, 1, 1, 33, 50, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", STEEL, ids=str)
def test_steel_attention_causal_matches_mlx_attention(shape, dtype):
    q, k, v, scale, ref = _attention(*shape, dtype, causal=True, seed=shape[3])
    _close(mlx_library.steel_attention(q, k, v, scale=scale, do_causal=True), ref, dtype)


def test_the_host_names_are_kernels_mlx_compiles():
    """Every host name the runners instantiate is a function of MLX's own metallib (same version):
    the instantiations written here are MLX's, not look-alikes."""
    for run in (lambda: test_qmv_matches_quantized_matmul(QMV_FAST[0], mx.float16),
                lambda: test_qmm_split_k_and_its_accumulation_match_quantized_matmul(QMM_SPLITK[0], mx.bfloat16),
                lambda: test_sdpa_vector_2pass_matches_mlx_attention(*TWO_PASS[0], mx.float32),
                lambda: test_sdpa_vector_2pass_gqa_matches_mlx_attention(*TWO_PASS_GQA[1], mx.float16),
                lambda: test_steel_attention_causal_matches_mlx_attention(STEEL[2], mx.bfloat16)):
        run()
    names = mlx_headers.metallib_names()
    run = mlx_library.host_names_run()
    assert len(run) >= 5
    assert [n for n in run if n not in names] == []
