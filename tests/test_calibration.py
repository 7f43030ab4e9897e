"""Published whole-model speeds (kernels/model_measurements.py: the data file's schema and sources),
and what remains of the old analytic model (kernels/calibration.py, kernels/cost.py: prefill's
price until it moves to the per-kernel model): its shipped constants are its fit of the data, the
fit recovers constants it must, a decode step priced by hand."""
import dataclasses

import pytest
import yaml

from metalforge import devices, files
from metalforge.errors import MetalforgeError
from metalforge.kernels import calibration as cal
from metalforge.kernels import cost, model_measurements
from metalforge.kernels.model_measurements import DATA


@pytest.fixture(scope="module")
def points():
    return model_measurements.load_points(DATA)


def test_every_point_has_a_source_a_date_and_a_known_chip(points):
    raw = yaml.safe_load(DATA.read_text())["points"]
    assert len(points) == len(raw) >= 40
    assert len({p.chip for p in points}) >= 8
    for kind in model_measurements.KINDS:
        assert sum(p.kind == kind for p in points) >= 15
    for p, r in zip(points, raw):
        assert p.source.startswith("https://github.com/") and p.date[:4] in ("2023", "2024", "2025", "2026")
        assert p.software and p.weights and p.tokens_per_s > 0
        profile = devices.get(p.chip)
        # a core count other than the profile's, or one the source does not state, says why
        if p.gpu_cores != profile.gpu_cores:
            assert r.get("note") or r.get("inferred")


def test_a_point_without_a_source_is_refused(tmp_path):
    data = yaml.safe_load(DATA.read_text())
    del data["points"][3]["source"]
    bad = tmp_path / "m.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(MetalforgeError, match=r"points\[3\]: missing source"):
        model_measurements.load_points(bad)
    data["points"][3]["source"] = "a forum post"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(MetalforgeError, match="source must be a URL"):
        model_measurements.load_points(bad)


def test_the_shipped_constants_are_the_fit_of_the_shipped_data():
    """kernels/calibration.yaml is the old model's fit of the data file (benchmarks/calibrate.py
    wrote it before it moved to the per-kernel model), its held-out error at most 15%."""
    fitted = cal.calibrate(DATA)
    shipped = cost.calibration()
    assert fitted.data == shipped.data == files.digest(DATA)
    written = yaml.safe_load(fitted.to_yaml())
    on_disk = yaml.safe_load(cost.calibration_path().read_text())
    # The same fit to within floating-point noise (another BLAS or numpy moves the 12th digit).
    assert written.keys() == on_disk.keys() and written["held_out_error"] == on_disk["held_out_error"]
    flat = lambda d: {k: v for k, v in d.items() if not isinstance(v, dict)} | \
        {f"{k}.{j}": w for k, v in d.items() if isinstance(v, dict) for j, w in v.items()}
    assert flat(written["constants"]).keys() == flat(on_disk["constants"]).keys()
    for name, value in flat(written["constants"]).items():
        assert value == pytest.approx(flat(on_disk["constants"])[name], rel=1e-9), name
    assert set(shipped.held_out_error) == {"decode", "prefill"}
    assert all(0 < e <= 0.15 for e in shipped.held_out_error.values())


def test_the_fit_recovers_the_constants_that_made_the_data(points):
    """Points whose speeds were produced by known constants are fitted back to those constants."""
    truth = cost.Constants(bandwidth_factor=1.1, core_seconds_per_byte=0.05, layer_overhead_s=40e-6,
                           compute_factor={"before_m3": 1.7, "m3_on": 1.3})
    synthetic = [dataclasses.replace(p, tokens_per_s=cal.predict(p, truth)) for p in points]
    got = cal.fit(synthetic)
    assert got.bandwidth_factor == pytest.approx(1.1, rel=1e-6)
    assert got.core_seconds_per_byte == pytest.approx(0.05, rel=1e-6)
    assert got.layer_overhead_s == pytest.approx(40e-6, rel=1e-6)
    assert got.compute_factor == pytest.approx({"before_m3": 1.7, "m3_on": 1.3}, rel=1e-6)
    assert cal.held_out_error(synthetic) == {"decode": pytest.approx(0, abs=1e-9),
                                             "prefill": pytest.approx(0, abs=1e-9)}


def test_decode_prediction_by_hand():
    """One decode step of a 32-layer model on an M4 (10 cores, 1.58 GHz, 120 GB/s), worked out on
    paper: 4 GB of weights at A=1, B=0 -> 4e9 / 120e9 s = 33.33 ms, plus 32 x 0.5 ms = 16 ms."""
    sizes = cal.ModelSizes(params_b=8.0, layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                            vocab=1000, tied=True)
    p = cal.Point(chip="m4", gpu_cores=10, kind="decode", model="x", sizes=sizes, weight_gib=4e9 / 2**30,
                  tokens_per_s=1.0, source="https://example.org", date="2026", software="x", context=0)
    c = cost.Constants(1.0, 0.0, 0.5e-3, {"before_m3": 1.0, "m3_on": 1.0})
    assert 1 / cal.predict(p, c) == pytest.approx(4e9 / 120e9 + 32 * 0.5e-3)
    # and the per-kernel model prices the same bytes the same way
    assert cost.memory_seconds(4e9, devices.get("m4"), c) == pytest.approx(4e9 / 120e9)


def test_a_damaged_calibration_says_how_to_rebuild_it(tmp_path, monkeypatch):
    bad = tmp_path / "calibration.yaml"
    bad.write_text("constants: [1, 2\n")
    monkeypatch.setattr(cost, "calibration_path", lambda: bad)
    cost.calibration.cache_clear()
    try:
        with pytest.raises(MetalforgeError, match="ships with metalforge .no longer fitted.: reinstall metalforge"):
            cost.calibration()
    finally:
        cost.calibration.cache_clear()
