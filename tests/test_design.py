"""Where new things go (docs/design.md), kept true: a new kernel family is its module, its template
and one registry call, and the tuner, render, check, bench, compare and the CLI see it; a new model type is
one new file among engine/models/, and the engine, the tuner and the op plan serve it. Both are
written here into tmp_path, nothing else of metalforge edited."""
import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
import yaml

from metalforge import devices, engine, results
from metalforge.cli import main
from metalforge.engine import models
from metalforge.kernels import checks, dtypes, trace_report
from metalforge.kernels.families import FAMILIES, register
from metalforge.kernels.timing import compare, traces
from metalforge.testing import write_model
from metalforge.tuner import bench, shapes
from metalforge.tuner.shapes import Target
from metalforge.tuner.timers import MetalTimer

TOY_FAMILY = '''
"""toy_rows: y = x @ dequant(w).T for one row x, 8-bit weights in MLX's affine layout, a thread an
output row (a family written outside metalforge). Its MLX counterpart (quantized_matmul) and its
trace proxy are its own declarations: `metalforge compare` prices it with nothing else edited."""
import math
from pathlib import Path

import mlx.core as mx

from metalforge.intmath import cdiv
from metalforge.kernels import dtypes
from metalforge.kernels.family import Family, Geometry, Launch, Param
from metalforge.kernels.quantized import (QuantizedShape, dequantize_reference, matmul_sizes,
                                          quantization_problems, random_quantized)
from metalforge.kernels.work import Tally


class ToyRows(Family):
    name = "toy_rows"
    shape_type = QuantizedShape
    template_folder = str(Path(__file__).parent)
    params = (Param("threads", (32, 64, 128), 32, "threads per threadgroup"),)
    mlx_op = "matmul"
    trace_groups = (("N",), ("K",))

    def mlx_sizes(self, fields):
        return matmul_sizes(fields, fields["N"])

    def trace_proxy(self, fields, config):
        return {**fields, "N": min(fields["N"], 64), "K": min(fields["K"], 256)}

    def shape_problems(self, shape):
        out = quantization_problems(shape)
        if shape.M != 1 or shape.bits != 8:
            out.append("toy_rows takes M=1 and bits=8")
        return out

    def shape_distance(self, a, b):
        return abs(math.log2(a.N / b.N)) + abs(math.log2(a.K / b.K))

    def buffer_elements(self, shape):
        return {"x": shape.K, "w": shape.N * shape.K, "y": shape.N}

    def geometry(self, config, shape, dtype):
        t = config["threads"]
        return (Geometry((cdiv(shape.N, t) * t, 1, 1), (t, 1, 1)),)

    def launches(self, config, shape, dtype):
        d = dtypes.get(dtype)
        kernel = self._kernel(self.template, ("x", "w", "scales", "biases"), ("y",), N=shape.N, K=shape.K,
                              GS=shape.group_size, T=d.metal)
        g, = self.geometry(config, shape, dtype)
        return [Launch(kernel, g.grid, g.threadgroup, ((1, shape.N),), (d.mlx,))]

    def make_inputs(self, shape, dtype, seed=0):
        d = dtypes.get(dtype)
        kw, kx = mx.random.split(mx.random.key(seed))
        return {"x": mx.random.normal((1, shape.K), key=kx).astype(d.mlx), **random_quantized(shape.N, shape, d, kw)}

    def reference(self, shape, dtype, inp):
        w = dequantize_reference(inp["w"], inp["scales"], inp["biases"], shape.bits, shape.group_size)
        return (inp["x"].astype(mx.float32) @ w.T).astype(dtypes.get(dtype).mlx)

    def baseline(self, shape, dtype, inp):
        return mx.quantized_matmul(inp["x"], inp["w"], inp["scales"], inp["biases"], transpose=True,
                                   group_size=shape.group_size, bits=shape.bits)

    def work(self, config, shape, dtype):
        """Per SIMD-group of 32 rows (the last maybe fewer): a scale and a bias a group, a word
        every 4 values, x's value (one address for all lanes); SIMD-groups of full lanes alike."""
        d = dtypes.get(dtype)
        g, = self.geometry(config, shape, d)
        tally, size = Tally(self.name, g), d.size
        N, K, gs = shape.N, shape.K, shape.group_size
        groups, sgs = K // gs, cdiv(N, 32)
        for lanes, times in ((32, N // 32), (N % 32, 1)):
            for k in range(0, K, gs):
                for b in ("scales", "biases"):
                    tally.device(b, (((n * groups + k // gs) * size, size) for n in range(lanes)), times)
                for i in range(k, k + gs, 4):
                    tally.device("w", ((n * K + i, 4) for n in range(lanes)), times)
            tally.device("y", ((n * size, size) for n in range(lanes)), times)
        for k in range(K):
            tally.device("x", ((k * size, size),), sgs)
        for name, nbytes in (("x", K * size), ("w", N * K), ("scales", N * groups * size),
                             ("biases", N * groups * size), ("y", N * size)):
            tally.footprint(name, nbytes)
        return [tally.counted()]
'''

TOY_TEMPLATE = '''// toy_rows N={{ N }} K={{ K }} group_size={{ GS }}
const uint n = thread_position_in_grid.x;
if (n < {{ N }}) {
  float acc = 0.0f;
  for (uint g = 0; g < {{ K // GS }}; g++) {
    const float scale = float(scales[n * {{ K // GS }} + g]);
    const float bias = float(biases[n * {{ K // GS }} + g]);
    for (uint i = 0; i < {{ GS // 4 }}; i++) {
      const uint word = w[n * {{ K // 4 }} + g * {{ GS // 4 }} + i];
      for (uint j = 0; j < 4; j++)
        acc += float(x[g * {{ GS }} + i * 4 + j]) * (scale * float((word >> (8 * j)) & 0xffu) + bias);
    }
  }
  y[n] = static_cast<{{ T }}>(acc);
}
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
    (folder / "toy_rows.py").write_text(TOY_FAMILY)
    (folder / "toy_rows.metal.j2").write_text(TOY_TEMPLATE)
    fam = register(_import(folder / "toy_rows.py", "toy_rows").ToyRows())
    try:
        yield fam
    finally:
        FAMILIES.pop(fam.name)


def test_a_new_family_is_its_module_its_template_and_one_registry_call(toy_family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "user"))
    assert main(["families"]) == 0
    assert "toy_rows           shape M,N,K,bits,group_size; 1 tunables, 3 configs" in capsys.readouterr().out

    shape_text = "M=1,N=100,K=256,bits=8,group_size=64"
    assert main(["render", "toy_rows", "--shape", shape_text, "--device", "m3", "--config", "threads=64"]) == 0
    assert "// toy_rows N=100 K=256 group_size=64" in capsys.readouterr().out
    assert main(["check", "toy_rows", "--shape", shape_text, "--device", "m3"]) == 0
    assert "3" in capsys.readouterr().out
    assert main(["render", "toy_rows", "--shape", "N=1", "--device", "m3"]) == 2
    assert "toy_rows: shape is missing M, K" in capsys.readouterr().err

    # its kernel runs (the emulator) and its counted work is what the trace counts
    shape, f32 = toy_family.shape(shape_text), dtypes.get("float32")
    config = toy_family.config({"threads": 64})
    inputs = toy_family.make_inputs(shape, f32)
    out = toy_family.run(config, shape, f32, inputs, backend="emulator")
    np.testing.assert_allclose(np.array(out), np.array(toy_family.reference(shape, f32, inputs)), rtol=1e-5, atol=1e-4)
    seen = [traces.features(d) for d in trace_report.ours(toy_family, config, shape, f32, inputs)]
    assert toy_family.work(config, shape, f32)[0].features == seen[0].features

    # the tuner: a shapes file naming it, tuned on the model timer (candidates verified on the
    # emulator), its entry priced from traces scaled up from its own proxy (as its counted work at
    # the real shape says) against MLX's real kernel for its MLX op
    big_text = "M=1,N=256,K=1024,bits=8,group_size=64"
    big, m3 = toy_family.shape(big_text), devices.get("m3")
    spec = tmp_path / "shapes.yaml"
    spec.write_text(yaml.safe_dump({"toy_rows": [big.__dict__]}))
    out_file = tmp_path / "tuned.yaml"
    assert main(["tune", "--shapes", str(spec), "--device", "m3", "--trials", "3", "--dtype", "float32",
                 "--storage", f"sqlite:///{tmp_path / 'studies.db'}", "--results", str(out_file)]) == 0
    entry, = results.load(out_file)["entries"]["toy_rows"].values()
    tuned = toy_family.config(entry["config"])
    assert entry["timer"] == "model" and not checks.check(toy_family, tuned, big, f32, m3)
    assert entry["time_s"] == pytest.approx(toy_family.modelled_seconds(tuned, big, f32, "m3"), rel=1e-9)
    assert entry["baseline_kernel"] == toy_family.mlx_kernels(big, f32, m3)
    assert entry["baseline_kernel"].startswith("affine_qmv")

    # `metalforge compare`: the same two prices, side by side
    scaled, = compare.ours_counted(toy_family, config, big, f32, m3)
    assert scaled.features == pytest.approx(toy_family.work(config, big, f32)[0].features, rel=1e-9)
    r = compare.compare("toy_rows", m3, big_text, "float32", config=tuned)
    assert r["mlx"]["kernel"] == toy_family.mlx_kernels(big, f32, m3) and not r["validated"]
    assert r["ours"]["seconds"] == pytest.approx(entry["time_s"]) and r["mlx"]["seconds"] == pytest.approx(entry["baseline_s"])
    assert r["ratio"] == pytest.approx(entry["speedup"])

    # bench's measuring pipeline (on the emulator here): verified, timed against its baseline
    row, = bench.kernel_rows([Target("toy_rows", dict(M=1, N=100, K=256, bits=8, group_size=64), "float32")],
                             devices.get("m3"), backend="emulator",
                             timer=MetalTimer(warmup=1, budget_s=0.0, min_repeats=2), progress=lambda line: None)
    assert row.ours_s > 0 and row.mlx_s > 0 and row.mlx_kernel.startswith("affine_qmv")


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
