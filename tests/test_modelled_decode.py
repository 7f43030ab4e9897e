"""benchmarks/modelled_decode.py: the decode step's kernels as the op plan holds them, the other
dispatches as mlx-lm's graph launches them (hand-counted), and `auto` never priced slower than
mlx-lm on the kernels it picks."""
import importlib.util
import sys
from pathlib import Path

import pytest

from metalforge import devices
from metalforge.tuner import defaults

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def md():
    spec = importlib.util.spec_from_file_location("modelled_decode", ROOT / "benchmarks" / "modelled_decode.py")
    module = sys.modules["modelled_decode"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_ops_hold_each_linear_as_often_as_the_model(md):
    """Llama-3-8B-sized, as the engine's Metal path runs a decode step: per layer q/k/v in one
    norm_qkv, gate and up (14336 x 4096) in one gate_up, o (4096 x 4096) and down (4096 x 14336)
    with their residual adds; the LM head once; attention once a layer."""
    ops = {(op, v.get("N"), v.get("K")): n for op, v, n in md.step_ops(defaults.MODELS[1], 4096)}
    assert ops == {("attention_input", None, 4096): 32, ("gated_mlp", 14336, 4096): 32,
                   ("linear", 4096, 4096): 32, ("linear", 4096, 14336): 32, ("linear", 128256, 4096): 1,
                   ("attention", None, None): 32}
    attention = [v for op, v, _ in md.step_ops(defaults.MODELS[1], 4096) if op == "attention"][0]
    assert attention["context"] == 4096 and attention["new"] == 1


def test_mlx_lm_glue_matches_a_hand_count(md):
    """mlx-lm's llama decode layer, steady step (no cache growth): 2 rms_norm, 2 rope, 2 cache
    slice-updates, 2 residual adds and the compiled SwiGLU: 9 dispatches besides its 7 quantized
    matmuls and one attention (the attention output's transpose moves only its size-1 token axis,
    so its reshape copies nothing); qwen2 adds its q/k/v bias adds."""
    llama = dict(defaults.MODELS[1], num_hidden_layers=2)
    assert md.glue(llama, 512)["mlx-lm"].per_layer == 9
    assert md.glue(defaults.MODELS[0], 512)["mlx-lm"].per_layer == 12


def test_auto_never_prices_its_kernels_slower_than_mlx_lm(md, tmp_path, monkeypatch):
    """What `auto` runs per op is ours only where ours is modelled faster beyond the error, so
    its kernels never sum above mlx-lm's (MLX's real kernels); "metal" runs ours everywhere."""
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "none"))    # the shipped defaults only
    config = defaults.MODELS[0]
    glue = md.glue(config, 512)
    for name in ("m1", "m3-max-40"):
        s = md.steps(config, 512, devices.get(name), glue)
        assert s["ours (auto)"].kernels_s <= s["mlx-lm"].kernels_s * (1 + 1e-9)
        assert s["mlx-lm"].glue_s > 0 and s["ours (metal)"].kernels_s != s["mlx-lm"].kernels_s


def test_the_readme_summary_spans_the_devices_ratios(md):
    """The README's table: one row per model and context, each ratio to mlx-lm from the lowest
    device's to the highest's (hand-checked numbers), dispatches per layer from the step."""
    def row(device, auto, metal, theirs):
        step = lambda tps, dispatches: md.Step(kernels_s=1 / tps, glue_s=0.0, dispatches=dispatches)
        return {"model": "m", "context": 512, "device": device, "layers": 2, "ours (auto)": step(auto, 14),
                "ours (metal)": step(metal, 14), "mlx-lm": step(theirs, 42)}
    lines = md.summary([row("a", 110, 200, 100), row("b", 100, 150, 100), row("c", 105, 300, 150)])
    assert lines[2:] == ["| m | 512 | 0.70x to 1.10x | 1.50x to 2.00x | 7, 21 |"]
