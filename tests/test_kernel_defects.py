"""Each defect the kernel review found, pinned by a test that failed before its fix."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge.kernels import get_family as family

from test_families_emulated import verify


def test_paged_decode_reads_no_block_table_entry_past_the_last_block(monkeypatch):
    """With prefetch and 4 keys per step, the step after the last one used to index the block
    table one past the sequence's row before testing that its keys are inside (checked mode
    reported it when the sequence fills its blocks)."""
    monkeypatch.setenv("METALFORGE_EMULATOR_CHECKED", "1")
    config = dict(threads=64, keys_per_step=4, splits=1, share_kv=True, load_width=1, prefetch=True)
    assert verify("decode_attention", dict(B=1, Hq=4, Hkv=2, S=64, D=64, block_size=16), "float16",
                  configs=[config]) == 1


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_of_an_empty_sequence_is_zeros_not_nan(splits):
    """A sequence of no keys has no softmax: its output is zeros, as MLX's sdpa_vector guards
    (`sum_exp_score == 0 ? o : o / sum_exp_score`, o never accumulated); the merge divided by 0."""
    fam = family("decode_attention")
    shape = fam.shape(dict(B=3, Hq=4, Hkv=2, S=40, D=64, block_size=8))
    inputs = fam.make_inputs(shape, "float16")
    inputs["seq_lens"] = mx.array([40, 0, 5], dtype=mx.int32)
    config = fam.config(dict(splits=splits, keys_per_step=2, prefetch=True))
    out = np.array(fam.run(config, shape, "float16", inputs, backend="emulator").astype(mx.float32))
    assert np.all(out[1] == 0)
    expected = np.array(fam.reference(shape, "float16", inputs).astype(mx.float32))
    np.testing.assert_allclose(out, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("q_source", ["threadgroup", "registers"])
def test_prefill_scales_scores_in_fp32_not_q_in_half(q_source):
    """Q x scale x log2(e) staged as half lost bits that sharp softmaxes (large logits) turn into
    errors of 1e-2; scaling S in fp32 (as MLX does now) leaves the output's own rounding only."""
    fam = family("prefill_attention")
    shape = fam.shape(dict(B=1, Hq=2, Hkv=1, L=40, D=128))
    inputs = fam.make_inputs(shape, "float16", seed=1)
    for name in ("queries", "keys"):
        inputs[name] = (inputs[name].astype(mx.float32) * 6).astype(mx.float16)   # logits of tens
    config = fam.config(dict(stage="input", q_source=q_source, BQ=32, BK=32, simdgroups=4))
    out = fam.run(config, shape, "float16", inputs, backend="emulator")
    expected = fam.reference(shape, "float16", inputs)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(expected.astype(mx.float32)),
                               atol=1e-3, rtol=1e-3)
