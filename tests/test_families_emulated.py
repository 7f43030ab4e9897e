"""Every family's generated kernels run in the emulator and match their MLX references.

Small shapes run every valid config of the family's space; larger and odd shapes (tails in N
and K, GQA, paged KV, cached prefixes) run a sample across dtypes.
"""
import random
import re
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest

from metalforge.kernels import check
from metalforge.kernels.covering import covering_array
from metalforge.kernels import get_family as family
from metalforge.emulator import EmulatorError
from metalforge.errors import MetalforgeError

DEVICE = "m3-max-40"


# Small shapes (with tails, GQA, paged KV, a prefix) whose covering samples between them take
# every value of every tunable (test_covering_shapes_reach_every_value_of_every_tunable).
COVERING = {
    "qmv": [(dict(M=2, N=40, K=256, bits=4, group_size=64), "float16"),
            (dict(M=3, N=37, K=4096, bits=2, group_size=64), "float32")],   # long K: every k_split
    "qmm": [(dict(M=20, N=40, K=96, bits=4, group_size=32), "float16"),
            (dict(M=33, N=24, K=512, bits=2, group_size=64), "float32")],   # K: every split_k
    "decode_attention": [(dict(B=1, Hq=4, Hkv=2, S=70, D=64), "float16"),
                         (dict(B=2, Hq=4, Hkv=1, S=33, D=80, block_size=8), "float32"),
                         (dict(B=1, Hq=2, Hkv=1, S=260, D=64), "float16")],   # splits 128 and 256 (MLX's 2-pass blocks)
    "prefill_attention": [(dict(B=1, Hq=8, Hkv=1, L=24, D=64), "float16"),   # 8 heads a KV head: every heads
                          (dict(B=1, Hq=2, Hkv=1, L=10, D=128, prefix=7), "float32")],   # D=128: d_block 64
    "gather_qmv": [(dict(M=1, N=40, K=256, experts=4, top_k=2, bits=4, group_size=64), "float16"),
                   (dict(M=2, N=37, K=4096, experts=3, top_k=2, bits=2, group_size=64), "float32")],
}


def valid_configs(fam, shape, dtype):
    return [c for c in fam.space() if not check(fam, c, shape, dtype, DEVICE)]


def verify(name, shape_values, dtype, configs=None, sample=None, seed=0):
    fam = family(name)
    shape = fam.shape(shape_values)
    configs = configs or valid_configs(fam, shape, dtype)
    if sample:
        configs = random.Random(seed).sample(configs, min(sample, len(configs)))
    inputs = fam.make_inputs(shape, dtype, seed=seed)
    mx.eval(inputs)
    with ThreadPoolExecutor(2) as pool:   # compile in parallel, run one at a time
        list(pool.map(lambda c: fam.prepare(c, shape, dtype, inputs, backend="emulator", device=DEVICE), configs))
    expected = np.array(fam.reference(shape, dtype, inputs).astype(mx.float32))
    for config in configs:
        out = fam.run(config, shape, dtype, inputs, backend="emulator", device=DEVICE)
        atol, rtol = fam.tolerance(config, dtype)
        np.testing.assert_allclose(np.array(out.astype(mx.float32)), expected, atol=atol, rtol=rtol,
                                   err_msg=f"{name} {shape_values} {dtype} {config}")
    return len(configs)


def covering(fam, configs):
    """A few configs that between them take every value (valid at this shape) of every parameter
    (a covering array of strength 1: greedily, the config that adds the most values not yet taken)."""
    return covering_array(fam.params, configs, 1)


def covering_sample(name, shape_values, dtype, extra=16, seed=0):
    """Configs that between them take every value of every tunable valid at the shape, plus a
    random few (the whole space runs in benchmarks/sweep_families.py)."""
    fam = family(name)
    configs = valid_configs(fam, fam.shape(shape_values), dtype)
    chosen = covering(fam, configs)
    rest = [c for c in configs if c not in chosen]
    return chosen + random.Random(seed).sample(rest, min(extra, len(rest)))


@pytest.mark.parametrize("name", list(COVERING))
def test_covering_shapes_reach_every_value_of_every_tunable(name):
    fam = family(name)
    taken = {(p.name, c[p.name]) for shape, dtype in COVERING[name]
             for c in valid_configs(fam, fam.shape(shape), dtype) for p in fam.params}
    assert taken == {(p.name, v) for p in fam.params for v in p.domain}


@pytest.mark.parametrize("shape, dtype", COVERING["qmv"])
def test_qmv_sample_covering_every_tunable_value(shape, dtype):
    configs = covering_sample("qmv", shape, dtype)
    assert verify("qmv", shape, dtype, configs=configs) == len(configs)


@pytest.mark.parametrize("shape, dtype", [
    (dict(M=1, N=72, K=512, bits=8, group_size=128), "bfloat16"),
    (dict(M=8, N=33, K=640, bits=4, group_size=32), "float32"),
    (dict(M=5, N=16, K=192, bits=8, group_size=64), "float16"),
])
def test_qmv_sample_across_shapes_and_dtypes(shape, dtype):
    assert verify("qmv", shape, dtype, sample=6) == 6


@pytest.mark.parametrize("bits", [2, 3, 5, 6])
def test_qmv_every_bit_width_mx_quantize_writes(bits):
    """3-, 5- and 6-bit values straddle 32-bit words (read as byte chunks); 2-bit as whole words.
    Configs taking every valid value of every tunable against the reference, and the reference
    against MLX's own quantized matmul."""
    shape = dict(M=2, N=24, K=256, bits=bits, group_size=32 if bits in (3, 6) else 64)
    fam = family("qmv")
    configs = covering_sample("qmv", shape, "float32", extra=4)
    assert verify("qmv", shape, "float32", configs=configs) == len(configs)
    inputs = fam.make_inputs(fam.shape(shape), "float32")
    np.testing.assert_allclose(np.array(fam.reference(fam.shape(shape), "float32", inputs)),
                               np.array(fam.baseline(fam.shape(shape), "float32", inputs)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape, dtype", COVERING["qmm"])
def test_qmm_sample_covering_every_tunable_value(shape, dtype):
    configs = covering_sample("qmm", shape, dtype)
    assert verify("qmm", shape, dtype, configs=configs) == len(configs)


@pytest.mark.parametrize("shape, dtype", [
    (dict(M=70, N=100, K=512, bits=8, group_size=128), "bfloat16"),
    (dict(M=9, N=33, K=192, bits=4, group_size=64), "float32"),
])
def test_qmm_sample_across_shapes_and_dtypes(shape, dtype):
    assert verify("qmm", shape, dtype, sample=5) == 5


@pytest.mark.parametrize("shape, dtype", COVERING["decode_attention"])
def test_decode_attention_sample_covering_every_tunable_value(shape, dtype):
    configs = covering_sample("decode_attention", shape, dtype)
    assert verify("decode_attention", shape, dtype, configs=configs) == len(configs)


@pytest.mark.parametrize("shape, dtype", [
    (dict(B=2, Hq=8, Hkv=2, S=300, D=128), "bfloat16"),
    (dict(B=3, Hq=6, Hkv=2, S=77, D=80, block_size=16, num_blocks=24), "float16"),
    (dict(B=2, Hq=4, Hkv=1, S=50, D=96, block_size=8), "float32"),
    (dict(B=1, Hq=2, Hkv=2, S=1, D=256), "float16"),
])
def test_decode_attention_sample_across_shapes_and_dtypes(shape, dtype):
    assert verify("decode_attention", shape, dtype, sample=6) == 6


@pytest.mark.parametrize("shape, dtype", COVERING["prefill_attention"])
def test_prefill_attention_sample_covering_every_tunable_value(shape, dtype):
    configs = covering_sample("prefill_attention", shape, dtype)
    assert verify("prefill_attention", shape, dtype, configs=configs) == len(configs)


def test_one_compiled_kernel_serves_every_prompt_length():
    """Lengths arrive at run time: prompts of different lengths and prefixes share one kernel
    (the name hashes the source), and each matches its reference."""
    fam = family("prefill_attention")
    config = fam.default_config()
    names = set()
    for values in (dict(L=5, prefix=0), dict(L=37, prefix=11), dict(L=64, prefix=100)):
        shape = fam.shape(dict(B=1, Hq=4, Hkv=2, D=64, **values))
        names |= {launch.kernel.name for launch in fam.launches(config, shape, "float16")}
        assert verify("prefill_attention", shape.__dict__, "float16", configs=[config]) == 1
    assert len(names) == 1
    qmm = family("qmm")
    assert len({launch.kernel.name for m in (9, 100, 513) for launch in
                qmm.launches(qmm.default_config(), qmm.shape(dict(M=m, N=64, K=128)), "float16")}) == 1


@pytest.mark.parametrize("shape, dtype", [
    (dict(B=2, Hq=8, Hkv=2, L=70, D=128), "bfloat16"),
    (dict(B=1, Hq=6, Hkv=3, L=33, D=80, prefix=40), "float16"),
    (dict(B=1, Hq=4, Hkv=4, L=17, D=96, prefix=5), "float32"),
])
def test_prefill_attention_sample_across_shapes_and_dtypes(shape, dtype):
    assert verify("prefill_attention", shape, dtype, sample=5) == 5


def test_checked_mode_finds_a_broken_variant_of_a_family_kernel(capsys):
    """A prefill kernel with one barrier removed: the tile is overwritten while others still
    read it. Unchecked it may even pass; checked mode names the race and its lines."""
    fam = family("prefill_attention")
    shape = fam.shape(dict(B=1, Hq=1, Hkv=1, L=40, D=64))
    config = fam.config({"BQ": 16, "BK": 8, "simdgroups": 2, "stage": "float", "load_width": 1})
    launch = fam.launches(config, shape, "float32")[0]
    source = launch.kernel.source
    first_barrier = "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  for (int i = tid * W; i < BK * DC"
    assert first_barrier in source
    broken = source.replace(first_barrier, "  for (int i = tid * W; i < BK * DC")
    from metalforge import emulator
    kernel = emulator.metal_kernel(name="broken_prefill", input_names=list(launch.kernel.input_names),
                                   output_names=["out"], source=broken, checked=True)
    inputs = {**fam.make_inputs(shape, "float32"), "lengths": mx.array(launch.lengths, dtype=mx.int32)}
    with pytest.raises(EmulatorError) as e:
        kernel(inputs=[inputs[n] for n in launch.kernel.input_names], output_shapes=list(launch.output_shapes),
               output_dtypes=list(launch.output_dtypes), grid=launch.grid, threadgroup=launch.threadgroup,
               verbose=True)
    msl = capsys.readouterr().out.split("```\n", 1)[1].splitlines()
    assert "threadgroup memory race on k_tile" in str(e.value) or "threadgroup memory race on v_tile" in str(e.value)
    reported = [int(n) for n in re.findall(r"line (\d+)", str(e.value))]
    # reported lines are lines of the generated MSL (what verbose=True prints): the tile stores race
    assert any(msl[n - 1].lstrip().startswith(("k_tile[at", "v_tile[at")) and "] = " in msl[n - 1] for n in reported)
    # and the correct kernel passes the same checked run
    good = emulator.metal_kernel(name="good_prefill", input_names=list(launch.kernel.input_names),
                                 output_names=["out"], source=source, checked=True)
    out = good(inputs=[inputs[n] for n in launch.kernel.input_names], output_shapes=list(launch.output_shapes),
               output_dtypes=list(launch.output_dtypes), grid=launch.grid, threadgroup=launch.threadgroup)[0]
    np.testing.assert_allclose(np.array(out), np.array(fam.reference(shape, "float32", inputs)), atol=1e-4, rtol=1e-4)


# Edge shapes: where an index runs one past its end if anything does. A paged sequence filling its
# last block (B=1: nothing lies past the block table), one token, lengths on block and split
# boundaries, B=1 and B>1, head dims that leave lanes' slots partly empty, and each family's
# largest tails (63 rows or columns against tiles of 64, 127 prompt rows against 128).
EDGE = [
    ("decode_attention", dict(B=1, Hq=4, Hkv=2, S=64, D=64, block_size=16), "float16"),
    ("decode_attention", dict(B=3, Hq=4, Hkv=1, S=32, D=96, block_size=8), "float32"),
    ("decode_attention", dict(B=2, Hq=2, Hkv=1, S=1, D=80, block_size=16), "float16"),
    ("decode_attention", dict(B=1, Hq=2, Hkv=2, S=64, D=80), "bfloat16"),
    ("decode_attention", dict(B=2, Hq=2, Hkv=1, S=65, D=128), "float16"),
    # 8 tokens against sequences shorter than them, a window and sinks, a full last block
    ("decode_attention", dict(B=2, Hq=4, Hkv=2, S=16, D=64, block_size=16, L=8, window=4, sinks=1), "float16"),
    ("decode_attention", dict(B=1, Hq=2, Hkv=1, S=32, D=64, block_size=16, kv_bits=4, kv_group_size=32), "float32"),
    ("qmv", dict(M=8, N=63, K=1024, bits=4, group_size=64), "float16"),
    ("qmv", dict(M=1, N=1, K=512, bits=8, group_size=128), "float32"),
    ("qmm", dict(M=63, N=63, K=128, bits=4, group_size=64), "float16"),
    ("qmm", dict(M=9, N=8, K=256, bits=8, group_size=128), "float32"),
    ("prefill_attention", dict(B=2, Hq=2, Hkv=1, L=1, D=64, prefix=16), "float16"),
    ("prefill_attention", dict(B=1, Hq=2, Hkv=1, L=65, D=80), "float32"),
    ("prefill_attention", dict(B=1, Hq=2, Hkv=1, L=127, D=128, prefix=1), "float16"),
    ("prefill_attention", dict(B=1, Hq=2, Hkv=1, L=65, D=64, prefix=3, window=16, sinks=1), "float16"),
]


@pytest.mark.parametrize("name, shape, dtype", [
    *[(name, shape, dtype) for name, cases in COVERING.items() for shape, dtype in cases],
    ("qmv", dict(M=3, N=37, K=384, bits=8, group_size=128), "float16"),
    ("qmv", dict(M=1, N=70, K=640, bits=4, group_size=32), "bfloat16"),
    ("qmm", dict(M=19, N=50, K=128, bits=4, group_size=64), "float16"),
    ("decode_attention", dict(B=2, Hq=4, Hkv=2, S=45, D=80, block_size=8), "float16"),
    ("decode_attention", dict(B=1, Hq=6, Hkv=3, S=70, D=64), "float32"),
    ("prefill_attention", dict(B=1, Hq=2, Hkv=1, L=21, D=96, prefix=9), "float16"),
    *EDGE,
])
def test_family_kernels_are_clean_in_checked_mode(name, shape, dtype, monkeypatch):
    """No out-of-bounds access and no threadgroup-memory race in configs that together take every
    value of every tunable (the COVERING shapes reach them all), tails, paged layouts and the edge
    shapes included (the checked mode would raise; the paged block-table read past a full last
    block was found at an edge shape)."""
    monkeypatch.setenv("METALFORGE_EMULATOR_CHECKED", "1")
    fam = family(name)
    configs = covering(fam, valid_configs(fam, fam.shape(shape), dtype))
    assert verify(name, shape, dtype, configs=configs) == len(configs)


@pytest.mark.parametrize("shape, dtype", COVERING["gather_qmv"])
def test_gather_qmv_sample_covering_every_tunable_value(shape, dtype):
    configs = covering_sample("gather_qmv", shape, dtype, extra=4)
    assert verify("gather_qmv", shape, dtype, configs=configs) == len(configs)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_gather_qmv_matches_mlx_gather_qmm(bits, M):
    """Every width mx.quantize writes, 1 to 8 tokens of 2 experts each, against MLX's own
    gather_qmm on the same inputs (and the plain-ops reference through verify)."""
    fam = family("gather_qmv")
    shape = fam.shape(dict(M=M, N=24, K=128, experts=6, top_k=2, bits=bits, group_size=32))
    inputs = fam.make_inputs(shape, "float32", seed=bits)
    out = fam.run(fam.default_config(), shape, "float32", inputs, backend="emulator", device=DEVICE)
    want = fam.baseline(shape, "float32", inputs)
    np.testing.assert_allclose(np.array(out), np.array(want), atol=1e-4, rtol=1e-4)
    assert verify("gather_qmv", shape, "float32", sample=3, seed=bits) == 3


@pytest.mark.parametrize("shape, dtype", [
    (dict(B=1, Hq=2, Hkv=1, L=40, D=64, prefix=9, window=13), "float32"),           # gemma / mistral windows
    (dict(B=1, Hq=4, Hkv=2, L=33, D=64, sinks=1), "float16"),                        # gpt-oss sinks
    (dict(B=2, Hq=2, Hkv=1, L=70, D=80, prefix=5, window=20, sinks=1), "bfloat16"),  # both, tails
])
def test_prefill_window_and_sinks_match_the_reference_in_configs_covering_every_tunable(shape, dtype):
    """Tiles before a row's window are skipped (never loaded for the threadgroup's first row);
    the sink joins the denominator. The reference agrees with MLX's fused attention (a boolean
    window mask and sinks=)."""
    fam = family("prefill_attention")
    s = fam.shape(shape)
    inputs = fam.make_inputs(s, "float32")
    np.testing.assert_allclose(np.array(fam.reference(s, "float32", inputs)),
                               np.array(fam.baseline(s, "float32", inputs)), atol=1e-5, rtol=1e-5)
    configs = covering_sample("prefill_attention", shape, dtype, extra=2)
    assert verify("prefill_attention", shape, dtype, configs=configs) == len(configs)


def test_prefill_variants_stay_out_of_results_keys_unless_set():
    fam = family("prefill_attention")
    plain = dict(B=1, Hq=32, Hkv=8, L=512, D=128)
    assert fam.bucket_key(fam.shape(plain), "float16") == "B=1,Hq=32,Hkv=8,L=512,D=128,prefix=0|float16"
    assert fam.bucket_key(fam.shape({**plain, "window": 4096}), "float16").endswith(",window=4096|float16")
    with pytest.raises(MetalforgeError, match="window=-1 must be 0"):
        fam.shape({**plain, "window": -1})
    with pytest.raises(MetalforgeError, match="sinks=2 must be 0 or 1"):
        fam.shape({**plain, "sinks": 2})
