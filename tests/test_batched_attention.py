"""Batched decode attention on MLX's path: one attention call per layer for all the step's
one-token sequences (their blocks gathered through the block table, a mask per sequence), equal
to each sequence decoded alone (which reads its K/V in place), for every attention variant the
engine serves: plain, quantized K/V, a sliding window over the pool, Gemma 2's soft-cap, Gemma
3's windowed layers, gpt-oss's sinks."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge import engine
from metalforge.engine import dispatches

pytest.importorskip("mlx_lm")
from test_architectures import COMMON, build  # noqa: E402

QWEN3 = dict(model_type="qwen3", **COMMON, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)   # a head size our kernels serve
CASES = {   # name: (architecture, config or None for test_architectures', engine options)
    "plain": ("qwen3", QWEN3, {}),
    "quantized kv": ("qwen3", QWEN3, {"kv_bits": 8, "kv_group_size": 32}),
    "pool window": ("qwen3", QWEN3, {"max_kv_size": 12}),
    "gemma2 softcap": ("gemma2", None, {}),
    "gemma3 windowed layers": ("gemma3_text", None, {}),
    "gpt_oss sinks": ("gpt_oss", None, {}),
}
PROMPTS = [[5, 17, 42, 99, 3], list(range(2, 15)), list(range(40, 61))]   # 5, 13 and 21 tokens: across windows
NEXT = [[7, 8, 9], [11, 12, 13], [200, 201, 202]]                            # three decode steps each


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_of_many_sequences_equals_each_alone(tmp_path, case):
    arch, config, options = CASES[case]
    build(tmp_path, arch, config=config)
    with engine.load(tmp_path, backend="mlx", kv_tokens=512, block_size=4, **options) as e:
        alone = []
        for prompt, nxt in zip(PROMPTS, NEXT):
            sid = e.add_sequence()
            e.step([sid], [prompt])
            alone.append([e.step([sid], [[t]])[0] for t in nxt])
        sids = [e.add_sequence() for _ in PROMPTS]
        for sid, prompt in zip(sids, PROMPTS):   # each prompt alone (a quantized pool attends to a lone
            e.step([sid], [prompt])              # first chunk as computed), then every decode step together
        together = [e.step(sids, [[n[i]] for n in NEXT]) for i in range(3)]
        report = e.kernel_report()
    for i in range(3):
        np.testing.assert_allclose(np.array(together[i]), np.array(mx.stack([a[i] for a in alone])),
                                   rtol=1e-4, atol=1e-4)
    assert any("decode attention" in op for op in report)


@pytest.mark.parametrize("options,arrays,more", [({}, 1, {}), ({"kv_bits": 8, "kv_group_size": 32}, 3, {"Select": 1})],
                         ids=["dense", "quantized"])
def test_a_decode_step_of_three_sequences_costs_only_the_gathers_more_than_one(tmp_path, options, arrays, more):
    """Per layer, three sequences decoded together launch what one does plus a gather of each
    of the layer's K/V arrays (dense: one holding K and V; quantized: codes, scales and biases)
    and, quantized, the mask's select (MLX's fused attention takes the mask inside), and write
    their slots with a scatter (they are not consecutive) where one writes a slice: no
    attention call per sequence."""
    build(tmp_path, "qwen3", config=QWEN3)
    with dispatches.metal_available():
        e = engine.load(tmp_path, backend="mlx", kv_tokens=512, block_size=4, **options)
    sids = [e.add_sequence() for _ in PROMPTS]
    for sid, prompt in zip(sids, PROMPTS):
        e.step([sid], [prompt])
    layers = QWEN3["num_hidden_layers"]

    def per_layer(tokens):
        full, outside = (dispatches.engine_pass(e, tokens, layers=flag) for flag in (True, False))
        assert full.syncs == 0
        return dispatches.per_layer(full, outside, layers)
    one = per_layer({sids[0]: [7]})
    three = per_layer({sid: [7] for sid in sids})
    three.subtract(one)
    # B query rows go back to token rows after attention: a real transpose for B > 1, a copy to
    # reshape (Attention.__call__'s, not attention's own)
    assert three.pop("Reshape (copy)", 0) <= 1
    assert {k: v for k, v in three.items() if v} == {"Gather": arrays, "SliceUpdate": -arrays,
                                                        "ScatterAxis": arrays, **more}
