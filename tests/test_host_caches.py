"""The caches on the engine's hot path: a config's kernels are rendered and built once, and results
files are read once per change (benchmarks/host_overhead.py measures what they save)."""
import importlib
import os

import mlx.core as mx
import numpy as np

from metalforge import results
from metalforge.kernels import get_family

lookup_module = importlib.import_module("metalforge.results.lookup")   # (results.lookup is the function)

SHAPE = dict(M=1, N=64, K=256, bits=4, group_size=64)


def _counting_renders(monkeypatch):
    from metalforge.kernels import family, render
    rendered = []
    monkeypatch.setattr(family, "render", lambda t, **v: rendered.append(t) or render.render(t, **v))
    return rendered


def test_a_second_run_of_the_same_op_renders_nothing_and_gives_the_same_answer(monkeypatch):
    rendered = _counting_renders(monkeypatch)
    fam = get_family("qmv")
    shape = fam.shape(SHAPE)
    config = fam.config({"simdgroups": 1, "rows_per_simdgroup": 2})
    inputs = fam.make_inputs(shape, "float32")
    expected = np.array(fam.reference(shape, "float32", inputs))
    first = np.array(fam.run(config, shape, "float32", inputs, backend="emulator"))
    assert len(rendered) == 1, "the first run renders its one kernel"
    second = np.array(fam.run(config, shape, "float32", inputs, backend="emulator"))
    assert len(rendered) == 1, "the second run of the same op renders nothing"
    np.testing.assert_allclose(first, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(first, second)
    other = fam.config({"simdgroups": 2, "rows_per_simdgroup": 2})
    np.testing.assert_allclose(np.array(fam.run(other, shape, "float32", inputs, backend="emulator")), expected,
                               atol=1e-4, rtol=1e-4)
    assert len(rendered) == 2, "another config is another kernel"
    fam.run(config, shape, "float16", {k: v.astype(mx.float16) if v.dtype == mx.float32 else v
                                       for k, v in inputs.items()}, backend="emulator")
    assert len(rendered) == 3, "another dtype is another kernel"


def _entry(simdgroups):
    fam = get_family("qmv")
    config = fam.config({"simdgroups": simdgroups, "rows_per_simdgroup": 2})
    return ("qmv", fam.bucket_key(fam.shape(SHAPE), "float16"),
            {"shape": SHAPE, "dtype": "float16", "config": config, "time_s": 1e-9, "timer": "metal",
             "baseline_s": None, "speedup": None, "trials": {}})


def test_a_lookup_reads_a_results_file_once_and_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "user"))
    loads = []
    real_load = lookup_module.load
    monkeypatch.setattr(lookup_module, "load", lambda p: loads.append(p) or real_load(p))
    path = tmp_path / "mine.yaml"
    results.save_entries(path, "m1", [_entry(1)])
    first = results.lookup("m1", "qmv", SHAPE, "float16", results=path)
    assert first.source == "exact" and first.config["simdgroups"] == 1
    read = len(loads)
    assert read >= 1
    for _ in range(3):
        assert results.lookup("m1", "qmv", SHAPE, "float16", results=path) == first
    assert len(loads) == read, "an unchanged file is not parsed again"
    path.write_text(path.read_text().replace("simdgroups: 1", "simdgroups: 4"))   # same size, in place
    changed = results.lookup("m1", "qmv", SHAPE, "float16", results=path)
    assert changed.config["simdgroups"] == 4, "a rewritten file is read again"
    stamp = path.stat()
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))   # touched only
    before = len(loads)
    assert results.lookup("m1", "qmv", SHAPE, "float16", results=path).config["simdgroups"] == 4
    assert len(loads) > before, "a touched file is read again"
    path.unlink()
    assert results.lookup("m1", "qmv", SHAPE, "float16", results=path) != changed, "a removed file counts no more"
