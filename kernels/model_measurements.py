"""Published whole-model speeds on Apple chips (benchmarks/data/apple_measurements.yaml), checked:
the tokens per second the per-kernel prices, summed over a decode step, answer to
(engine/whole_model.py). Every point names its source, a known chip and model; every model its
config.json facts and the file they come from. The facts are read here as data: the model's
architecture (engine/models/) reads them as a config.json when a step is priced.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from metalforge import devices, files
from metalforge.errors import MetalforgeError

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "apple_measurements.yaml"
KINDS = ("decode", "prefill")
REQUIRED = ("chip", "gpu_cores", "kind", "model", "weight_gib", "tokens_per_s", "source", "date", "software")
MODEL_REQUIRED = ("source", "params_b", "config")
# config.json fields every architecture needs (engine/config.py's sizes; the rest have defaults)
CONFIG_REQUIRED = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "vocab_size")


@dataclass(frozen=True)
class ModelFacts:
    """A measured model: its config.json facts, the URL they were copied from, and the parameter
    count (billions) the measurement's source states."""

    config: dict
    source: str
    params_b: float


@dataclass(frozen=True)
class Point:
    """One published measurement (see the data file's header for the fields)."""

    chip: str
    gpu_cores: int
    kind: str
    model: str
    facts: ModelFacts
    weight_gib: float
    tokens_per_s: float
    source: str
    date: str
    software: str
    weights: str = ""
    tokens: int = 0
    chunk: int = 0
    context: float = 0.0

    @property
    def device(self):
        return dataclasses.replace(devices.get(self.chip), gpu_cores=self.gpu_cores)


def load_points(path=DATA) -> list[Point]:
    """The measurements file, checked: every point names its source, a known chip and model."""
    data = files.read_yaml(path, "measurements")
    models = {name: _facts(f"{path}: models.{name}", m) for name, m in (data.get("models") or {}).items()}
    points = []
    for i, p in enumerate(data.get("points") or []):
        at = f"{path}: points[{i}]"
        missing = [k for k in REQUIRED if k not in p]
        if missing:
            raise MetalforgeError(f"{at}: missing {', '.join(missing)}")
        if not str(p["source"]).startswith("https://"):
            raise MetalforgeError(f"{at}: source must be a URL")
        files.require_one_of(at, "kind", p["kind"], KINDS)
        if p["model"] not in models:
            raise MetalforgeError(f"{at}: unknown model {p['model']!r}")
        devices.get(p["chip"])
        need = ("tokens", "chunk") if p["kind"] == "prefill" else ("context",)
        if any(k not in p for k in need):
            raise MetalforgeError(f"{at}: a {p['kind']} point needs {', '.join(need)}")
        points.append(Point(chip=p["chip"], gpu_cores=int(p["gpu_cores"]), kind=p["kind"], model=p["model"],
                            facts=models[p["model"]], weight_gib=float(p["weight_gib"]),
                            tokens_per_s=float(p["tokens_per_s"]), source=p["source"], date=str(p["date"]),
                            software=str(p["software"]), weights=str(p.get("weights", "")), tokens=int(p.get("tokens", 0)),
                            chunk=int(p.get("chunk", 0)), context=float(p.get("context", 0))))
    return points


def _facts(at: str, m) -> ModelFacts:
    if not isinstance(m, dict):
        raise MetalforgeError(f"{at}: expected a mapping with {', '.join(MODEL_REQUIRED)}")
    missing = [k for k in MODEL_REQUIRED if k not in m]
    if missing:
        raise MetalforgeError(f"{at}: missing {', '.join(missing)}")
    if not str(m["source"]).startswith("https://"):
        raise MetalforgeError(f"{at}: source must be a URL (the config.json the facts come from)")
    config = m["config"]
    if not isinstance(config, dict):
        raise MetalforgeError(f"{at}: config must be a mapping of config.json fields")
    missing = [k for k in CONFIG_REQUIRED if k not in config]
    if missing:
        raise MetalforgeError(f"{at}: config is missing {', '.join(missing)}")
    return ModelFacts(config=dict(config), source=str(m["source"]), params_b=float(m["params_b"]))
