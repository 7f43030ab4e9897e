"""Attention calls our decode kernel serves on the metal/emulator path beyond one plain token:
several query tokens a sequence (speculative verification: one sequence alone, and two
sequences verifying 2 drafts each beside plain tokens in one step, one call for both), a batch of
sequences with Gemma 2's soft-cap and windows or gpt-oss's sinks, and 8- and 4-bit K/V: the
logits are the mlx backend's (MLX's ops), and the report names our kernel with the variant's
bucket. Counted on the graph a Mac would run: one decode-attention launch a group a layer."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge import engine
from metalforge.engine import dispatches

pytest.importorskip("mlx_lm")
from test_architectures import build  # noqa: E402
from test_batched_attention import QWEN3  # noqa: E402

PROMPTS = [[5, 17, 42, 99, 3, 250, 11, 7, 64], list(range(2, 15)), list(range(40, 61)), list(range(70, 81))]


def run(folder, backend, steps, **options):
    """The logits of each step (a list of (sequence index, tokens)) after the prompts, each prefilled alone."""
    with engine.load(folder, backend=backend, device="m2", kv_tokens=512, block_size=8, **options) as e:
        sids = [e.add_sequence() for _ in PROMPTS]
        for sid, prompt in zip(sids, PROMPTS):
            e.step([sid], [prompt])
        out = []
        for step in steps:
            seqs = [sids[i] for i, _ in step]
            out.append(e.step(seqs, [t for _, t in step], logits_at={s: list(range(len(t))) for s, (_, t) in
                                                                      zip(seqs, step)}))
        return out, e.kernel_report()


def decode_reports(report) -> dict:
    return {k: v for k, v in report.items() if k.startswith("decode_attention ")}


@pytest.mark.parametrize("arch,config,options", [
    ("qwen3", QWEN3, {}),                                   # plain
    ("gemma2", None, {}),                                   # soft-cap
    ("gemma3_text", None, {}),                              # windowed layers
    ("gpt_oss", None, {}),                                  # sinks and windows
    ("qwen3", QWEN3, {"kv_bits": 8, "kv_group_size": 32}),  # quantized K/V
    ("qwen3", QWEN3, {"kv_bits": 4, "kv_group_size": 64}),
], ids=["plain", "gemma2", "gemma3_text", "gpt_oss", "kv8", "kv4"])
def test_our_decode_kernel_serves_batches_and_verification_steps_as_mlx_does(tmp_path, arch, config, options):
    build(tmp_path, arch, config=config)
    steps = [[(0, [7]), (1, [8]), (2, [9])], [(0, [3]), (1, [4]), (2, [5])],
             [(1, [10, 11, 12, 13])],                                   # one sequence verifying 3 drafts
             [(0, [3]), (3, [6]), (1, [20, 21, 22]), (2, [30, 31, 32])]]  # 2 plain + 2 verifying 2 drafts each
    want, _ = run(tmp_path, "mlx", steps, **options)
    got, report = run(tmp_path, "emulator", steps, **options)
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=2e-4, atol=2e-4)
        assert (np.argmax(np.array(g), axis=-1) == np.argmax(np.array(w), axis=-1)).all(), "greedy tokens differ"
    ours = decode_reports(report)
    assert ours and all(v["kernel"] == "metalforge decode_attention (emulator)" for v in ours.values()), report
    assert any(k.startswith("decode_attention B=3,") for k in ours), ours   # the batch in one call
    assert any(k.startswith("decode_attention B=1,") and ",L=4" in k for k in ours), ours
    assert any(k.startswith("decode_attention B=2,") and ",L=3" in k for k in ours), ours  # both verify passes at once
    if arch == "gemma2":
        assert any("softcap=1" in k for k in ours), ours
    if arch in ("gpt_oss", "gemma3_text"):
        assert any("window=" in k and ",L=3" in k for k in ours), ours
    if arch == "gpt_oss":
        assert any("sinks=1" in k and "window=" in k for k in ours), ours
    if options:
        assert all(f"kv_bits={options['kv_bits']}" in k for k in ours), ours
    mx.eval(got)


@pytest.mark.parametrize("options", [{}, {"kv_bits": 8, "kv_group_size": 32}], ids=["dense", "kv8"])
def test_a_step_verifying_two_sequences_beside_two_plain_ones_is_one_launch_a_group_a_layer(tmp_path, options):
    """Two plain tokens and two sequences verifying 2 drafts each (B=2, L=3), on the graph a Mac
    runs: per layer one decode-attention launch for the plain pair and one for the verifying
    pair (the family default: no split-K reduce), and no concatenation of per-sequence results."""
    build(tmp_path, "qwen3", config=QWEN3)
    with dispatches.metal_available():
        e = engine.load(tmp_path, backend="metal", device=None, kv_tokens=512, block_size=8, **options)
    sids = [e.add_sequence() for _ in PROMPTS]
    for sid, prompt in zip(sids, PROMPTS):
        dispatches.engine_pass(e, {sid: prompt})
    step = {sids[0]: [3], sids[1]: [4], sids[2]: [20, 21, 22], sids[3]: [30, 31, 32]}
    full, outside = (dispatches.engine_pass(e, step, layers=flag) for flag in (True, False))
    kinds = dispatches.per_layer(full, outside, QWEN3["num_hidden_layers"])
    launches = sum(n for k, n in kinds.items() if k.startswith("metal_kernel:mf_decode_attention"))
    assert launches == 2, kinds
    assert kinds.get("Concatenate", 0) <= 2, kinds   # the two groups' outputs joined, K and V stacked for their write
    # the verifying pair's queries split into sequences as a view; its output merged back, o_proj's input: copies
    assert kinds.get("Reshape (copy)", 0) + kinds.get("Flatten (copy)", 0) <= 2, kinds
    report = decode_reports(e.kernel_report())
    assert any(k.startswith("decode_attention B=2,") and ",L=3" in k for k in report), report
