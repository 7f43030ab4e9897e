"""Never ship slower than MLX's kernel: where MLX's real kernel is modelled (or measured) faster
than our best config, the results entry ships "mlx" and the engine's op layer runs MLX's op
there; the verdicts of the parity table (benchmarks/parity.py)."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from metalforge import devices, results
from metalforge.errors import MetalforgeError
from metalforge.kernels import get_family
from metalforge.kernels.timing import compare, fit, gate

ROOT = Path(__file__).resolve().parents[1]
DECODE = dict(B=1, Hq=14, Hkv=2, S=512, D=64, block_size=16, num_blocks=0)


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)   # its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def test_a_bucket_where_mlx_is_modelled_faster_ships_mlx(tmp_path, monkeypatch):
    """A real bucket (the built-in model's decode at 4,096 tokens on an M1) and a poor config of
    ours (one SIMD-group, no splits: 4,096 keys walked by 32 lanes), priced against MLX's
    sdpa_vector by the same per-kernel model: MLX's is faster, the entry ships "mlx", and the
    engine's `auto` decision runs MLX's op there and says why. (The tuner never writes such an
    entry - MLX's configuration is in every study, tests/test_mlx_config.py - but a results file
    a user merges may hold one.)"""
    from metalforge.engine.ops import Kernels
    from metalforge.kernels.timing.compare import priced_entry
    from metalforge.results import Entry
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "none"))
    fam = get_family("decode_attention")
    decode = dict(DECODE, S=4096)
    shape = fam.shape(decode)
    poor = fam.config({"threads": 32, "splits": 1})
    e = priced_entry(fam, shape, "float16", devices.get("m1"),
                     Entry(shape=dict(shape.__dict__), dtype="float16", config=dict(poor), time_s=1.0, timer="model",
                           baseline_s=None, speedup=None, trials={}).to_dict())
    r = compare.compare("decode_attention", devices.get("m1"), decode, config=poor)
    mlx = r["mlx"]
    assert r["verdict"] == gate.MLX_RUNS and f"verdict:     {gate.MLX_RUNS}" in compare.format_text(r)
    assert e["baseline_kernel"] == mlx["kernel"] and e["baseline_kernel"].startswith("sdpa_vector")
    assert e["baseline_s"] == pytest.approx(mlx["seconds"])
    assert e["baseline_s"] < e["time_s"] and e["ships"] == "mlx"
    path = tmp_path / "m1.yaml"
    results.save_entries(path, "m1", [("decode_attention", fam.bucket_key(shape, "float16"), e)])
    assert results.load(path)["entries"]["decode_attention"][fam.bucket_key(shape, "float16")]["ships"] == "mlx"
    # only this entry: the shipped m1 file's own (searched) entry for the engine's paged bucket is faster
    monkeypatch.setattr(sys.modules["metalforge.results.lookup"], "shipped_path", lambda device: tmp_path / "shipped" / f"{device}.yaml")
    kernels = Kernels("emulator", devices.get("m1"), results=path)
    kernels.by_evidence = True    # what `auto` does on a Mac
    d = kernels.decide("attention", dict(B=1, new=1, context=4096, block_size=16, Hq=14, Hkv=2, D=64), "float16")
    assert d.family is None
    assert d.why.startswith("MLX: MLX's kernel modelled faster (0.") and d.why.endswith("the bucket ships MLX's")


def _entry(speedup, **more):
    qmv = get_family("qmv")
    shape = dict(M=1, N=64, K=256, bits=4, group_size=64)
    return qmv.bucket_key(shape, "float16"), {
        "shape": shape, "dtype": "float16", "config": dict(qmv.default_config()), "time_s": 1e-5, "timer": "metal",
        "baseline_s": speedup and 1e-5 * speedup, "speedup": speedup, "trials": {}, **more}


def test_ships_follows_the_speedup_and_a_contradiction_is_refused(tmp_path):
    for speedup, ships in ((0.9, "mlx"), (1.0, "ours"), (1.4, "ours")):
        key, e = _entry(speedup)
        written = results.save_entries(tmp_path / f"{speedup}.yaml", "m1", [("qmv", key, e)])
        assert written["entries"]["qmv"][key]["ships"] == ships
    key, e = _entry(0.9, ships="ours")
    with pytest.raises(MetalforgeError, match=r"ships 'ours', but its speedup 0.9 says mlx"):
        results.Entry.from_dict("qmv", key, e, "m1.yaml")
    key, e = _entry(None)
    assert "ships" not in results.Entry.from_dict("qmv", key, e, "x").to_dict()     # no time for MLX: nothing said


def test_repricing_an_entry_recomputes_what_it_ships():
    """An entry that shipped ours, priced again where MLX's kernel is faster, ships "mlx"."""
    fam = get_family("decode_attention")
    shape = fam.shape(DECODE)
    old = {"shape": DECODE, "dtype": "float16", "config": dict(fam.default_config()), "time_s": 1e-6,
           "timer": "model", "baseline_s": 2e-6, "speedup": 2.0, "ships": "ours", "trials": {}}
    new = compare.priced_entry(fam, shape, "float16", devices.get("m1"), old)
    assert new["speedup"] < 1 and new["ships"] == "mlx"
    results.Entry.from_dict("decode_attention", fam.bucket_key(shape, "float16"), new, "x")   # consistent


def test_verdicts():
    err = fit.family_error("qmv")
    assert err is not None and fit.family_error("gate_up") is None
    assert gate.verdict(1 + 2 * err, "qmv") == gate.GAIN
    assert gate.verdict(1 + err / 2, "qmv") == gate.PARITY
    assert gate.verdict(1.0, "qmv") == gate.PARITY
    assert gate.verdict(1 - err / 2, "qmv") == gate.MLX_RUNS          # within the error, yet MLX's is the estimate
    assert gate.verdict(0.5, "gate_up") == gate.MLX_RUNS
    assert gate.verdict(3.0, "gate_up") == gate.UNVALIDATED


def test_parity_table_covers_every_served_family_and_the_whole_range():
    """The 8B-class model's jobs: decode at 512..32k tokens and prompts of 128..4096, each family
    the op plan serves; one real row priced as `metalforge compare` prices it."""
    parity = _load("parity")
    from metalforge.tuner import defaults
    jobs = parity.jobs(defaults.MODELS[1])
    families = {f for f, _ in jobs}
    assert {"qmv", "qmm", "decode_attention", "prefill_attention"} <= families
    assert {v["S"] for f, v in jobs if f == "decode_attention"} == set(parity.CONTEXTS)
    assert {v["L"] for f, v in jobs if f == "prefill_attention"} == set(parity.PROMPTS)
    # decode rows run the fused families: q/k/v in norm_qkv, gate and up in gate_up, o and down with
    # their residual adds in qmv; prompts' rows run qmm
    assert {(v["N"], v["K"]) for f, v in jobs if f == "qmv"} >= {(4096, 4096), (4096, 14336), (128256, 4096)}
    assert {(v["N"], v["K"]) for f, v in jobs if f == "gate_up"} == {(14336, 4096)}
    assert {(v["Hq"], v["Hkv"], v["D"], v["K"]) for f, v in jobs if f == "norm_qkv"} == {(32, 8, 128, 4096)}
    row = parity.price("8B", "m1", "decode_attention", dict(B=1, Hq=32, Hkv=8, D=128, S=4096, block_size=16,
                                                           num_blocks=0))
    r = compare.compare("decode_attention", devices.get("m1"), dict(B=1, Hq=32, Hkv=8, D=128, S=4096, block_size=16,
                                                                    num_blocks=0))
    assert row.ratio == pytest.approx(r["ratio"]) and row.verdict == gate.verdict(r["ratio"], "decode_attention")
    assert row.runs == ("ours" if row.verdict == gate.GAIN else "MLX")   # ours only on a gain beyond the error
    assert "| 8B | m1 | decode_attention |" in parity.table([row])


def test_a_family_the_timing_model_cannot_trace_yet_is_listed_not_priced():
    """gather_qmv has no MLX kernel sequence ported to the timing model (nor proxy shapes): its
    bucket is a "not priced" row that says why, not a crash of the table."""
    parity = _load("parity")
    row = parity.price("MoE", "m1", "gather_qmv", dict(M=1, N=256, K=256, bits=4, group_size=64, experts=8, top_k=2))
    assert row.ratio is None and row.runs == "MLX"
    assert row.verdict.startswith("not priced (no MLX kernel sequence is ported for family 'gather_qmv'")


def test_a_qmv_bucket_priced_slower_than_mlx_ships_and_runs_mlx(tmp_path, monkeypatch):
    """The M1 Ultra, the built-in model's down projection at 8 bits (no shipped bucket of that
    width): the config the 4-bit bucket shipped before staged x lost its bank conflicts, priced by
    the tuner's function, is slower than MLX's affine_qmv by the per-kernel model (within qmv's
    error, yet MLX's is the estimate): its entry ships "mlx" and `auto` runs MLX's op there."""
    from metalforge.engine.ops import Kernels
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "none"))
    values = dict(M=1, N=896, K=4864, bits=8, group_size=64)
    qmv = get_family("qmv")
    config = qmv.config(dict(simdgroups=4, rows_per_simdgroup=8, values_per_lane=32, stage_x=False, k_split=4,
                             load_width=4, prescaled_x=True))
    device = devices.get("m1-ultra")
    r = compare.compare("qmv", device, values, config=config)
    entry = compare.priced_entry(qmv, qmv.shape(values), "float16", device,
                                 dict(shape=values, dtype="float16", config=config, time_s=1.0, timer="model"))
    assert r["mlx"]["seconds"] < r["ours"]["seconds"] and entry["speedup"] == pytest.approx(r["ratio"])
    assert entry["ships"] == "mlx"
    path = tmp_path / "m1-ultra.yaml"
    results.save_entries(path, "m1-ultra", [("qmv", qmv.bucket_key(values, "float16"), entry)])
    kernels = Kernels("emulator", device, results=path)
    kernels.by_evidence = True
    d = kernels.decide("linear", values, "float16")
    assert d.family is None and re.match(r"MLX: MLX's kernel modelled faster \(0\.\d+x", d.why)
