"""`metalforge bench`: off a Mac it says it needs Metal and exits 2; its measuring pipeline (the
chosen config verified, then timed side by side with MLX's built-in by one timer, written as
measured results that merge by the usual rules, and a report) runs here on the emulator."""
import json
import subprocess
import sys

import pytest

from metalforge import devices, results
from metalforge.tuner import bench
from metalforge.tuner.shapes import Target
from metalforge.tuner.timers import MetalTimer


@pytest.mark.skipif(__import__("mlx.core").core.metal.is_available(), reason="this machine has Metal")
def test_off_a_mac_bench_needs_metal_and_exits_2():
    p = subprocess.run([sys.executable, "-m", "metalforge.cli", "bench"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "needs" not in p.stdout
    assert "no Metal device" in p.stderr and "metalforge tune" in p.stderr


def test_the_measuring_pipeline_on_the_emulator(tmp_path, monkeypatch):
    """The same code a Mac runs, with the emulator as the backend: every row verified and timed
    against MLX's op; the entries written from it merge over a modelled entry (measured beats
    modelled) and the report names every row. (Timings here are CPU wall clock, which is why the
    command itself refuses to run without Metal.)"""
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "user"))
    device = devices.get("m3")
    targets = [Target("qmv", dict(M=1, N=64, K=256, bits=4, group_size=64), "float32"),
               Target("decode_attention", dict(B=1, Hq=4, Hkv=2, S=64, D=64), "float32")]
    lines = []
    rows = bench.kernel_rows(targets, device, backend="emulator",
                             timer=MetalTimer(warmup=1, budget_s=0.0, min_repeats=2), progress=lines.append)
    assert [r.target.family.name for r in rows] == ["qmv", "decode_attention"]
    assert all(r.ours_s > 0 and r.mlx_s > 0 and r.speedup == r.mlx_s / r.ours_s for r in rows)
    assert len(lines) == 2 and lines[0].startswith("[1/2] qmv")

    path = tmp_path / "bench.yaml"
    modelled = results.Entry(shape=dict(targets[0].shape.__dict__), dtype="float32", config=rows[0].config,
                             time_s=1e-9, timer="model", baseline_s=1e-6, speedup=1000.0, model_error=0.07)
    results.save_entries(path, device, [("qmv", targets[0].bucket, modelled)])
    data = results.save_entries(path, device, bench.measured_entries(rows))
    kept = data["entries"]["qmv"][targets[0].bucket]
    assert kept["timer"] == "metal" and kept["time_s"] == rows[0].ours_s   # measured beats a faster model
    assert kept["source"] == "metalforge bench"
    assert results.load(path)["entries"]["decode_attention"]

    report = bench.markdown(device, "emulator", rows, None, "two test shapes")
    assert "Apple M3" in report and "`emulator` timing" in report
    for r in rows:
        assert f"| {r.target.family.name} | {r.target.bucket.split('|')[0]} |" in report
        assert f"{r.speedup:.2f}x" in report


def test_end_to_end_figures_become_calibration_points(tmp_path):
    """A model's engine figures (here on MLX's CPU backend) written as points of the calibration
    data file: once given the URL they are published at, the calibration loader takes them; the
    parameter count is the (unquantized) weights' own element count."""
    import mlx.core as mx
    import yaml
    from metalforge.testing import write_model
    from metalforge.kernels import model_measurements
    folder = write_model(tmp_path / "tiny", layers=2, hidden=64, heads=4, kv_heads=2, inter=128, vocab=256,
                         tokenizer=True)
    e2e = bench.end_to_end(folder, prompt_tokens=12, decode_tokens=4, workdir=tmp_path, backend="mlx")
    data = bench.calibration_points(folder, devices.get("m4"), e2e, 12, 4)
    weights = {}
    for f in folder.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    assert data["models"]["tiny"]["params_b"] == round(sum(v.size for v in weights.values()) / 1e9, 4)
    decode, prefill = data["points"]
    assert decode["tokens_per_s"] == round(e2e["metalforge"]["decode_tokens_per_s"], 3)
    assert prefill["tokens_per_s"] == round(12 / e2e["metalforge"]["ttft_cold_s"], 3)
    # kernels per decode token beside tokens/s, both sides, in the report too
    ours, theirs = e2e["dispatches"]["metalforge"], e2e["dispatches"]["mlx-lm"]
    assert ours["per_token"] > 2 * ours["per_layer"] > 0 and theirs["per_token"] > 2 * theirs["per_layer"] > 0
    assert ours["host_syncs"] == theirs["host_syncs"] == 0
    report = bench.markdown(devices.get("m4"), "mlx", [], e2e, "a tiny model")
    assert f"| kernels per decode token (counted) | {ours['per_token']} | {theirs['per_token']} | " \
           f"{theirs['per_token'] / ours['per_token']:.2f}x |" in report
    path = tmp_path / "points.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="source must be a URL"):
        model_measurements.load_points(path)
    data["models"]["tiny"]["source"] = "https://example.org/tiny/config.json"
    for p in data["points"]:
        p["source"] = "https://example.org/my-m4-report"
    path.write_text(yaml.safe_dump(data))
    points = model_measurements.load_points(path)
    assert [p.kind for p in points] == ["decode", "prefill"] and points[0].chip == "m4"
    # the model is its folder's config.json, quantization included: the whole-model check reads it as is
    assert points[0].facts.config == json.loads((folder / "config.json").read_text())
