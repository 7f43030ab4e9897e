"""MLX's op as mlx-lm calls it is the baseline (issue 21 item 6): causal prefill through
mask="causal", decode over a contiguous cache through mx.fast.scaled_dot_product_attention (a paged
pool gathered to each sequence's own cache first), each agreeing with the family's fp32 reference;
and the kernels MLX runs for the job are recorded."""
import numpy as np
import pytest

from metalforge import devices
from metalforge.kernels import get_family


@pytest.mark.parametrize("shape", ["B=1,Hq=4,Hkv=2,L=40,D=64", "B=2,Hq=4,Hkv=1,L=24,D=64,prefix=40"])
def test_prefill_baseline_is_causal_sdpa_and_matches_the_reference(shape):
    fam = get_family("prefill_attention")
    s = fam.shape(shape)
    inputs = fam.make_inputs(s, "float32", 0)
    got = fam.baseline(s, "float32", fam.baseline_inputs(s, "float32", inputs))
    np.testing.assert_allclose(np.array(got), np.array(fam.reference(s, "float32", inputs)), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", ["B=2,Hq=4,Hkv=2,S=48,D=64", "B=3,Hq=4,Hkv=1,S=100,D=64,block_size=16"])
def test_decode_baseline_reads_a_contiguous_cache_and_matches_the_reference(shape):
    fam = get_family("decode_attention")
    s = fam.shape(shape)
    inputs = fam.make_inputs(s, "float32", 0)
    prepared = fam.baseline_inputs(s, "float32", inputs)
    if s.block_size:
        assert [k.shape for k, _ in prepared["caches"]] == [(s.Hkv, int(n), s.D) for n in np.array(inputs["seq_lens"])]
    got = fam.baseline(s, "float32", prepared)
    np.testing.assert_allclose(np.array(got), np.array(fam.reference(s, "float32", inputs)), atol=2e-5, rtol=2e-5)


def test_the_mlx_kernel_run_is_named_by_mlx_rules():
    fam = get_family("decode_attention")
    s = fam.shape("B=1,Hq=32,Hkv=8,S=4096,D=128")
    assert fam.mlx_kernels(s, "float16", devices.get("m3-max-40")).startswith("sdpa_vector_2pass_1")
    assert fam.mlx_kernels(s, "float16", devices.get("m3")).startswith("sdpa_vector_2pass_1")   # GQA from 4,096 keys
    qmv = get_family("qmv")
    assert qmv.mlx_kernels(qmv.shape("M=1,N=4096,K=4096"), "float16", devices.get("m3")).startswith("affine_qmv_fast")
