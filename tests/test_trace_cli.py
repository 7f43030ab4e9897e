"""`metalforge trace`: ours next to MLX's real kernel for the same job, chosen as MLX's host code
chooses it for the device, with counters that follow from each dispatch's geometry."""
import json
import math

import pytest

from metalforge.cli import main

pytestmark = pytest.mark.usefixtures("mlx_kernel_headers")


def _trace(capsys, *argv):
    assert main(["trace", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _threads(dispatch):
    return math.prod(dispatch["threadgroups"]) * math.prod(dispatch["threadgroup"])


@pytest.mark.parametrize("device,kernels", [
    # scaled_dot_product_attention.cpp: 2-pass from 1,024 keys on Max ('s') and Ultra ('d') chips,
    # 64 blocks on a Max at 4 query heads per KV head; one pass on a base M3
    ("m3-max-40", ["sdpa_vector_2pass_1_float16_t_64_64", "sdpa_vector_2pass_2_float16_t_64"]),
    ("m3", ["sdpa_vector_float16_t_64_64"]),
])
def test_decode_attention_against_the_mlx_kernel_the_chip_runs(capsys, device, kernels):
    data = _trace(capsys, "decode_attention", "--device", device, "--shape", "B=1,Hq=4,Hkv=1,S=1024,D=64")
    assert set(data) >= {"ours", "mlx"}
    assert [d["kernel"] for d in data["mlx"]] == kernels
    if len(kernels) == 2:
        assert data["mlx"][0]["threadgroups"] == [1, 1, 64] and data["mlx"][0]["threadgroup"] == [32, 4, 1]
    for side in ("ours", "mlx"):
        for d in data[side]:
            c = d["counters"]
            assert c["threads"] == _threads(d) and c["threadgroups"] == math.prod(d["threadgroups"])
        # each side reads every key and every value once: 1,024 x 64 half values each
        reads = {n: b for d in data[side] for n, b in d["counters"]["device"].items()}
        assert reads["keys"]["footprint_bytes"] == reads["values"]["footprint_bytes"] == 1024 * 64 * 2


@pytest.mark.parametrize("device,shape,kernel", [
    ("m3", "M=1,N=64,K=512", "affine_qmv_fast_float16_t_gs_64_b_4_batch_0_pr_0_hgs_0_r_4"),   # K % 512 == 0
    ("m3", "M=1,N=64,K=320", "affine_qmv_float16_t_gs_64_b_4_batch_0_pr_0_hgs_0_r_4"),
    ("m3", "M=3,N=64,K=512", "affine_qmv_wide_float16_t_gs_64_b_4_nv_3_kl_8_batch_0"),       # M >= 2 from M3
    ("m2", "M=3,N=64,K=512", "affine_qmv_fast_float16_t_gs_64_b_4_batch_0_pr_0_hgs_0_r_4"),
    ("m2", "M=1,N=64,K=128", "affine_qmv_quad_float16_t_gs_64_b_4_d_128_batch_0"),            # K of 64 or 128
])
def test_qmv_against_the_mlx_kernel_quantized_cpp_picks(capsys, device, shape, kernel):
    data = _trace(capsys, "qmv", "--device", device, "--shape", shape + ",bits=4,group_size=64")
    assert [d["kernel"] for d in data["mlx"]] == [kernel]
    mlx = data["mlx"][0]["counters"]
    assert mlx["threads"] == _threads(data["mlx"][0])
    N, K = (int(f.split("=")[1]) for f in shape.split(",")[1:])
    # the packed weights are read whole, once: N x K 4-bit values
    assert mlx["device"]["w"]["footprint_bytes"] == N * K // 2
    assert data["ours"][0]["counters"]["device"]["w"]["footprint_bytes"] == N * K // 2


def test_the_table_puts_ours_and_mlx_side_by_side(capsys):
    assert main(["trace", "prefill_attention", "--device", "m3-max-40", "--shape", "B=1,Hq=2,Hkv=1,L=40,D=64,prefix=8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "prefill_attention B=1,Hq=2,Hkv=1,L=40,D=64,prefix=8 float16 on m3-max-40"
    assert "  mlx  steel_attention_float16_bq32_bk32_bd64_bv64_wm4_wn1_maskfloat16: [2, 2, 1] threadgroups of [32, 4, 1]" in out
    header = next(i for i, line in enumerate(out) if line.split()[:3] == ["counter", "ours", "mlx"])
    rows = {line[:26].strip(): line[26:].split() for line in out[header + 1:]}
    assert rows["threads"][1] == "512" and int(rows["matrix_multiplies"][1].replace(",", "")) > 0


def test_a_fused_family_against_the_mlx_kernels_mlx_lm_runs_for_its_products(capsys):
    """gate_up's job as mlx-lm runs it: two quantized products (the gate's, the up's), each reading
    its whole weight once, as ours reads both; the paged decode pool traced as MLX reads a cache:
    contiguous."""
    data = _trace(capsys, "gate_up", "--device", "m3", "--shape", "M=1,N=64,K=512,bits=4,group_size=64")
    kernel = "affine_qmv_fast_float16_t_gs_64_b_4_batch_0_pr_0_hgs_0_r_4"
    assert [d["kernel"] for d in data["mlx"]] == [kernel, kernel]
    assert [d["counters"]["device"]["w"]["footprint_bytes"] for d in data["mlx"]] == [64 * 512 // 2] * 2
    ours = data["ours"][0]["counters"]["device"]
    assert ours["w_gate"]["footprint_bytes"] == ours["w_up"]["footprint_bytes"] == 64 * 512 // 2
    data = _trace(capsys, "decode_attention", "--device", "m3", "--shape", "B=1,Hq=4,Hkv=1,S=1024,D=64,block_size=16")
    assert [d["kernel"] for d in data["mlx"]] == ["sdpa_vector_float16_t_64_64"]
    reads = data["mlx"][0]["counters"]["device"]
    assert reads["keys"]["footprint_bytes"] == reads["values"]["footprint_bytes"] == 1024 * 64 * 2
