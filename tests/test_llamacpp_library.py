"""llama.cpp's matrix-vector kernel (ggml-metal's kernel_mul_mv_q4_0_f32, from llama-cpp-python's
sdist) run in the emulator as ggml-metal's host code runs it, against numpy."""
import numpy as np
import pytest

from metalforge.errors import MetalforgeError
from metalforge.kernels import llamacpp_library as L


def test_q4_0_blocks_follow_ggmls_layout():
    """One block by hand: the largest magnitude -16 gives d = 2, q = trunc(v / 2 + 8.5) capped at
    15; value j in byte j's low nibble, value j + 16 in its high nibble."""
    w = np.zeros((1, 32), np.float32)
    w[0, 0], w[0, 1], w[0, 16], w[0, 31] = -16.0, 3.0, 14.0, 6.0
    b = L.quantize_q4_0(w)
    assert b.shape == (1, 18) and b[0, :2].view(np.float16)[0] == 2.0
    assert b[0, 2] == 0 | (15 << 4)        # q(-16) = 0, q(14) = trunc(15.5) = 15
    assert b[0, 3] == 10 | (8 << 4)        # q(3) = trunc(10) = 10 (reads back 4), q(0) = 8
    assert b[0, 17] == 8 | (11 << 4)       # q(6) = trunc(11.5) = 11
    assert np.array_equal(L.dequantize_q4_0(b, 32)[0, [0, 1, 16, 31]], [-16, 4, 14, 6])


def test_the_host_side_is_ggml_metals(llamacpp_sources):
    """kernel_mul_mv_q4_0_f32: N_SG_Q4_0 = 2 SIMD-groups of N_R0_Q4_0 = 4 rows (ggml-metal-impl.h),
    ceil(N / 8) threadgroups across, one per row of x; row strides in bytes of 18-byte blocks."""
    d = L.dispatch("q4_0", 3, 20, 256)
    assert d["threadgroups"] == (3, 3, 1) and d["threadgroup"] == (32, 2, 1)
    assert (int(d["args"]["nb01"]), int(d["args"]["nr0"]), int(d["args"]["ne11"])) == (8 * 18, 4, 3)
    assert d["constants"][600] == 2 and d["constants"][605] is False
    with pytest.raises(MetalforgeError, match="K = 100 is not a multiple of q4_0's block of 32 values"):
        L.dispatch("q4_0", 1, 8, 100)


@pytest.mark.parametrize("M,N,K", [(1, 24, 256), (2, 20, 512)])
def test_mul_mv_q4_0_matches_numpy(llamacpp_sources, M, N, K):
    """N not a multiple of the 8 rows a threadgroup takes: the last threadgroup's spare rows are
    not written."""
    rng = np.random.default_rng(M * N + K)
    blocks = L.quantize_q4_0(rng.standard_normal((N, K)).astype(np.float32))
    x = rng.standard_normal((M, K)).astype(np.float32)
    y, _ = L.run_mul_mv("q4_0", blocks, x, N)
    reference = x.astype(np.float64) @ L.dequantize_q4_0(blocks, K).T.astype(np.float64)
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_a_traced_run_reads_each_weight_block_once(llamacpp_sources):
    """Traced (checked pointers through ggml's block members): the weights' footprint is exactly
    the N x K / 32 blocks of 18 bytes, x's its K floats, y's its N floats, at the proxy shape and
    scaled to a larger one (traces.scaled)."""
    for N, K in ((64, 128), (1024, 4096)):
        (c,) = L.counted("q4_0", {"M": 1, "N": N, "K": K})
        assert c.kernel == "kernel_mul_mv_q4_0_f32" and c.threadgroup == (32, 2, 1)
        assert (c.features["dram_bytes/src0"], c.features["dram_bytes/src1"], c.features["dram_bytes/dst"]) == \
            pytest.approx((N * K // 32 * 18, 4 * K, 4 * N))
        assert c.features["threadgroups"] == pytest.approx(N / 8)
