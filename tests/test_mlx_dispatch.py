"""MLX's dispatch rules (kernels/mlx_dispatch.py) against cases read off MLX's host code (each citing
the file and line at its tag), against what MLX's developers report they ran, and every kernel name
they produce against the function names in mlx.metallib of the installed MLX and of earlier versions."""
from __future__ import annotations

import functools
import re
import subprocess
import sys
import zipfile

import mlx.core as mx
import pytest

from metalforge.devices import profiles
from metalforge.emulator import compiler
from metalforge.errors import MetalforgeError
from metalforge.kernels import mlx_dispatch as md

BLOB = "https://github.com/ml-explore/mlx/blob"
Q29 = f"{BLOB}/v0.29.0/mlx/backend/metal/quantized.cpp"
Q302 = f"{BLOB}/v0.30.3/mlx/backend/metal/quantized.cpp"
Q312 = f"{BLOB}/v0.31.2/mlx/backend/metal/quantized.cpp"
Q320 = f"{BLOB}/v0.32.0/mlx/backend/metal/quantized.cpp"
Q321 = f"{BLOB}/v0.32.1/mlx/backend/metal/quantized.cpp"
S29 = f"{BLOB}/v0.29.0/mlx/backend/metal/scaled_dot_product_attention.cpp"
S304 = f"{BLOB}/v0.30.4/mlx/backend/metal/scaled_dot_product_attention.cpp"
S306 = f"{BLOB}/v0.30.6/mlx/backend/metal/scaled_dot_product_attention.cpp"
S321 = f"{BLOB}/v0.32.1/mlx/backend/metal/scaled_dot_product_attention.cpp"
SMAIN = f"{BLOB}/846d176227a0ac13d2667e58d2bb68b322109ab0/mlx/backend/metal/scaled_dot_product_attention.cpp"
# 0.32.3/0.32.4 are newer than every readable tag: their rules were read from the wheels' libmlx.dylib
# (disassembled qmv() and sdpa_vector_2pass()) and match these pull requests.
PR4380 = "https://github.com/ml-explore/mlx/pull/4380"   # GQA pass 1 for G 12 and 16, HPT 4 and 2
PR4516 = "https://github.com/ml-explore/mlx/pull/4516"   # qmv_fast for N % 8 != 0 (merged as partial_rows)

QMV = dict(N=4096, K=4096, bits=4, group_size=64, dtype="float16")

# (job, arguments, MLX version, device, expected kernels, grids, threadgroups, where MLX says so)
CASES = [
    # qmv_fast needs N % 8 == 0 and K % 512 == 0; grid (M, N / 8, B), threadgroup (32, 2, 1)
    ("qmm", dict(M=1, **QMV), "0.32.1", "m3-max-40",
     ["affine_qmv_fast_float16_t_gs_64_b_4_batch_0"], [(1, 512, 1)], [(32, 2, 1)], f"{Q321}#L484-L492"),
    # K = 896 (Qwen2.5-0.5B) is no multiple of 512: the generic qmv
    ("qmm", dict(M=1, N=4864, K=896, bits=4, group_size=64, dtype="bfloat16"), "0.32.1", "m4-pro",
     ["affine_qmv_bfloat16_t_gs_64_b_4_batch_0"], [(1, 608, 1)], [(32, 2, 1)], f"{Q321}#L484"),
    # 8-bit: the K step is 256 from 0.32.1 (qmv_fast_k_alignment), 512 before
    ("qmm", dict(M=1, N=4096, K=768, bits=8, group_size=64, dtype="float16"), "0.32.1", "m2",
     ["affine_qmv_fast_float16_t_gs_64_b_8_batch_0"], [(1, 512, 1)], [(32, 2, 1)], f"{Q321}#L147-L149"),
    ("qmm", dict(M=1, N=4096, K=768, bits=8, group_size=64, dtype="float16"), "0.32.0", "m2",
     ["affine_qmv_float16_t_gs_64_b_8_batch_0"], [(1, 512, 1)], [(32, 2, 1)], f"{Q320}#L259"),
    # qmv_wide for 2 <= M < limit on gen >= 15 (M3): one tile of 4 vectors, 8 rows per threadgroup
    ("qmm", dict(M=4, **QMV), "0.32.1", "m3-max-40",
     ["affine_qmv_wide_float16_t_gs_64_b_4_nv_4_kl_8_batch_0"], [(1, 512, 1)], [(32, 2, 1)],
     f"{Q320}#L299-L335"),
    # M = 7: two tiles (ceil(7 / 5)) of 4 vectors
    ("qmm", dict(M=7, **QMV), "0.32.1", "m4-max-40",
     ["affine_qmv_wide_float16_t_gs_64_b_4_nv_4_kl_8_batch_0"], [(2, 512, 1)], [(32, 2, 1)], f"{Q320}#L322-L323"),
    # ... but not on gen 14 (M2), and not before 0.32.0
    ("qmm", dict(M=4, **QMV), "0.32.1", "m2-max",
     ["affine_qmv_fast_float16_t_gs_64_b_4_batch_0"], [(4, 512, 1)], [(32, 2, 1)], f"{Q320}#L299-L301"),
    ("qmm", dict(M=4, **QMV), "0.31.2", "m3-max-40",
     ["affine_qmv_fast_float16_t_gs_64_b_4_batch_0"], [(4, 512, 1)], [(32, 2, 1)], f"{Q312}#L1365-L1380"),
    # K in {64, 128}: qmv_quad, 64 rows per threadgroup of one SIMD-group
    ("qmm", dict(M=1, N=4096, K=128, bits=4, group_size=64, dtype="float32"), "0.32.1", "m1",
     ["affine_qmv_quad_float_gs_64_b_4_d_128_batch_0"], [(1, 64, 1)], [(32, 1, 1)], f"{Q321}#L1754"),
    # get_qmv_batch_limit on an M1 Ultra (g13d), K = N = 4096: 18; before split-K, qmm_t 32x32 tiles
    ("qmm", dict(M=17, **QMV), "0.29.0", "m1-ultra",
     ["affine_qmv_fast_float16_t_gs_64_b_4_batch_0"], [(17, 512, 1)], [(32, 2, 1)], f"{Q29}#L71-L83"),
    ("qmm", dict(M=18, **QMV), "0.29.0", "m1-ultra",
     ["affine_qmm_t_float16_t_gs_64_b_4_alN_true_batch_0"], [(128, 1, 1)], [(32, 2, 2)], f"{Q29}#L476-L484"),
    ("qmm", dict(M=64, N=4100, K=4096, bits=4, group_size=64, dtype="float16"), "0.30.3", "m2-max",
     ["affine_qmm_t_float16_t_gs_64_b_4_alN_false_batch_0"], [(129, 2, 1)], [(32, 2, 2)], f"{Q302}#L725"),
    # 0.32.1 on gen 15 Max (g15s), K = N = 4096: the limit is 15. Split-K aims at ~512 threadgroups:
    # 512 / 128 tiles = 4 partitions, summed by the strided column reduction (col_reduce_small)
    ("qmm", dict(M=15, **QMV), "0.32.1", "m3-max-40",
     ["affine_qmm_t_splitk_float16_t_gs_64_b_4_alN_true", "col_reduce_small_1_reduce_sumfloat16"],
     [(128, 1, 4), (480, 1, 1)], [(32, 2, 2), (32, 4, 1)], f"{Q321}#L1119-L1216"),
    ("qmm", dict(M=14, **QMV), "0.32.1", "m3-max-40",
     ["affine_qmv_wide_float16_t_gs_64_b_4_nv_5_kl_8_batch_0"], [(3, 512, 1)], [(32, 2, 1)], f"{Q321}#L96-L103"),
    # 2,048 tiles already: split_k = 1 falls back to qmm
    ("qmm", dict(M=512, **QMV), "0.32.1", "m3-max-40",
     ["affine_qmm_t_float16_t_gs_64_b_4_alN_true_batch_0"], [(128, 16, 1)], [(32, 2, 2)], f"{Q321}#L1138-L1155"),
    ("qmm", dict(M=512, **QMV), "0.31.2", "m1",
     ["affine_qmm_t_float16_t_gs_64_b_4_alN_true_batch_0"], [(128, 16, 1)], [(32, 2, 2)], f"{Q312}#L793"),

    # ---- decode attention ----
    # before 0.30.4 only Ultra ('d') goes 2-pass from 1,024 keys; with GQA everyone from 4,096
    ("decode", dict(B=1, Hq=32, Hkv=8, S=2048, D=128, dtype="float16"), "0.29.0", "m3-max-40",
     ["sdpa_vector_float16_t_128_128"], [(32, 1, 1)], [(1024, 1, 1)], f"{S29}#L474-L475"),
    ("decode", dict(B=1, Hq=32, Hkv=32, S=1024, D=128, dtype="float16"), "0.29.0", "m2-ultra",
     ["sdpa_vector_2pass_1_float16_t_128_128", "sdpa_vector_2pass_2_float16_t_128"],
     [(32, 1, 32), (32, 1, 1)], [(256, 1, 1), (1024, 1, 1)], f"{S29}#L238-L245"),
    # 0.30.4: Max too; blocks by class, keys and query SIMD-groups; one threadgroup per KV head
    ("decode", dict(B=1, Hq=32, Hkv=8, S=2048, D=128, dtype="float16"), "0.30.4", "m3-max-40",
     ["sdpa_vector_2pass_1_float16_t_128_128", "sdpa_vector_2pass_2_float16_t_128"],
     [(8, 1, 64), (32, 1, 1)], [(32, 4, 1), (1024, 1, 1)], f"{S304}#L446-L481"),
    ("decode", dict(B=1, Hq=40, Hkv=8, S=4096, D=128, dtype="bfloat16"), "0.30.6", "m3-max-40",
     ["sdpa_vector_2pass_1_bfloat16_t_128_128", "sdpa_vector_2pass_2_bfloat16_t_128"],
     [(8, 1, 128), (40, 1, 1)], [(32, 5, 1), (1024, 1, 1)], f"{S306}#L446-L453"),
    ("decode", dict(B=2, Hq=64, Hkv=8, S=16384, D=128, dtype="float16"), "0.32.1", "m2-ultra",
     ["sdpa_vector_2pass_1_float16_t_128_128", "sdpa_vector_2pass_2_float16_t_128"],
     [(8, 2, 512), (128, 1, 1)], [(32, 8, 1), (1024, 1, 1)], f"{S321}#L462-L473"),
    ("decode", dict(B=1, Hq=32, Hkv=8, S=4096, D=64, dtype="float32"), "0.32.1", "m1",
     ["sdpa_vector_2pass_1_float_64_64", "sdpa_vector_2pass_2_float_64"],
     [(8, 1, 64), (32, 1, 1)], [(32, 4, 1), (1024, 1, 1)], f"{S321}#L755-L756"),
    ("decode", dict(B=1, Hq=32, Hkv=8, S=2048, D=64, dtype="float32"), "0.32.1", "m1",
     ["sdpa_vector_float_64_64"], [(32, 1, 1)], [(1024, 1, 1)], f"{S321}#L755-L759"),
    # GQA 8 at 8,192+ keys: the duplication-free pass 1 (main after v0.32.1 = 0.32.2)
    ("decode", dict(B=1, Hq=32, Hkv=4, S=8192, D=128, dtype="float16"), "0.32.2", "m3-max-40",
     ["sdpa_vector_2pass_1_gqa_float16_t_128_128", "sdpa_vector_2pass_2_float16_t_128"],
     [(4, 1, 128), (32, 1, 1)], [(32, 8, 1), (1024, 1, 1)], f"{SMAIN}#L468-L473"),

    # 0.32.3+: G = 16 at 8,192 keys takes the GQA pass 1 with 2 heads a SIMD-group; Max ('s'): 128 blocks
    ("decode", dict(B=1, Hq=32, Hkv=2, S=8192, D=128, dtype="float16"), "0.32.4", "m3-max-40",
     ["sdpa_vector_2pass_1_gqa_16_float16_t_128_128", "sdpa_vector_2pass_2_float16_t_128"],
     [(2, 1, 128), (32, 1, 1)], [(32, 16, 1), (1024, 1, 1)], f"{PR4380}; {SMAIN}#L486-L523"),
    # 0.32.4: N = 4 (no multiple of 8) keeps qmv_fast with partial rows
    ("qmm", dict(M=1, N=4, K=4096, bits=4, group_size=64, dtype="bfloat16"), "0.32.4", "m1",
     ["affine_qmv_fast_bfloat16_t_gs_64_b_4_batch_0_pr_1_hgs_0_r_4"], [(1, 1, 1)], [(32, 2, 1)], PR4516),

    # ---- prefill attention ----
    ("prefill", dict(B=1, Hq=32, Hkv=8, L=512, D=128, dtype="float16"), "0.29.0", "m2-max",
     ["steel_attention_float16_bq32_bk16_bd128_wm4_wn1_maskfloat16"], [(16, 32, 1)], [(32, 4, 1)],
     f"{S29}#L30-L127"),
    ("prefill", dict(B=2, Hq=24, Hkv=8, L=100, D=96, dtype="bfloat16", prefix=28), "0.32.1", "m4-max-40",
     ["steel_attention_bfloat16_bq32_bk32_bd96_wm4_wn1_maskbfloat16"], [(4, 24, 2)], [(32, 4, 1)],
     f"{S321}#L196-L325"),
]


def _choose(job, args, version, device):
    fn = {"qmm": md.qmm_dispatch, "decode": md.decode_attention_dispatch,
          "prefill": md.prefill_attention_dispatch}[job]
    return fn(**args, device=device, mlx_version=version)


@pytest.mark.parametrize("job,args,version,device,kernels,grids,groups,cite", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[4][0]}" for c in CASES])
def test_mlx_chooses_as_its_host_code_says(job, args, version, device, kernels, grids, groups, cite):
    choice = _choose(job, args, version, device)
    assert [l.kernel for l in choice.launches] == kernels, cite
    assert [l.grid for l in choice.launches] == grids, cite
    assert [l.threadgroup for l in choice.launches] == groups, cite


def test_function_constants_follow_the_version():
    """Sinks (25 / 302) arrive in 0.30.0, `blocks` (26) in 0.30.4, and pass 2 takes it as bytes
    from 0.30.6 (S306#L577); steel's align_Q / align_K are the query and key tails (S321#L213-L222)."""
    old = md.decode_attention_dispatch(1, 32, 32, 1024, 128, "float16", "m2-ultra", "0.29.0")
    assert [c[0] for c in old.launches[0].constants] == [20, 21, 22, 23, 24]
    new = md.decode_attention_dispatch(1, 32, 32, 1024, 128, "float16", "m2-ultra", "0.30.4")
    assert new.launches[0].constants[-1] == (26, "blocks", 128)
    assert new.launches[1].constants == ((26, "blocks", 128),)
    later = md.decode_attention_dispatch(1, 32, 32, 1024, 128, "float16", "m2-ultra", "0.30.6")
    assert later.launches[1].constants == () and later.launches[1].buffers[-1] == (4, "blocks")
    steel = md.prefill_attention_dispatch(1, 8, 8, 100, 64, "float16", "m1", "0.32.1", prefix=60)
    assert dict((n, v) for _, n, v in steel.launches[0].constants) == {
        "align_Q": False, "align_K": True, "has_mask": False, "do_causal": True, "has_sinks": False}


def test_a_device_is_its_architecture_string_as_metal_reports_it():
    """A profile name, a profile or the string itself; generation and class letter as MLX reads them
    (device.cpp: get_architecture_gen, get_architecture().back())."""
    from metalforge import devices
    assert md.architecture("m4-pro") == (16, "s", "applegpu_g16s")
    assert md.architecture(devices.get("m2-ultra")) == (14, "d", "applegpu_g14d")
    assert md.architecture("applegpu_g13g") == (13, "g", "applegpu_g13g")


def test_the_gqa_pass_one_carries_its_heads_per_simdgroup():
    """HPT 4 at head dim 128 for G = 8 (main's scaled_dot_product_attention.metal#L48-L49), 2 for G = 16
    (PR 4380); below 8,192 keys, or for a G it has no instance for, the generic pass 1 (SMAIN#L468-L473)."""
    metal = f"{BLOB}/846d176227a0ac13d2667e58d2bb68b322109ab0/mlx/backend/metal/kernels/scaled_dot_product_attention.metal"
    g8 = md.decode_attention_dispatch(1, 32, 4, 8192, 128, "float16", "m3-max-40", "0.32.2")
    assert g8.launches[0].template[-2:] == (("G", 8), ("HPT", 4)), f"{metal}#L48-L49"
    g16 = md.decode_attention_dispatch(1, 32, 2, 8192, 128, "float16", "m3-max-40", "0.32.4")
    assert g16.launches[0].template[-2:] == (("G", 16), ("HPT", 2)), PR4380
    assert md.decode_attention_dispatch(1, 32, 2, 8191, 128, "float16", "m3-max-40", "0.32.4").kernel == \
        "sdpa_vector_2pass_1_float16_t_128_128"
    assert md.decode_attention_dispatch(1, 32, 2, 8192, 128, "float16", "m3-max-40", "0.32.2").kernel == \
        "sdpa_vector_2pass_1_float16_t_128_128"


def test_the_rules_agree_with_what_mlx_developers_report_they_ran():
    """Independent of the host code: PR 3764's table has gen-14 M2 Pro stay on qmv for int4 at M = 2
    ('| M2 Pro | qmv | qmv |') and the gen-15+ chips use qmv_wide; issue 3852 (M3 Max, mlx 0.32.0)
    names 'the marginal `qmv_wide` row' at M = 3 for 5120 -> 17408."""
    pr3764 = dict(M=2, N=15360, K=3840, bits=4, group_size=64, dtype="bfloat16", mlx_version="0.32.0")
    # (K = 3840 is no multiple of 512, so the generic qmv rather than qmv_fast)
    assert md.qmm_dispatch(**pr3764, device="m2-pro").kernel == "affine_qmv_bfloat16_t_gs_64_b_4_batch_0"
    for chip in ("m3-ultra", "m4-pro"):
        assert md.qmm_dispatch(**pr3764, device=chip).kernel.startswith("affine_qmv_wide_")
    assert md.qmm_dispatch(3, 17408, 5120, 4, 64, "bfloat16", "m3-max-40", "0.32.0").kernel == \
        "affine_qmv_wide_bfloat16_t_gs_64_b_4_nv_3_kl_8_batch_0"


def test_our_families_jobs_map_to_mlx_as_mlx_lm_calls_it():
    """Every family's shape goes, through its own MLX op (Family.mlx_jobs), to the dispatch MLX
    runs for mlx-lm's call: quantized_matmul with transposed weights, decode over a contiguous
    cache (a paged pool is mlx-lm's contiguous cache), causal prefill, a fused family's products."""
    from metalforge.kernels.families import FAMILIES
    from metalforge.kernels.timing import mlx_jobs
    shapes = {"qmv": dict(M=1, N=4096, K=4096, bits=4, group_size=64),
              "qmm": dict(M=512, N=4096, K=4096, bits=4, group_size=64),
              "decode_attention": dict(B=1, Hq=32, Hkv=8, S=2048, D=128, block_size=16),
              "prefill_attention": dict(B=1, Hq=32, Hkv=8, L=500, D=128, prefix=12),
              "gate_up": dict(M=1, N=14336, K=4096, bits=4, group_size=64),
              "norm_qkv": dict(M=1, K=4096, Hq=32, Hkv=8, D=128, bits=4, group_size=64)}
    qmv = lambda N: md.qmm_dispatch(1, N, 4096, 4, 64, "float16", "m4-max-40")
    expected = {"qmv": [qmv(4096)],
                "qmm": [md.qmm_dispatch(512, 4096, 4096, 4, 64, "float16", "m4-max-40")],
                "decode_attention": [md.decode_attention_dispatch(1, 32, 8, 2048, 128, "float16", "m4-max-40")],
                "prefill_attention": [md.prefill_attention_dispatch(1, 32, 8, 500, 128, "float16", "m4-max-40",
                                                                    prefix=12, causal=True)],
                "gate_up": [qmv(14336)] * 2, "norm_qkv": [qmv(4096), qmv(1024), qmv(1024)]}
    # MLX's gather_qmv/gather_qmm rules are not ported yet
    assert set(shapes) == set(FAMILIES) - {"gather_qmv"}
    with pytest.raises(MetalforgeError, match="no MLX kernel sequence is ported for family 'gather_qmv'; "
                                              "valid families: qmv, qmm, decode_attention"):
        FAMILIES["gather_qmv"].mlx_jobs(dict(M=1, N=256, K=256, experts=8, top_k=2))
    for name, family in ((n, FAMILIES[n]) for n in shapes):
        fields = family.shape(shapes[name]).__dict__
        choices = [mlx_jobs.choose(op, sizes, "float16", "m4-max-40") for op, sizes in family.mlx_jobs(fields)]
        assert choices == expected[name], name
    assert expected["qmm"][0].kernel == "affine_qmm_t_float16_t_gs_64_b_4_alN_true_batch_0"
    assert dict((n, val) for _, n, val in expected["prefill_attention"][0].launches[0].constants)["do_causal"]
    assert [c.job for c in expected["decode_attention"] + expected["prefill_attention"]] == \
        ["sdpa_vector", "steel_attention"]


@pytest.mark.parametrize("call,message", [
    (lambda: md.decode_attention_dispatch(1, 8, 8, 64, 80, "float16", "m1", "0.32.1"), "head dim 80"),
    (lambda: md.prefill_attention_dispatch(1, 8, 8, 64, 96, "float16", "m1", "0.29.0"),
     "has no fused prefill attention for head dim 96 .*unfused ops"),
    (lambda: md.prefill_attention_dispatch(1, 8, 8, 64, 256, "float16", "m1", "0.32.4"),
     "prefill attention rules for head dim 256 are not ported"),
    (lambda: md.prefill_attention_dispatch(1, 8, 8, 4, 64, "float16", "m1", "0.32.1"), "vector kernels"),
    (lambda: md.qmm_dispatch(64, 64, 64, 4, 64, "float16", "applegpu_g17s", "0.32.1"), "NAX qmm"),
    (lambda: md.prefill_attention_dispatch(1, 8, 8, 64, 128, "float16", "m5-max-40", "0.32.1"),
     "NAX steel attention"),
    (lambda: md.qmm_dispatch(1, 64, 64, 4, 64, "float16", "m1", "0.28.0"), "not ported"),
    (lambda: md.qmm_dispatch(1, 64, 100, 4, 64, "float16", "m1", "0.32.1"), "multiple of group_size"),
    (lambda: md.qmm_dispatch(1, 64, 128, 1, 64, "float16", "m1", "0.32.3"), "bits 2, 3, 4, 5, 6, 8 .*got bits=1"),
    (lambda: md.qmm_dispatch(1, 64, 128, 4, 16, "float16", "m1", "0.32.4"), "group sizes 32, 64, 128; got"),
    (lambda: md.qmm_dispatch(1, 64, 128, 4, 64, "float16", "applegpu_x", "0.32.4"), "not of the form applegpu_g"),
    (lambda: md.qmm_dispatch(1, 64, 128, 4, 64, "float16", "m9-max", "0.32.4"), "unknown device 'm9-max'"),
    (lambda: md.qmm_dispatch(1, 64, 128, 4, 64, "float16", "m1", "banana"), "not of the form X.Y.Z"),
    (lambda: md.decode_attention_dispatch(1, 12, 8, 64, 128, "float16", "m1", "0.32.1"), "Hq a multiple of Hkv"),
    (lambda: md.prefill_attention_dispatch(1, 8, 8, 64, 128, "float16", "m1", "0.32.1", mask="causal"),
     "mask 'causal' is not one of"),
])
def test_what_mlx_does_not_fuse_or_we_did_not_port_is_refused_in_one_line(call, message):
    with pytest.raises(MetalforgeError, match=message):
        call()


# ---------------------------------------------------------------- names in MLX's own metallib

def _metallib_names(version: str) -> set[str]:
    """Function names in the mlx.metallib of the mlx-metal wheel of an MLX version."""
    folder = compiler.cache_dir().parent / "mlx-metal" / version      # under metalforge's cache root
    names = folder / "names.txt"
    if not names.exists():
        wheels = folder / "wheel"
        run = subprocess.run([sys.executable, "-m", "pip", "download", f"mlx-metal=={version}", "--no-deps",
                              "--only-binary=:all:", "--platform", "macosx_14_0_arm64", "-d", str(wheels)],
                             capture_output=True, text=True, timeout=600)
        found = sorted(wheels.glob("mlx_metal-*.whl"))
        if run.returncode or not found:
            pytest.skip(f"mlx-metal=={version} could not be downloaded (offline?): run "
                        f"'pip download mlx-metal=={version} --no-deps --only-binary=:all: "
                        f"--platform macosx_14_0_arm64' with network access")
        with zipfile.ZipFile(found[0]) as z:
            blob = z.read("mlx/lib/mlx.metallib")
        words = set(re.findall(rb"[A-Za-z_][A-Za-z0-9_]{5,}", blob))
        names.parent.mkdir(parents=True, exist_ok=True)
        tmp = names.with_suffix(".tmp")
        tmp.write_text("\n".join(sorted(w.decode() for w in words)))
        tmp.replace(names)
        for w in found:
            w.unlink()
        wheels.rmdir()
    return set(names.read_text().split("\n"))


def _jobs(version=None):
    """A grid of our jobs, as calls of the dispatch functions (every device profile and dtype)."""
    for arch in sorted({p.architecture for p in profiles().values()}):
        for dtype in ("float16", "bfloat16", "float32"):
            for bits in [b for since, b in md.AFFINE_BITS if md.parse_version(version) >= since][-1]:
                for gs in (32, 64, 128):
                    for M in (1, 2, 3, 5, 9, 16, 33, 300):
                        for N, K in ((4096, 4096), (4100, 4096), (4096, 896), (14336, 4096), (512, 128),
                                     (4096, 64), (151936, 2048), (1024, 11008), (256, 4096)):
                            if K % gs == 0:
                                yield functools.partial(md.qmm_dispatch, M, N, K, bits, gs, dtype, arch, version)
            for D in md.VECTOR_HEAD_DIMS:
                for Hq, Hkv in ((32, 32), (32, 8), (32, 4), (24, 2), (32, 2)):
                    for S in (100, 1024, 5000, 8192, 40000, 100000):
                        yield functools.partial(md.decode_attention_dispatch, 2, Hq, Hkv, S, D, dtype, arch, version)
            for D in (64, 72, 80, 96, 128):
                for L, prefix in ((100, 0), (512, 0), (64, 33)):
                    for mask in (None, "bool", "float"):
                        yield functools.partial(md.prefill_attention_dispatch, 1, 32, 8, L, D, dtype, arch,
                                                version, prefix=prefix, mask=mask)


# The installed MLX, and the first version of each era of rules before it (2-pass blocks, split-K,
# qmv_wide, K alignment by bits): each checked against its own wheel's metallib.
VERSIONS = sorted({mx.__version__, "0.29.0", "0.30.4", "0.31.2", "0.32.1"}, key=md.parse_version)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_kernel_name_the_rules_produce_is_in_that_versions_metallib(version):
    names = _metallib_names(version)
    chosen, unfused = set(), set()
    for job in _jobs(version):
        try:
            chosen |= {launch.kernel for launch in job().launches}
        except MetalforgeError as e:      # only a head dim MLX does not fuse in that version may be refused,
            if "NAX" in str(e):           # or M5's NAX kernels (not ported)
                assert job.args[-2].startswith("applegpu_g17"), str(e)
                continue
            assert "it runs unfused ops" in str(e), str(e)
            unfused.add(int(re.search(r"head dim (\d+)", str(e)).group(1)))
    assert len(chosen) > 300
    missing = sorted(chosen - names)
    assert not missing, f"{len(missing)} names not in mlx-metal=={version}'s metallib, e.g. {missing[:5]}"
    # steel_attention's head dims 72 and 96 arrive in 0.32.1 (S321#L631-L633)
    assert unfused == (set() if md.parse_version(version) >= (0, 32, 1) else {72, 96})


def test_m5_runs_the_vector_kernels_by_the_same_rules_with_its_own_batch_limit():
    """Generation 17 keeps qmv/qmv_wide/sdpa_vector (only qmm and steel attention go NAX); from 0.32.1
    its qmv batch limit for K, N <= 4096 is 25 (get_qmv_batch_limit's `arch_gen >= 17` row), an M4 Max's 15."""
    m5 = md.qmm_dispatch(20, 4096, 4096, 4, 64, "float16", "m5-max-40", "0.32.1")
    m4 = md.qmm_dispatch(20, 4096, 4096, 4, 64, "float16", "m4-max-40", "0.32.1")
    assert m5.job == "qmv" and m5.launches[0].function == "affine_qmv_wide"
    assert m4.job == "qmm"
    decode = md.decode_attention_dispatch(1, 32, 8, 32768, 128, "float16", "m5-max-40", "0.32.1")
    same = md.decode_attention_dispatch(1, 32, 8, 32768, 128, "float16", "m4-max-40", "0.32.1")
    assert [launch.kernel for launch in decode.launches] == [launch.kernel for launch in same.launches]
