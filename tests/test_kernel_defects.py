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
    config = family("decode_attention").config(
        dict(threads=64, keys_per_step=4, splits=1, share_kv=True, load_width=1, prefetch=True))
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


def test_register_rule_lowers_the_thread_limit_of_register_heavy_configs():
    """A Mac gives a register-heavy pipeline a lower maxTotalThreadsPerThreadgroup than 1,024:
    8 keys a step, prefetched, at D=128 hold 4 x (2 + 16) + 8 = 80 values a lane (q, the
    accumulator, 16 key rows and 8 scores; plus the scalars beside them), so a 1,024-thread
    threadgroup is refused."""
    from metalforge.kernels import check
    from metalforge.kernels.checks import REGISTER_OVERHEAD, max_threads_for_registers
    assert max_threads_for_registers(0, 1024) == 1024
    assert max_threads_for_registers(128 - REGISTER_OVERHEAD, 1024) == 416   # 208 KB / (4 B x 128)
    assert max_threads_for_registers(500, 1024) == 416                       # past 128 it spills
    shape = dict(B=1, Hq=32, Hkv=8, S=512, D=128)
    heavy = dict(threads=1024, keys_per_step=8, prefetch=True, share_kv=False, load_width=1, splits=1)
    problems = [str(p) for p in check("decode_attention", heavy, shape, "float16", "m3-max-40")]
    assert problems == ["Thread group size (1024) is greater than the maximum allowed threads per threadgroup "
                        f"({212992 // (4 * (80 + REGISTER_OVERHEAD)) // 32 * 32}) for lanes holding about "
                        f"{80 + REGISTER_OVERHEAD} registers"]
    assert not check("decode_attention", {**heavy, "threads": 512}, shape, "float16", "m3-max-40")


# MLX's kernels for these jobs written as configs of ours (their tiling, from MLX's sources:
# qmv_fast, qmm_t, sdpa_vector, steel attention), in half precision
MLX_TILINGS = [
    ("qmv", dict(M=1, N=4096, K=4096, bits=4, group_size=64),
     dict(simdgroups=2, rows_per_simdgroup=4, stage_x=False, k_split=1, load_width=1, prescaled_x=True,
          values_per_lane=16)),
    ("qmm", dict(M=512, N=4096, K=4096, bits=4, group_size=64),
     dict(BM=32, BN=32, BK=32, WM=2, WN=2, dequant="threadgroup", stage="input", split_k=1, operands="float")),
    ("decode_attention", dict(B=1, Hq=32, Hkv=8, S=8192, D=128),
     dict(threads=1024, keys_per_step=1, keys_per_simdgroup=1, share_kv=False, splits=32, load_width=4,
          prefetch=False)),
    ("prefill_attention", dict(B=1, Hq=32, Hkv=8, L=512, D=128),
     dict(BQ=32, BK=16, simdgroups=4, double_buffer=False, stage="input", q_source="threadgroup", load_width=4,
          pad=True)),
]


@pytest.mark.parametrize("name, shape, tiling", MLX_TILINGS)
def test_mlx_own_kernels_pass_the_register_rule(name, shape, tiling):
    """MLX's kernels run on every Mac (sdpa_vector at 1,024 threads): the rule must accept their
    tiling (in half precision, what models decode in; our prefill tiles K and V apart where MLX's steel
    attention reuses one buffer for both, so its fp32 D=128 tiles exceed 32 KB as ours)."""
    from metalforge import devices
    from metalforge.kernels import check
    fam = family(name)
    config = fam.config(tiling)
    for device in devices.profiles():
        assert not check(fam, config, shape, "float16", device), (device, config)


def test_every_shipped_config_passes_the_checks_on_its_device():
    import glob
    import os

    import yaml

    from metalforge.kernels import check
    from metalforge.results import shipped_path
    folder = os.path.dirname(shipped_path("m1"))
    for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
        data = yaml.safe_load(open(path))
        for name, entries in data["entries"].items():
            for key, e in entries.items():
                assert not check(name, e["config"], e["shape"], e["dtype"], data["device"]["name"]), (path, key)
