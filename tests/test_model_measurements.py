"""Published whole-model speeds (kernels/model_measurements.py): the data file's schema and
sources. The per-kernel model's whole-model check on them is in tests/test_trace_model.py."""
import pytest
import yaml

from metalforge import devices
from metalforge.errors import MetalforgeError
from metalforge.kernels import model_measurements
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


def test_every_model_is_its_config_json_and_its_parameter_count_is_the_sources(points):
    """Each model's facts name the config.json they were copied from, its architecture reads them,
    and the architecture's own parameter count agrees with the count the measurements' sources
    state within 1.5% (an independent check of the transcription)."""
    from metalforge.engine import models
    for name, facts in {p.model: p.facts for p in points}.items():
        assert facts.source.startswith("https://huggingface.co/") and facts.source.endswith("/config.json"), name
        args = models.parse(facts.config, name)
        counted = models.get(args.model_type).parameter_count(args) / 1e9
        assert counted == pytest.approx(facts.params_b, rel=0.015), name


def test_a_model_without_its_config_facts_is_refused(tmp_path):
    data = yaml.safe_load(DATA.read_text())
    bad = tmp_path / "m.yaml"
    del data["models"]["llama-7b"]["config"]["intermediate_size"]
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(MetalforgeError, match=r"models\.llama-7b: config is missing intermediate_size"):
        model_measurements.load_points(bad)
    data["models"]["llama-7b"]["source"] = "huggyllama"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(MetalforgeError, match=r"models\.llama-7b: source must be a URL"):
        model_measurements.load_points(bad)
