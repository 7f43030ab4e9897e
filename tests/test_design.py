"""Where new things go (docs/design.md), kept true: a new kernel family is its module, its template
and one registry call, and the tuner, render, check, bench and the CLI see it; a new model type is
one new file among engine/models/, and the engine, the tuner and the op plan serve it. Both are
written here into tmp_path, nothing else of metalforge edited."""
import importlib.util
import json
import textwrap

import mlx.core as mx
import numpy as np
import pytest
import yaml

from metalforge import devices, engine, results
from metalforge.cli import main
from metalforge.engine import models
from metalforge.kernels import checks, dtypes, trace_report
from metalforge.kernels.families import FAMILIES, register
from metalforge.kernels.timing import traces
from metalforge.testing import write_model
from metalforge.tuner import bench, shapes
from metalforge.tuner.shapes import Target
from metalforge.tuner.timers import MetalTimer

TOY_FAMILY = '''
"""toy_scale: y = 2 x, V values a thread (a family written outside metalforge)."""
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from metalforge.intmath import cdiv
from metalforge.kernels import dtypes
from metalforge.kernels.family import Family, Geometry, Launch, Param
from metalforge.kernels.work import Tally


@dataclass(frozen=True)
class ToyShape:
    N: int


class ToyScale(Family):
    name = "toy_scale"
    shape_type = ToyShape
    template_folder = str(Path(__file__).parent)
    params = (Param("values_per_thread", (1, 2, 4), 1, "values each thread scales"),
              Param("threads", (32, 64), 32, "threads per threadgroup"))

    def shape_distance(self, a, b):
        return abs(math.log2(a.N / b.N))

    def buffer_elements(self, shape):
        return {"x": shape.N, "y": shape.N}

    def geometry(self, config, shape, dtype):
        t = config["threads"]
        return (Geometry((cdiv(cdiv(shape.N, config["values_per_thread"]), t) * t, 1, 1), (t, 1, 1)),)

    def launches(self, config, shape, dtype):
        d = dtypes.get(dtype)
        kernel = self._kernel(self.template, ("x",), ("y",), N=shape.N, V=config["values_per_thread"], T=d.metal)
        g, = self.geometry(config, shape, dtype)
        return [Launch(kernel, g.grid, g.threadgroup, ((shape.N,),), (d.mlx,))]

    def make_inputs(self, shape, dtype, seed=0):
        return {"x": mx.random.normal((shape.N,), key=mx.random.key(seed)).astype(dtypes.get(dtype).mlx)}

    def reference(self, shape, dtype, inp):
        return (2 * inp["x"].astype(mx.float32)).astype(dtypes.get(dtype).mlx)

    def work(self, config, shape, dtype):
        d = dtypes.get(dtype)
        g, = self.geometry(config, shape, d)
        tally, V = Tally(self.name, g), config["values_per_thread"]
        for first in range(0, g.grid[0], 32):        # each SIMD-group: V loads and V stores
            for v in range(V):
                lanes = [((t * V + v) * d.size, d.size) for t in range(first, first + 32) if t * V + v < shape.N]
                tally.device("x", lanes)
                tally.device("y", lanes)
        tally.footprint("x", shape.N * d.size)
        tally.footprint("y", shape.N * d.size)
        return [tally.counted()]
'''

TOY_TEMPLATE = '''// toy_scale N={{ N }} V={{ V }}
const uint first = thread_position_in_grid.x * {{ V }};
for (uint v = 0; v < {{ V }}; v++)
  if (first + v < {{ N }})
    y[first + v] = static_cast<{{ T }}>(2.0f * float(x[first + v]));
'''

TOY_MODEL = '''
"""toy_decoder: a model type written outside metalforge: llama's blocks under a new name, with an
args field of its own and its own layer class, paired with its Model by their names alone."""
from dataclasses import dataclass

from metalforge.engine.models import base


@dataclass(frozen=True)
class ModelArgs(base.ModelArgs):
    toy_layers: int = 0

    @classmethod
    def read(cls, config, where):
        return dict(toy_layers=config["num_hidden_layers"])


class DecoderLayer(base.DecoderLayer):
    pass


class Model(base.Model):
    pass
'''


def _import(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy_family(tmp_path):
    """The family's module and template in a folder of their own, and the one registry call."""
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy_scale.py").write_text(TOY_FAMILY)
    (folder / "toy_scale.metal.j2").write_text(TOY_TEMPLATE)
    fam = register(_import(folder / "toy_scale.py", "toy_scale").ToyScale())
    try:
        yield fam
    finally:
        FAMILIES.pop(fam.name)


def test_a_new_family_is_its_module_its_template_and_one_registry_call(toy_family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "user"))
    assert main(["families"]) == 0
    assert "toy_scale          shape N; 2 tunables, 6 configs" in capsys.readouterr().out

    assert main(["render", "toy_scale", "--shape", "N=100", "--device", "m3", "--config", "values_per_thread=4"]) == 0
    assert "// toy_scale N=100 V=4" in capsys.readouterr().out
    assert main(["check", "toy_scale", "--shape", "N=100", "--device", "m3"]) == 0
    assert "6" in capsys.readouterr().out
    assert main(["render", "toy_scale", "--shape", "M=1", "--device", "m3"]) == 2
    assert "toy_scale: unknown shape field(s) M" in capsys.readouterr().err

    # its kernel runs (the emulator) and its counted work is what the trace counts
    shape, f32 = toy_family.shape("N=100"), dtypes.get("float32")
    config = toy_family.config({"values_per_thread": 2})
    inputs = toy_family.make_inputs(shape, f32)
    out = toy_family.run(config, shape, f32, inputs, backend="emulator")
    assert np.array_equal(np.array(out), 2 * np.array(inputs["x"]))
    seen = [traces.features(d) for d in trace_report.ours(toy_family, config, shape, f32, inputs)]
    assert toy_family.work(config, shape, f32)[0].features == seen[0].features

    # the tuner: a shapes file naming it, tuned on the model timer (candidates verified on the emulator)
    spec = tmp_path / "shapes.yaml"
    spec.write_text(yaml.safe_dump({"toy_scale": [{"N": 100}]}))
    out_file = tmp_path / "tuned.yaml"
    assert main(["tune", "--shapes", str(spec), "--device", "m3", "--trials", "3", "--dtype", "float32",
                 "--storage", f"sqlite:///{tmp_path / 'studies.db'}", "--results", str(out_file)]) == 0
    entry, = results.load(out_file)["entries"]["toy_scale"].values()
    assert entry["timer"] == "model" and not checks.check(toy_family, toy_family.config(entry["config"]),
                                                           shape, f32, devices.get("m3"))
    assert entry["time_s"] == toy_family.modelled_seconds(toy_family.config(entry["config"]), shape, f32, "m3")

    # bench's measuring pipeline (on the emulator here): verified, timed against its baseline
    row, = bench.kernel_rows([Target("toy_scale", {"N": 100}, "float32")], devices.get("m3"), backend="emulator",
                             timer=MetalTimer(warmup=1, budget_s=0.0, min_repeats=2), progress=lambda line: None)
    assert row.ours_s > 0 and row.mlx_s > 0


def test_a_new_model_type_is_one_new_file_among_the_models(tmp_path):
    """A file on engine/models' path (here a folder added to it) is a model type: the registry
    lists it, the engine decodes with it (llama's blocks: llama's tokens) and the tuner plans it."""
    folder = tmp_path / "more_models"
    folder.mkdir()
    (folder / "toy_decoder.py").write_text(TOY_MODEL)
    models.__path__.append(str(folder))
    try:
        assert "toy_decoder" in models.model_types()
        weights = write_model(tmp_path / "llama", arch="llama", layers=2)
        config = json.loads((weights / "config.json").read_text())
        toy = write_model(tmp_path / "toy", arch="llama", layers=2)
        (toy / "config.json").write_text(json.dumps({**config, "model_type": "toy_decoder"}))
        assert models.parse({**config, "model_type": "toy_decoder"}).toy_layers == 2
        assert models.get("toy_decoder").Layer.__module__.endswith("toy_decoder")
        runs = {}
        for name, path in (("llama", weights), ("toy", toy)):
            with engine.load(path, backend="mlx", kv_tokens=128) as e:
                runs[name] = [t.id for t in e.generate([5, 9, 2, 7], max_tokens=6)]
        assert runs["toy"] == runs["llama"] and len(runs["toy"]) == 6
        planned = shapes.from_model_folder(toy, contexts=(512,))
        assert planned == shapes.from_model_folder(weights, contexts=(512,))
    finally:
        models.__path__.remove(str(folder))
        mx.clear_cache()


def test_every_environment_variable_read_is_in_the_design_doc():
    """docs/design.md's list is the one place naming them: every METALFORGE_ variable the package reads."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    folders = ("metalforge", "engine", "emulator", "kernels", "tuner", "results", "devices")
    read = {name for folder in folders for path in (root / folder).rglob("*.py")
            for name in re.findall(r"METALFORGE_[A-Z_]+[A-Z]", path.read_text())}
    listed = set(re.findall(r"`(METALFORGE_[A-Z_]+)`", (root / "docs" / "design.md").read_text()))
    assert read and read <= listed, sorted(read - listed)
