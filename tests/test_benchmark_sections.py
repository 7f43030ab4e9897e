"""The sections of docs/benchmarks.md the benchmark scripts write: each names the script that
wrote it; host_overhead.py times the calls the op plan gives (and hands them to an earlier
revision); engine_decode.py's section judges its cells as the ratios say."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from metalforge import devices
from metalforge.engine.ops import Kernels

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_section_of_the_benchmarks_page_names_the_script_that_wrote_it():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    sections = re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert len(sections) >= 7
    for heading, body in sections:
        scripts = re.findall(r"`python (benchmarks/\w+\.py)", body)
        assert scripts, f"'{heading}' does not say which script wrote it"
        assert all((ROOT / s).exists() for s in scripts), heading


def test_host_overhead_times_the_op_plan_calls_in_this_tree_and_an_earlier_one(tmp_path):
    ho = _script("host_overhead")
    calls = ho.planned_calls()
    # each call is served by the family the engine itself decides on for that op and its sizes
    kernels = Kernels("emulator", devices.get(ho.DEVICE))
    assert [c["family"] for c in calls] == [kernels.decide(c["op"], c["values"], "float16").family for c in calls]
    assert {c["family"] for c in calls} >= {"qmv", "decode_attention"}
    assert {c["op"] for c in calls} >= {"linear", "attention"}
    # the earlier revision gets the calls as JSON and answers per call (here: this commit)
    one = [next(c for c in calls if c["family"] == "qmv")]
    before = ho.measure_previous("HEAD", one)
    assert set(before) == set(ho.measure(one)) and all(v > 0 for v in before.values())

    doc = tmp_path / "b.md"
    doc.write_text("# B\n\n## Host overhead\n\nSTALE TEXT\n\n## Other\n\nkept\n")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--out", str(doc)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    text = doc.read_text()
    assert "STALE TEXT" not in text and text.endswith("## Other\n\nkept\n")
    rows = [line for line in text.splitlines() if line.startswith(("| op ", "| lookup "))]
    assert len(rows) == 2 * len(calls)
    assert f"`python benchmarks/host_overhead.py --out {doc}`" in " ".join(text.split())


def _pair(ours, theirs):
    return {"metalforge": ours, "mlx_lm": theirs}


def test_engine_decode_section_judges_cells_by_their_ratios(tmp_path):
    ed = _script("engine_decode")
    # decode 1.32x (above), time to first token 2.0 s against 1.7 s (0.85x: below),
    # 8 sequences 10 against 10 tok/s (parity); 1024 tokens: mlx-lm not run
    data = {"device": "cpu", "decode_tokens": 32, "batch_prompt_tokens": 64, "command": "python benchmarks/engine_decode.py",
            "revision": "abc1234", "mlx": "0.32.4", "mlx_lm": "0.32", "cores": 2, "machine": "Linux x86_64",
            "model_types": ["llama"], "prefill_chunk": 512, "seconds": 120.0,
            "results": {"float32 4-bit": {
                "contexts": {"128": _pair({"decode_tokens_per_s": 66.0, "ttft_s": 2.0},
                                          {"decode_tokens_per_s": 50.0, "ttft_s": 1.7}),
                             "1024": _pair({"decode_tokens_per_s": 40.0, "ttft_s": 3.0, "peak_memory_bytes": 2**28},
                                           {"skipped": "too slow"})},
                "batches": {"8": _pair({"tokens_per_s": 10.0}, {"tokens_per_s": 10.0})}}}}
    source = tmp_path / "run.json"
    source.write_text(json.dumps(data))
    doc = tmp_path / "b.md"
    doc.write_text("# B\n\n## Engine speed against mlx-lm\n\nSTALE TEXT\n")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine_decode.py"), "--report", str(source),
                          "--out", str(tmp_path / "out"), "--doc", str(doc)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    text = doc.read_text()
    assert text.split("\n", 2)[2] == (tmp_path / "out.md").read_text(), "OUT.md is the section"
    assert "| float32 4-bit | 66.0 vs 50.0 (**1.32x**) | 40.0 vs not run |" in text
    assert "| float32 4-bit | 2.00 vs 1.70 (**0.85x**) | 3.00 vs not run |" in text
    assert ("Of 3 cells run on both sides, 1 favour metalforge beyond 1.1x, 1 are at parity and 1 are below it: "
            "float32 4-bit time to first token at 128 (0.85x).") in " ".join(text.split())
    assert "Measured at revision abc1234 on Linux x86_64, 2 cores, MLX 0.32.4's cpu backend" in " ".join(text.split())
    assert "in 2 minutes" in text and "STALE TEXT" not in text


def test_readme_starts_with_the_install_and_test_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert first[0].startswith('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && metalforge tune')
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert first[1] == ci[-1] == "python -m pytest -q"
    for heading in ("## Parity with MLX's kernels (MODELLED)", "## Modelled decode tokens/s (MODELLED)"):
        assert heading in readme   # the sections parity.py and modelled_decode.py rewrite
