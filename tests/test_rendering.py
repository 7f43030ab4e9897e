"""Rendering of every family, the byte formula against the rendered source, and the checks."""
import re

import jinja2
import pytest

from metalforge.errors import MetalforgeError
from metalforge.kernels import check, check_space
from metalforge.kernels import get_family as family
from metalforge.kernels.families import FAMILIES
from metalforge.kernels.render import render

SHAPES = {
    "qmv": [dict(M=1, N=4096, K=4096, bits=4, group_size=64), dict(M=8, N=1000, K=1536, bits=8, group_size=128)],
    "qmm": [dict(M=512, N=4096, K=4096, bits=4, group_size=64), dict(M=100, N=1000, K=96, bits=8, group_size=32)],
    "decode_attention": [dict(B=1, Hq=32, Hkv=8, S=4096, D=128), dict(B=2, Hq=14, Hkv=2, S=300, D=64, block_size=16)],
    "prefill_attention": [dict(B=1, Hq=32, Hkv=8, L=512, D=128), dict(B=1, Hq=12, Hkv=4, L=100, D=80, prefix=64)],
    "gather_qmv": [dict(M=1, N=768, K=2048, experts=128, top_k=8, bits=4, group_size=64),
                   dict(M=4, N=100, K=1536, experts=8, top_k=2, bits=6, group_size=32)],
    "gate_up": [dict(M=1, N=4864, K=896, bits=4, group_size=64), dict(M=8, N=1000, K=1536, bits=6, group_size=32, gelu=1)],
    "norm_qkv": [dict(M=1, K=896, Hq=14, Hkv=2, D=64, bits=4, group_size=64, bias=1),
                 dict(M=8, K=1024, Hq=8, Hkv=4, D=128, bits=8, group_size=128, qk_norm=1)],
}
TYPE_BYTES = {"float": 4, "half": 2, "bfloat16_t": 2, "int": 4, "uint": 4}
DECL = re.compile(r"threadgroup\s+(\w+)\s+\w+\s*\[(\d+)\]\s*;")


def declared_threadgroup_bytes(source: str) -> int:
    """Sum of the threadgroup arrays declared in rendered MSL, read from the text alone."""
    return sum(TYPE_BYTES[t] * int(n) for t, n in DECL.findall(source))


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_byte_formula_matches_rendered_source_for_every_config(name, dtype):
    fam = family(name)
    for shape_values in SHAPES[name]:
        shape = fam.shape(shape_values)
        seen, meaningful = set(), 0
        for config in fam.space():
            text = fam.render(config, shape, dtype)
            assert declared_threadgroup_bytes(text) == fam.threadgroup_memory_bytes(config, shape, dtype), config
            if not fam.config_problems(config, shape, dtype):
                seen.add(text)
                meaningful += 1
        assert len(seen) == meaningful, "every config the family accepts renders distinct code"


def test_rendered_source_is_specialised_and_named_by_content():
    fam = family("qmv")
    shape = fam.shape(SHAPES["qmv"][0])
    launch = fam.launches(fam.default_config(), shape, "bfloat16")[0]
    src = launch.kernel.source
    assert "constexpr int K = 4096;" in src and "static_cast<bfloat16_t>" in src
    assert launch.kernel.name.startswith("mf_qmv_")
    other = fam.launches(fam.config({"values_per_lane": 32}), shape, "bfloat16")[0]
    assert other.kernel.name != launch.kernel.name
    # grid counts threads: ceil(4096 / (2 SIMD-groups * 4 rows)) threadgroups of 64 threads
    assert launch.grid == (512 * 64, 1, 1) and launch.threadgroup == (64, 1, 1)


def test_split_k_adds_a_reduce_launch():
    fam = family("decode_attention")
    shape = fam.shape(SHAPES["decode_attention"][0])
    one = fam.launches(fam.config({"splits": 1}), shape, "float16")
    four = fam.launches(fam.config({"splits": 4}), shape, "float16")
    assert len(one) == 1 and len(four) == 2
    assert four[0].kernel.output_names == ("partial_out", "partial_max", "partial_sum")
    assert four[1].kernel.input_names == ("partial_out", "partial_max", "partial_sum")


def test_templates_are_strict():
    with pytest.raises(jinja2.exceptions.UndefinedError, match="undefined"):
        render("qmv.metal.j2", M=1)


def test_prefill_example_from_the_issue_is_rejected_with_both_numbers():
    # packed rows: (32 + 2 x 32) x 128 x 4 = 49,152; padded by 16 bytes: 96 x 528 = 50,688
    config = {"BQ": 32, "BK": 32, "simdgroups": 4, "stage": "float", "pad": False}
    problems = check("prefill_attention", config, SHAPES["prefill_attention"][0], "float32", "m3-max-40")
    assert [p.kind for p in problems] == ["threadgroup_memory"]
    assert str(problems[0]) == ("Threadgroup memory size (49152) exceeds the maximum threadgroup memory "
                                "allowed (32768)")
    problems = check("prefill_attention", {**config, "pad": True}, SHAPES["prefill_attention"][0], "float32",
                     "m3-max-40")
    assert str(problems[0]) == ("Threadgroup memory size (50688) exceeds the maximum threadgroup memory "
                                "allowed (32768)")


def test_decode_share_kv_on_wide_threadgroups_exceeds_memory():
    # 32 SIMD-groups x 4 query heads per KV head x (2 + 128) floats = 66,560 bytes
    problems = check("decode_attention", {"threads": 1024, "share_kv": True}, SHAPES["decode_attention"][0],
                     "float16", "m1")
    assert "Threadgroup memory size (66560)" in str(problems[0])
    assert check("decode_attention", {"threads": 1024, "share_kv": False}, SHAPES["decode_attention"][0],
                 "float16", "m1") == []


def test_space_counts_hand_checked():
    """Prefill D=128 fp16 on M1 (32 KB), 4 SIMD-groups, tiles in half, one K/V buffer. Q in
    threadgroup memory: BQ must be a multiple of 32 and (BQ + 2 BK) * 128 * 2 <= 32768, i.e.
    BQ + 2 BK <= 128; a SIMD-group holds BQ/32 * (16 + BK/8) + 1 fragments (<= 64). BQ=32: BK 8,
    16, 32; BQ=64: BK 8, 16, 32; BQ=128: 65 fragments. Q in registers: 2 BK <= 128 and
    BQ/32 * (32 + BK/8) + 1 <= 64: BQ=32 with BK 8, 16, 32, 64. Each at 3 load widths. Rows
    padded by 16 bytes: (BQ + 2 BK) * 272 <= 32768, BQ + 2 BK <= 120: BQ=64 loses BK 32 and Q in
    registers loses BK 64. (Whole rows: d_block=0, scores in fp32, one head a threadgroup.)"""
    valid, report = check_space("prefill_attention", SHAPES["prefill_attention"][0], "float16", "m1")
    assert report.total == 4800 * 4 * 2 * 4   # d_block 0/16/32/64, score_type float/half, heads 1/2/4/8
    packed = {("threadgroup", 32, 8), ("threadgroup", 32, 16), ("threadgroup", 32, 32),
              ("threadgroup", 64, 8), ("threadgroup", 64, 16), ("threadgroup", 64, 32),
              ("registers", 32, 8), ("registers", 32, 16), ("registers", 32, 32), ("registers", 32, 64)}
    padded = packed - {("threadgroup", 64, 32), ("registers", 32, 64)}
    for pad, pairs in ((False, packed), (True, padded)):
        fixed = {"simdgroups": 4, "stage": "input", "double_buffer": False, "pad": pad, "d_block": 0,
                 "score_type": "float", "heads": 1}
        assert {(c["q_source"], c["BQ"], c["BK"]) for c in valid if fixed.items() <= c.items()} == pairs
        assert len([c for c in valid if fixed.items() <= c.items()]) == 3 * len(pairs)


def test_qmm_tiles_fit_the_limit_with_padded_rows_and_k_must_divide():
    # a tile row is BK values and 16 bytes of padding: half tiles at BK 128 hold
    # (2 x 128 + 16) x (BM 64 + BN 64) = 34,816 bytes, over the limit; at BK 64 18,432; fp32 at
    # BK 64 34,816, but with the weights dequantised in registers only x's tile: 17,408
    problems = check("qmm", {"BM": 64, "BN": 64, "BK": 128}, SHAPES["qmm"][0], "float16", "m1")
    assert [str(p) for p in problems] == ["Threadgroup memory size (34816) exceeds the maximum threadgroup "
                                          "memory allowed (32768)"]
    assert check("qmm", {"BM": 64, "BN": 64, "BK": 64}, SHAPES["qmm"][0], "float16", "m1") == []
    problems = check("qmm", {"BM": 64, "BN": 64, "BK": 64, "stage": "float"}, SHAPES["qmm"][0], "float16", "m1")
    assert [str(p) for p in problems] == ["Threadgroup memory size (34816) exceeds the maximum threadgroup "
                                          "memory allowed (32768)"]
    assert check("qmm", {"BM": 64, "BN": 64, "BK": 64, "stage": "float", "dequant": "registers"},
                 SHAPES["qmm"][0], "float16", "m1") == []
    problems = check("qmm", {"BK": 64}, SHAPES["qmm"][1], "float16", "m1")
    assert [str(p) for p in problems] == ["K=96 is not a multiple of BK=64"]
    problems = check("qmm", {"BK": 32, "split_k": 2}, SHAPES["qmm"][1], "float16", "m1")
    assert [str(p) for p in problems] == ["K=96 is not a multiple of BK=32 x split_k=2"]


def test_config_problems_beyond_memory():
    problems = check("prefill_attention", {"BQ": 8, "BK": 8, "simdgroups": 8, "stage": "input"},
                     SHAPES["prefill_attention"][0], "float32", "m1")
    assert {p.kind for p in problems} == {"shape"}
    assert [str(p) for p in problems] == ["BQ=8 over simdgroups=8 is not a whole number of 8-row fragments",
                                          "stage=input is stage=float for float32 inputs"]
    # 16 fragment rows x (16 of O + 4 of S + 16 of Q) + the K/V operand = 577 (Q in registers: 32 KB of K/V fits)
    problems = check("prefill_attention", {"BQ": 128, "BK": 32, "simdgroups": 1, "q_source": "registers"},
                     SHAPES["prefill_attention"][0], "float16", "m1")
    assert [str(p) for p in problems] == ["a SIMD-group would hold 577 8x8 fragments, more than 64 (128 registers a lane)"]
    problems = check("decode_attention", {"splits": 32}, dict(B=1, Hq=4, Hkv=4, S=16, D=64), "float16", "m1")
    assert "splits=32 exceeds the sequence length S=16" in str(problems[0])


@pytest.mark.parametrize("call, message", [
    (lambda: family("gemm"), "unknown kernel family 'gemm'; valid families: qmv, qmm, decode_attention, prefill_attention"),
    (lambda: family("qmv").config({"tile": 4}), "unknown parameter 'tile'; valid parameters: simdgroups"),
    (lambda: family("qmv").config({"simdgroups": 3}), "simdgroups=3 is outside its domain; valid values: 1, 2, 4, 8"),
    (lambda: family("qmv").shape(dict(M=1, N=64, K=100, bits=4, group_size=64)), "K=100 is not a multiple of group_size=64"),
    (lambda: family("qmv").shape(dict(M=1, N=64, K=128, bits=7)), "bits=7 is not supported"),
    (lambda: family("decode_attention").shape(dict(B=1, Hq=6, Hkv=4, S=8, D=64)), "Hq=6 is not a multiple of Hkv=4"),
    (lambda: check("qmv", {}, dict(M=1, N=8, K=64), "float16", "m7"), "unknown device 'm7'"),
    (lambda: check("qmv", {}, dict(M=1, N=8, K=64), "float64", "m1"), "unsupported dtype 'float64'"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(MetalforgeError, match=re.escape(message)):
        call()
