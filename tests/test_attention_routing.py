"""Attention calls our decode kernel serves on the metal/emulator path beyond one plain token:
several query tokens of one sequence (speculative verification, alone, or two sequences' beside
a plain token in one step: ours a call a sequence, MLX's op one for both), a batch of sequences
with Gemma 2's soft-cap and windows or gpt-oss's sinks, and quantized K/V: the logits are the
mlx backend's (MLX's ops), and the report names our kernel with the variant's bucket."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge import engine

pytest.importorskip("mlx_lm")
from test_architectures import build  # noqa: E402
from test_batched_attention import QWEN3  # noqa: E402

PROMPTS = [[5, 17, 42, 99, 3, 250, 11, 7, 64], list(range(2, 15)), list(range(40, 61))]


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
    ("qwen3", QWEN3, {"kv_bits": 8, "kv_group_size": 32}),  # quantized K/V (one token a sequence)
], ids=["plain", "gemma2", "gemma3_text", "gpt_oss", "kv8"])
def test_our_decode_kernel_serves_batches_and_verification_steps_as_mlx_does(tmp_path, arch, config, options):
    build(tmp_path, arch, config=config)
    steps = [[(0, [7]), (1, [8]), (2, [9])], [(0, [3]), (1, [4]), (2, [5])]]
    if not options:   # several tokens of one sequence, as speculative decoding verifies a draft; two verify
        steps.append([(1, [10, 11, 12, 13])])      # passes of 3 tokens beside a plain token in one step
        steps.append([(0, [3]), (1, [20, 21, 22]), (2, [30, 31, 32])])
    want, _ = run(tmp_path, "mlx", steps, **options)
    got, report = run(tmp_path, "emulator", steps, **options)
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=2e-4, atol=2e-4)
    ours = decode_reports(report)
    assert ours and all(v["kernel"] == "metalforge decode_attention (emulator)" for v in ours.values()), report
    assert any(k.startswith("decode_attention B=3,") for k in ours), ours   # the batch in one call
    if not options:
        assert any(",L=4" in k for k in ours) and any(k.startswith("decode_attention B=1,") and ",L=3" in k
                                                      for k in ours), ours
    if arch == "gemma2":
        assert any("softcap=1" in k for k in ours), ours
    if arch == "gpt_oss":
        assert any("sinks=1" in k and "window=" in k for k in ours), ours
    if options:
        assert all("kv_bits=8" in k for k in ours), ours
    mx.eval(got)
