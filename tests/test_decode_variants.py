"""Decode attention's variants against MLX: several keys per SIMD-group, 1-8 query tokens
(causal among them), a sliding window, attention sinks, a logit soft-cap and 8- or 4-bit K/V in
mx.quantize's layout, each in configs taking every value of every tunable, contiguous and paged."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge.errors import MetalforgeError
from metalforge.kernels import get_family as family

from test_families_emulated import covering_sample, verify

VARIANTS = [
    (dict(B=2, Hq=4, Hkv=2, S=37, D=64, L=4), "float16"),                                   # speculative: 4 tokens
    (dict(B=2, Hq=4, Hkv=1, S=50, D=96, L=8, window=16, block_size=8), "float32"),          # window, paged, 8 tokens
    (dict(B=2, Hq=2, Hkv=1, S=45, D=64, L=2, sinks=1, softcap=1, block_size=16), "bfloat16"),  # gpt-oss / gemma2
    (dict(B=1, Hq=4, Hkv=2, S=70, D=128, window=20, sinks=1), "float16"),
    (dict(B=2, Hq=4, Hkv=2, S=37, D=64, kv_bits=8, kv_group_size=32), "float16"),              # q8 K/V
    (dict(B=2, Hq=4, Hkv=1, S=33, D=128, L=2, kv_bits=4, kv_group_size=64, block_size=8), "float32"),  # q4, paged
]


@pytest.mark.parametrize("shape, dtype", VARIANTS)
def test_variant_matches_the_reference_in_configs_covering_every_tunable(shape, dtype):
    configs = covering_sample("decode_attention", shape, dtype, extra=2)
    assert {c["keys_per_simdgroup"] for c in configs} == {1, 2, 4}
    assert verify("decode_attention", shape, dtype, configs=configs) == len(configs)


@pytest.mark.parametrize("shape", [
    dict(B=2, Hq=4, Hkv=2, S=40, D=64, L=4),
    dict(B=2, Hq=4, Hkv=2, S=40, D=64, L=3, window=7),
    dict(B=1, Hq=4, Hkv=1, S=40, D=64, L=2, window=5, sinks=1),
    dict(B=1, Hq=8, Hkv=2, S=40, D=128, sinks=1),
])
def test_reference_agrees_with_mlx_fused_attention(shape):
    """The reference's causal offset (token i at S - L + i), window mask and sink column are the
    ones MLX's scaled_dot_product_attention applies (mask='causal', a boolean mask, sinks=)."""
    fam = family("decode_attention")
    s = fam.shape(shape)
    inputs = fam.make_inputs(s, "float32")
    np.testing.assert_allclose(np.array(fam.reference(s, "float32", inputs)),
                               np.array(fam.baseline(s, "float32", inputs)), atol=1e-5, rtol=1e-5)


def test_soft_cap_bends_scores_as_gemma2_does():
    """tanh(s / cap) x cap by hand, in numpy, for one head: the reference and the kernel agree."""
    fam = family("decode_attention")
    s = fam.shape(dict(B=1, Hq=1, Hkv=1, S=24, D=64, softcap=1))
    inputs = fam.make_inputs(s, "float32")
    q, k, v = (np.array(inputs[n])[0, 0] for n in ("queries", "keys", "values"))
    cap = float(inputs["softcap"].item())
    scores = cap * np.tanh(q @ k.T / np.sqrt(64) / cap)
    w = np.exp(scores - scores.max())
    expected = (w / w.sum()) @ v
    np.testing.assert_allclose(np.array(fam.reference(s, "float32", inputs))[0, 0], expected, atol=1e-5)
    out = fam.run(fam.config(dict(keys_per_simdgroup=2)), s, "float32", inputs, backend="emulator")
    np.testing.assert_allclose(np.array(out)[0, 0], expected, atol=2e-4)


@pytest.mark.parametrize("splits", [1, 4])
def test_tokens_that_see_no_key_give_zeros_with_sinks_and_windows(splits):
    """Sequences shorter than the query tokens (token i of L=4 sits at len - 4 + i, before the
    first key when len < 4) and an empty sequence: zeros, sink or not."""
    fam = family("decode_attention")
    shape = fam.shape(dict(B=3, Hq=2, Hkv=1, S=24, D=64, L=4, window=3, sinks=1, block_size=8))
    inputs = fam.make_inputs(shape, "float16")
    inputs["seq_lens"] = mx.array([24, 0, 2], dtype=mx.int32)
    config = fam.config(dict(splits=splits, keys_per_simdgroup=4, prefetch=True))
    out = np.array(fam.run(config, shape, "float16", inputs, backend="emulator").astype(mx.float32))
    assert np.all(out[1] == 0) and np.all(out[2, :, :2] == 0) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np.array(fam.reference(shape, "float16", inputs).astype(mx.float32)),
                               atol=2e-2, rtol=2e-2)


def test_defaults_keep_todays_kernel_and_results_keys():
    """A shape without the variant fields is plain decode: one token, no window, sinks or cap,
    and its results key is the one written before the variants existed."""
    fam = family("decode_attention")
    shape = fam.shape(dict(B=1, Hq=32, Hkv=8, S=4096, D=128))
    assert (shape.L, shape.window, shape.sinks, shape.softcap) == (1, 0, 0, 0)
    assert fam.bucket_key(shape, "float16") == "B=1,Hq=32,Hkv=8,S=4096,D=128,block_size=0,num_blocks=0|float16"
    assert fam.bucket_key(fam.shape({**shape.__dict__, "L": 2}), "float16").endswith(",L=2|float16")
    code = "\n".join(line for line in fam.render(fam.default_config(), shape, "float16").splitlines()
                     if not line.startswith("//"))
    assert "WINDOW" not in code and "sinks" not in code and "tanh" not in code and "int position" not in code


@pytest.mark.parametrize("values, message", [
    (dict(L=9), "L=9 is outside 1..8"),
    (dict(L=0), "L=0 is outside 1..8"),
    (dict(window=-1), "window=-1 must be 0 (no window) or positive"),
    (dict(sinks=2), "sinks=2 must be 0 or 1"),
    (dict(kv_bits=3), "kv_bits=3 is not supported (valid: 0, 4, 8)"),
    (dict(kv_bits=4, kv_group_size=16), "kv_group_size=16 is not supported (valid: 32, 64, 128)"),
    (dict(kv_bits=4, kv_group_size=128), "D=64 is not a multiple of kv_group_size=128"),
])
def test_bad_variant_fields_are_named(values, message):
    with pytest.raises(MetalforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        family("decode_attention").shape(dict(B=1, Hq=2, Hkv=1, S=8, D=64, **values))
