"""Which implementation runs our kernels: Metal on a Mac, the emulator elsewhere, overridable."""
import mlx.core as mx
import pytest

from metalforge.errors import MetalforgeError
from metalforge.kernels import backends


def test_auto_picks_metal_only_where_metal_exists(monkeypatch):
    monkeypatch.delenv("METALFORGE_BACKEND", raising=False)
    assert backends.resolve() == ("metal" if mx.metal.is_available() else "emulator")
    assert backends.resolve("auto") == backends.resolve()


def test_argument_and_environment_override(monkeypatch):
    monkeypatch.setenv("METALFORGE_BACKEND", "emulator")
    assert backends.resolve() == "emulator"
    assert backends.resolve("EMULATOR") == "emulator"
    monkeypatch.setenv("METALFORGE_BACKEND", "vulkan")
    with pytest.raises(MetalforgeError, match="unknown backend 'vulkan'; valid backends: auto, metal, emulator"):
        backends.resolve()


@pytest.mark.skipif(mx.metal.is_available(), reason="this machine has Metal")
def test_metal_off_a_mac_is_a_clear_error():
    with pytest.raises(MetalforgeError, match="needs a Mac with Metal"):
        backends.resolve("metal")


def test_one_vocabulary_for_kernels_and_the_engine(monkeypatch):
    """`mlx` (MLX's built-ins) is a choice only where a caller can use MLX's ops instead of ours;
    both honour METALFORGE_BACKEND."""
    monkeypatch.delenv("METALFORGE_BACKEND", raising=False)
    assert backends.resolve(allow_mlx=True) == ("metal" if mx.metal.is_available() else "mlx")
    assert backends.resolve("mlx", allow_mlx=True) == "mlx"
    with pytest.raises(MetalforgeError, match="unknown backend 'mlx'; valid backends: auto, metal, emulator$"):
        backends.resolve("mlx")
    monkeypatch.setenv("METALFORGE_BACKEND", "emulator")
    assert backends.resolve(allow_mlx=True) == "emulator"


def test_the_engine_chooses_by_evidence_only_when_nobody_asked(monkeypatch):
    """`auto` on a Mac weighs the evidence per op; a backend asked for by argument or by
    METALFORGE_BACKEND is obeyed wherever a family serves the shape."""
    from metalforge.engine.ops import Kernels
    monkeypatch.delenv("METALFORGE_BACKEND", raising=False)
    assert not Kernels("emulator", None).by_evidence
    monkeypatch.setenv("METALFORGE_BACKEND", "emulator")
    assert not Kernels(None, None).by_evidence
    assert Kernels(None, None).backend == "emulator"


def test_the_evidence_rule(tmp_path, monkeypatch):
    """Ours where a Metal measurement says it beats MLX's built-in, or where a modelled gain over
    MLX's real kernel is larger than the family's per-kernel error; MLX's op where the measurement
    says slower, the modelled gain is within the error, the ratio was modelled against a hand
    description of MLX's kernel, or the family has no kernel-level data; MLX's op for shapes no
    family serves."""
    from metalforge import devices, results
    from metalforge.engine.ops import Kernels
    from metalforge.kernels import get_family
    from metalforge.kernels.timing import fit
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "none"))
    qmv = get_family("qmv")
    err = fit.family_error("qmv")
    assert err is not None and qmv.model_error() == err
    real = {"baseline_kernel": "affine_qmv_fast_float16_t_gs_64_b_4_batch_0_pr_0_hgs_0_r_4"}
    def entry(n, timer, speedup, **more):
        shape = dict(M=1, N=n, K=256, bits=4, group_size=64)
        return ("qmv", qmv.bucket_key(shape, "float16"),
                {"shape": shape, "dtype": "float16", "config": qmv.default_config(), "time_s": 1e-5,
                 "timer": timer, "baseline_s": 1e-5 * speedup, "speedup": speedup, "trials": {}, **more})
    path = tmp_path / "m3.yaml"
    results.save_entries(path, "m3", [entry(64, "metal", 1.3), entry(128, "metal", 0.8),
                                      entry(256, "model", 3.0, **real),
                                      entry(512, "model", 1 + err / 2, **real),
                                      entry(1024, "model", 3.0, model_error=0.08),   # against a hand description
                                      entry(2048, "model", 0.5, **real)])
    kernels = Kernels("emulator", devices.get("m3"), results=path)
    kernels.by_evidence = True    # what `auto` does on a Mac
    why = lambda n, bits=4: kernels.decide("linear", dict(M=1, N=n, K=256, bits=bits, group_size=64), "float16").why
    assert why(64).startswith("ours: measured 1.30x")
    assert why(128) == "MLX: measured 0.80x: the bucket ships MLX's"
    assert why(256).startswith(f"ours: modelled 3.00x (model error {err:.0%})")
    assert why(512) == f"MLX: modelled, within model error ({err:.0%})"
    assert why(1024) == "MLX: modelled against a description of MLX's kernel, not MLX's real kernel: no evidence"
    assert why(2048) == f"MLX: MLX's kernel modelled faster (0.500x, model error {err:.0%}): the bucket ships MLX's"
    assert "bits=7 is not supported" in why(64, bits=7) and why(64, bits=7).startswith("MLX: ")


def test_a_family_without_kernel_level_data_is_no_evidence(tmp_path, monkeypatch):
    """gate_up has no published kernel timing of its own: its modelled gains print no ratio and
    never route to our kernel; a Metal measurement still does."""
    from metalforge import devices, results
    from metalforge.engine.ops import Kernels
    from metalforge.kernels import get_family
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "none"))
    fam = get_family("gate_up")
    assert fam.model_error() is None
    def entry(n, timer):
        shape = dict(M=1, N=n, K=256, bits=4, group_size=64)
        return ("gate_up", fam.bucket_key(shape, "float16"),
                {"shape": shape, "dtype": "float16", "config": fam.default_config(), "time_s": 1e-5, "timer": timer,
                 "baseline_s": 5e-5, "speedup": 5.0, "trials": {}, "baseline_kernel": "affine_qmv"})
    path = tmp_path / "m3.yaml"
    results.save_entries(path, "m3", [entry(64, "model"), entry(128, "metal")])
    kernels = Kernels("emulator", devices.get("m3"), results=path)
    kernels.by_evidence = True
    why = lambda n: kernels.decide("gated_mlp", dict(M=1, N=n, K=256, bits=4, group_size=64), "float16").why
    assert why(64) == "MLX: modelled, unvalidated (no per-kernel measurements of this family)"
    assert why(128).startswith("ours: measured 5.00x")


def test_among_families_serving_a_shape_the_evidence_picks(tmp_path, monkeypatch):
    """Four rows: both qmv and qmm serve them. By evidence the family with the larger gain over
    MLX runs, a measured gain before a modelled one; asked for, the op's first family runs."""
    from metalforge import devices, results
    from metalforge.engine.ops import Kernels
    from metalforge.kernels import get_family
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "none"))

    def entry(family, n, timer, speedup):
        fam, shape = get_family(family), dict(M=4, N=n, K=256, bits=4, group_size=64)
        return (family, fam.bucket_key(shape, "float16"),
                {"shape": shape, "dtype": "float16", "config": fam.default_config(), "time_s": 1e-5,
                 "timer": timer, "baseline_s": 1e-5 * speedup, "speedup": speedup, "trials": {},
                 **({"model_error": 0.08} if timer == "model" else {})})
    path = tmp_path / "m3.yaml"
    results.save_entries(path, "m3", [entry("qmv", 64, "metal", 1.5), entry("qmm", 64, "metal", 2.0),
                                      entry("qmv", 128, "model", 3.0), entry("qmm", 128, "metal", 1.2)])
    kernels = Kernels("emulator", devices.get("m3"), results=path)
    decide = lambda n: kernels.decide("linear", dict(M=4, N=n, K=256, bits=4, group_size=64), "float16")
    assert kernels.decide("linear", dict(M=4, N=64, K=256, bits=4, group_size=64), "float16").family == "qmv"
    kernels = Kernels("emulator", devices.get("m3"), results=path)
    kernels.by_evidence = True    # what `auto` does on a Mac
    assert decide(64).family == "qmm" and decide(64).why.startswith("ours: measured 2.00x")
    assert decide(128).family == "qmm", "a measured gain before a modelled one"
    results.save_entries(tmp_path / "slower.yaml", "m3", [entry("qmv", 64, "metal", 0.9)])
    kernels = Kernels("emulator", devices.get("m3"), results=tmp_path / "slower.yaml")
    kernels.by_evidence = True
    assert decide(64).family is None and decide(64).why == "MLX: measured 0.90x: the bucket ships MLX's", "the first family's reason"


@pytest.mark.parametrize("device", ["m1", "m3-max-40"])
def test_a_prompt_projection_runs_qmm_from_its_shipped_entry(device, tmp_path, monkeypatch):
    """The built-in model's projections at a 128-token prompt: the engine's prompt path takes
    qmm's config from the shipped file's exact bucket (asked for), and `auto` on a Mac decides by
    that entry's evidence against MLX's real kernel."""
    from metalforge import devices, results
    from metalforge.engine.ops import Kernels
    from metalforge.kernels import get_family
    from metalforge.results.entry import Entry
    from metalforge.tuner import shapes
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "none"))
    fam, dev = get_family("qmm"), devices.get(device)
    shipped = results.load(results.store.shipped_path(device))["entries"]["qmm"]
    prompt = shapes.from_model_config(shapes.BUILTIN_MODEL, prefill=(128,))["qmm"]
    assert len(prompt) == 4
    asked, auto = Kernels("emulator", dev), Kernels("emulator", dev)
    auto.by_evidence = True
    for values in prompt:
        entry = shipped[fam.bucket_key(fam.shape(values), "float16")]
        d = asked.decide("linear", values, "float16")
        assert d.family == "qmm" and d.config == fam.config(entry["config"])
        assert "exact match" in d.why and entry["baseline_kernel"].startswith("affine_qmm_t")
        faster, words = Entry.of(entry).evidence(fam.model_error())
        why = auto.decide("linear", values, "float16").why
        assert why.startswith(f"ours: {words} (exact match ") if faster else why == f"MLX: {words}"


def test_a_prompt_bucket_of_qmm_is_no_evidence_for_a_decode_row(tmp_path, monkeypatch):
    """qmm serves one row too, but its shipped buckets are prompts' (128 rows and more): their
    configs and ratios against MLX's qmm_t are not borrowed for the rows qmv serves, where MLX
    runs a mat-vec kernel; a bucket of qmm at 4 rows still is (test above)."""
    from metalforge import devices
    from metalforge.engine.ops import Kernels
    from metalforge.kernels.quantized import VECTOR_ROWS
    from metalforge.results import lookup
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "none"))
    row = dict(M=1, N=896, K=896, bits=4, group_size=64)
    for m in (1, VECTOR_ROWS):
        assert lookup("m1", "qmm", {**row, "M": m}, "float16").entry is None
    assert lookup("m1", "qmm", {**row, "M": VECTOR_ROWS + 1}, "float16").source == "nearest"
    auto = Kernels("emulator", devices.get("m1"))
    auto.by_evidence = True
    assert auto.decide("linear", row, "float16").family != "qmm"
