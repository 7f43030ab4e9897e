"""The gate on modelled claims (kernels/timing/gate.py) and `metalforge compare`: the wording is
pinned, a family without kernel-level data prints no ratio, and compare prices MLX's real kernel
with our chosen config through one price (or MLX alone for a shape our family does not serve)."""
import json

import pytest

from metalforge.cli import main
from metalforge.kernels.timing import fit, gate

pytestmark = pytest.mark.usefixtures("mlx_kernel_headers")


def test_the_wording_of_a_modelled_claim():
    err = fit.family_error("qmv")
    assert err is not None      # qmv: published kernel timings on five chips
    assert gate.claim(1 + err / 2, "qmv") == f"within model error ({err:.0%})"
    assert gate.claim(1 - err / 2, "qmv") == f"within model error ({err:.0%})"
    assert gate.claim(1 + 2 * err, "qmv") == f"{1 + 2 * err:.2f}x (ours faster; model error {err:.0%})"
    assert gate.claim(0.25, "qmv") == f"0.25x (MLX faster; model error {err:.0%})"
    assert gate.evidence(1 + 2 * err, "qmv") and not gate.evidence(1 + err / 2, "qmv")
    assert not gate.evidence(0.25, "qmv")


@pytest.mark.parametrize("family", ["gate_up", "norm_qkv"])   # fused families: no published timing of a kernel like them
def test_a_family_without_kernel_data_on_two_chips_is_unvalidated(family):
    assert fit.family_error(family) is None
    words = gate.claim(3.0, family)
    assert words.startswith("unvalidated") and "x" not in words.split("(")[0] and "3.00" not in words
    assert not gate.evidence(3.0, family)


def test_compare_prices_ours_and_mlx_real_kernel(capsys):
    assert main(["compare", "decode_attention", "--device", "m3-max-40", "--shape", "B=1,Hq=4,Hkv=1,S=2048,D=64",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) >= {"ours", "mlx", "ratio", "error", "validated"}
    assert r["mlx"]["kernel"].startswith("sdpa_vector_2pass_1_float16_t_64_64")   # a Max chip at 2,048 keys
    assert r["ours"]["seconds"] > 0 and r["mlx"]["seconds"] > 0
    assert r["ratio"] == pytest.approx(r["mlx"]["seconds"] / r["ours"]["seconds"])
    # decode attention: published timings of MLX's kernels on two chips (M2 Ultra, M5 Max) validate it
    err = fit.family_error("decode_attention")
    assert r["validated"] is True and r["error"] == err and r["claim"] == gate.claim(r["ratio"], "decode_attention")
    assert main(["compare", "decode_attention", "--device", "m3-max-40", "--shape", "B=1,Hq=4,Hkv=1,S=2048,D=64"]) == 0
    text = capsys.readouterr().out
    assert f"ours vs MLX: {gate.claim(r['ratio'], 'decode_attention')}" in text and "sdpa_vector_2pass_1" in text
    # prefill attention: MLX's steel attention timed on the M3 Max and the M4 validates it
    assert main(["compare", "prefill_attention", "--device", "m3-max-40", "--shape", "B=1,Hq=4,Hkv=1,L=64,D=64",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["validated"] is True and r["error"] == fit.family_error("prefill_attention")
    # a fused family: no kernel-level data, so no ratio is claimed
    assert main(["compare", "gate_up", "--device", "m3-max-40", "--shape", "M=1,N=4864,K=896", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["validated"] is False and r["error"] is None and r["claim"].startswith("unvalidated")


def test_compare_at_k_128_prices_mlx_qmv_quad(capsys):
    assert main(["compare", "qmv", "--device", "m3", "--shape", "M=1,N=256,K=128", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mlx"]["kernel"] == "affine_qmv_quad_float16_t_gs_64_b_4_d_128_batch_0" and r["ours"]["seconds"] > 0


def test_compare_prices_mlx_split_k_qmm_with_its_accumulation(capsys):
    """The built-in model's K/V projection at a 128-token prompt: few tiles, so MLX cuts K in 14
    (qmm_splitk) and sums the partials with a second kernel; both are in MLX's price."""
    assert main(["compare", "qmm", "--device", "m1", "--shape", "M=128,N=128,K=896,bits=4,group_size=64",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mlx"]["kernel"] == ("affine_qmm_t_splitk_float16_t_gs_64_b_4_alN_true + "
                                  "steel_gemm_splitk_accum_float16_float32")
    assert r["ours"]["seconds"] > 0 and r["ratio"] == pytest.approx(r["mlx"]["seconds"] / r["ours"]["seconds"])
    assert r["claim"] == gate.claim(r["ratio"], "qmm")
    # the price by term: they add up to it, and MLX's second dispatch pays a second launch
    for side in ("ours", "mlx"):
        assert sum(r[side]["terms"].values()) == pytest.approx(r[side]["seconds"], rel=1e-12)
    assert r["mlx"]["terms"]["launch"] == pytest.approx(2 * fit.shipped()["constants"].launch)


def test_compare_answers_for_a_shape_only_mlx_serves(capsys):
    # qmv serves 1..8 rows; MLX's quantized_matmul still runs a vector kernel at 9 rows on an M2
    assert main(["compare", "qmv", "--device", "m2", "--shape", "M=9,N=64,K=512", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ours"] is None and r["ratio"] is None and r["mlx"]["seconds"] > 0
    assert r["mlx"]["kernel"].startswith("affine_qmv")


def test_compare_refuses_a_bad_family_in_one_line(capsys):
    assert main(["compare", "nope", "--device", "m3", "--shape", "M=1"]) != 0
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
