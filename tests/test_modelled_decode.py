"""The decode step's price (engine/step_price.py, engine/step_glue.py) and benchmarks/modelled_decode.py's
tables of it: the step's kernels as the op plan holds them, the other dispatches as mlx-lm's graph
launches them (hand-counted), and `auto` never priced slower than mlx-lm on the kernels it picks."""
import importlib.util
import sys
from pathlib import Path

import pytest

from metalforge import devices
from metalforge.engine import step_glue, step_price
from metalforge.engine.step_glue import GlueCounts
from metalforge.tuner import defaults

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def md():
    spec = importlib.util.spec_from_file_location("modelled_decode", ROOT / "benchmarks" / "modelled_decode.py")
    module = sys.modules["modelled_decode"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_ops_hold_each_linear_as_often_as_the_model():
    """Llama-3-8B-sized, as the engine's Metal path runs a decode step: per layer q/k/v in one
    norm_qkv, gate and up (14336 x 4096) in one gate_up, o (4096 x 4096) and down (4096 x 14336)
    with their residual adds; the LM head once; attention once a layer."""
    ops = {(op, v.get("N"), v.get("K")): n for op, v, n in step_price.step_ops(defaults.MODELS[1], 4096)}
    assert ops == {("attention_input", None, 4096): 32, ("gated_mlp", 14336, 4096): 32,
                   ("linear", 4096, 4096): 32, ("linear", 4096, 14336): 32, ("linear", 128256, 4096): 1,
                   ("attention", None, None): 32}
    attention = [v for op, v, _ in step_price.step_ops(defaults.MODELS[1], 4096) if op == "attention"][0]
    assert attention["context"] == 4096 and attention["new"] == 1


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_is_multiplied_once_a_step_and_the_embedding_never(tied):
    """Tied or not, a decode step multiplies by the LM head (vocab x hidden) once and by nothing
    else of that size (the embedding is looked up); a prompt chunk computes no logits, so it
    multiplies by neither. The op plan and the step's counts read the same table."""
    from metalforge.engine import models
    config = dict(defaults.MODELS[0], tie_word_embeddings=tied)
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    head = [(v["M"], v["K"], n) for op, v, n in step_price.step_ops(config, 512) if v.get("N") == vocab]
    assert head == [(1, hidden, 1)]
    assert not [v for _, v, _ in step_price.chunk_ops(config, 0, 64) if v.get("N") == vocab]
    args = models.parse(config, "config")
    plan = models.get("qwen2").op_plan(args, contexts=[512], prefill=[64])
    assert [(p.values["M"], p.values["K"]) for p in plan if p.values.get("N") == vocab] == [(1, hidden)]


def test_a_step_prices_mlx_kernel_for_each_op_once(monkeypatch):
    """The three sides of a step share MLX's price of an op (each price reads the op's traces):
    every op of the step is priced once, however many sides run MLX's kernel for it."""
    priced = []
    real = step_price.mlx_price

    def counting(op, values, device, constants):
        priced.append((op, tuple(values.items())))
        return real(op, values, device, constants)
    monkeypatch.setattr(step_price, "mlx_price", counting)
    config = defaults.MODELS[0]
    step_price.steps(config, 512, devices.get("m1"), GlueCounts(config, 512))
    assert sorted(priced) == sorted((op, tuple(v.items())) for op, v, _ in step_price.step_ops(config, 512))


def test_mlx_lm_glue_matches_a_hand_count():
    """mlx-lm's llama decode layer, steady step (no cache growth): 2 rms_norm, 2 rope, 2 cache
    slice-updates, 2 residual adds and the compiled SwiGLU: 9 dispatches besides its 7 quantized
    matmuls and one attention (the attention output's transpose moves only its size-1 token axis,
    so its reshape copies nothing); Llama 3.1's scaled RoPE the same (its frequencies computed
    once, not per step); qwen2 adds its q/k/v bias adds. Outside the layers: the quantized
    embedding's row (3 gathers, 1 dequantize) and the final norm."""
    llama = dict(defaults.MODELS[1], num_hidden_layers=2)
    assert GlueCounts(llama, 512).mlx_lm == step_glue.Glue(per_layer=9, outside=5)
    scaled = dict(llama, rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0, original_max_position_embeddings=8192))
    assert GlueCounts(scaled, 512).mlx_lm.per_layer == 9
    assert GlueCounts(defaults.MODELS[0], 512).mlx_lm.per_layer == 12


def test_auto_never_prices_its_kernels_slower_than_mlx_lm(tmp_path, monkeypatch):
    """What `auto` runs per op is ours only where ours is modelled faster beyond the error, so
    its kernels never sum above mlx-lm's (MLX's real kernels); "metal" runs ours everywhere."""
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "none"))    # the shipped defaults only
    config = defaults.MODELS[0]
    glue = GlueCounts(config, 512)
    for name in ("m1", "m3-max-40"):
        s = step_price.steps(config, 512, devices.get(name), glue)
        assert s["ours (auto)"].kernels_s <= s["mlx-lm"].kernels_s * (1 + 1e-9)
        assert s["mlx-lm"].glue_s > 0 and s["ours (metal)"].kernels_s != s["mlx-lm"].kernels_s


def test_the_readme_summary_spans_the_devices_ratios(md):
    """The README's table: one row per model and context, each ratio to mlx-lm from the lowest
    device's to the highest's (hand-checked numbers), dispatches per layer from the step."""
    def row(device, auto, metal, theirs):
        step = lambda tps, dispatches: step_price.Step(kernels_s=1 / tps, glue_s=0.0, dispatches=dispatches)
        return {"model": "m", "context": 512, "device": device, "layers": 2, "ours (auto)": step(auto, 14),
                "ours (metal)": step(metal, 14), "mlx-lm": step(theirs, 42)}
    lines = md.summary([row("a", 110, 200, 100), row("b", 100, 150, 100), row("c", 105, 300, 150)])
    assert lines[2:] == ["| m | 512 | 0.70x to 1.10x | 1.50x to 2.00x | 7, 21 |"]


def test_our_path_counts_each_op_by_the_side_that_runs_it():
    """llama's decode layer on the Metal path, hand-counted: with every op ours, one dispatch
    besides the priced kernels (the K/V cache write); an op run by MLX's op brings its own: q/k/v
    the norm, RoPE on q and on k and the stacking of k and v for the write (4), gate/up the norm
    and the compiled activation-times-up (2), o_proj or down_proj the residual add (1 each), attention
    none; the engine's mixed steps add up."""
    llama = dict(defaults.MODELS[1], num_hidden_layers=2)
    glue = GlueCounts(llama, 512)
    roles = {role: n for role, n in ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 4),
                                     (("mlp.gate_proj", "mlp.up_proj"), 2), (("self_attn.o_proj",), 1),
                                     (("mlp.down_proj",), 1), ("attention", 0))}
    assert glue.ours().per_layer == 1
    for role, n in roles.items():
        assert glue.ours({role}).per_layer == 1 + n, role
    assert glue.ours(set(roles)).per_layer == 1 + sum(roles.values())
    assert glue.ours().outside == glue.ours(set(roles)).outside == glue.mlx_lm.outside


def test_a_step_mixing_our_fused_ops_and_mlxs_is_priced_op_by_op(tmp_path, monkeypatch):
    """`auto` with a measured gate_up bucket faster than MLX's (no other fused op of the
    built-in model ours on the m1) runs gate_up ours and norm_qkv's job as MLX's composition:
    the step prices each op by the side that runs it and counts the dispatches of that mix
    (MLX's compositions' but for the gated MLP's norm and compiled activation-times-up)."""
    from metalforge import results
    from metalforge.engine.ops import Kernels
    from metalforge.kernels.families import get as get_family
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path))
    config, device = defaults.MODELS[0], devices.get("m1")
    gated = next(v for op, v, _ in step_price.step_ops(config, 512) if op == "gated_mlp")
    fam = get_family("gate_up")
    shape = fam.shape(fam.op_shape(gated))
    entry = results.Entry(shape=dict(shape.__dict__), dtype=step_price.DTYPE, config=dict(fam.default_config()), time_s=1e-5,
                          timer="metal", baseline_s=2e-5, speedup=2.0)
    results.save_entries(tmp_path / "m1.yaml", device, [("gate_up", fam.bucket_key(shape, step_price.DTYPE), entry)])
    auto = Kernels("emulator", device)
    auto.by_evidence = True
    ran = {op: auto.decide(op, v, step_price.DTYPE).family for op, v, _ in step_price.step_ops(config, 512)}
    assert ran["gated_mlp"] == "gate_up" and ran["attention_input"] is None, ran
    glue = GlueCounts(config, 512)
    s = step_price.steps(config, 512, device, glue)
    mix = {role for role in glue.roles.all() if role != ("mlp.gate_proj", "mlp.up_proj")}
    per_layer = glue.ours(mix).per_layer
    assert per_layer == glue.ours(set(glue.roles.all())).per_layer - 2
    layers = config["num_hidden_layers"]
    assert s["ours (auto)"].glue_s == pytest.approx(
        step_price.glue_cost(config, per_layer * layers + glue.ours().outside, device).shipped_seconds())
    assert s["ours (auto)"].kernels_s != s["mlx-lm"].kernels_s, "gate_up priced as ours"
