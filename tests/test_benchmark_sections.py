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
from metalforge.kernels import check_space

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


def _write(script, doc, *args):
    """Run a benchmark script writing its section into `doc`, which holds another section first."""
    doc.write_text("# B\n\n## Other\n\nkept\n")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    text = doc.read_text()
    assert text.startswith("# B\n\n## Other\n\nkept\n\n## ")
    return " ".join(text.split())


def test_kv_memory_section_holds_the_layouts_bytes(tmp_path):
    text = _write("kv_memory", tmp_path / "b.md", "--out", str(tmp_path / "b.md"))
    # per token, K and V of 32 layers x 8 heads: 128 float16 values, or codes plus a float16
    # scale and bias per group
    assert "| 8B llama (32 x 8 x 128) | float16 | 131,072 | 100.0% | 32,768 |" in text      # 2*256*128*2
    assert "| 8B llama (32 x 8 x 128) | 8-bit, group 64 | 69,632 | 53.1% |" in text          # 2*256*(128+2*2*2)
    assert "| 8B llama (32 x 8 x 128) | 4-bit, group 32 | 40,960 | 31.2% |" in text          # 2*256*(64+4*2*2)


def test_tuner_search_section_counts_the_space_it_searched(tmp_path):
    doc = tmp_path / "b.md"
    text = _write("tuner_search", doc, "--families", "qmv", "--seeds", "2", "--budget", "20",
                  "--out", str(tmp_path / "ts"), "--doc", str(doc))
    shape = _script("tuner_search").model_shapes()["qmv"]
    valid, space = check_space("qmv", shape, "float16", "m3-max-40")
    assert f"| qmv | {space.total} | {space.valid} |" in text
    assert f"{0.05 * space.valid:.0f}: met" in text or f"{0.05 * space.valid:.0f}: NOT met" in text
    assert "the same 2 seeds, each search at most 20 evaluations" in text


def test_kv_window_section_shows_the_window_bounds_the_pool(tmp_path):
    doc = tmp_path / "b.md"
    text = _write("kv_window", doc, "--tokens", "300", "--window", "64", "--every", "100", "--out", str(doc))
    blocks = [int(b) for b in re.findall(r"\| (?:100|200|300) \| [\d.]+ \| (\d+) \|", text)]
    # a window of 64 spans at most 5 blocks of 16, plus the block holding the 4 sink positions
    assert len(blocks) == 3 and max(blocks) <= 6


def test_speculative_section_decodes_the_plain_tokens_in_every_row(tmp_path):
    doc = tmp_path / "b.md"
    text = _write("speculative", doc, "--tokens", "8", "--hidden", "256", "--layers", "1", "--out", str(doc))
    assert "## Speculative decoding: hidden 256 x 1 layers" in text
    rows = re.findall(r"\| (plain|draft: [^|]+|prompt lookup n=3) \|[^|]+\|[^|]+\|[^|]+\|[^|]+\| (\w+) \|", text)
    assert len(rows) == 4 and all(same == "yes" for _, same in rows), rows


def test_readme_starts_with_the_install_and_test_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert first[0].startswith('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && metalforge tune')
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert first[1] == ci[-1] == "python -m pytest -q"
    for heading in ("## Parity with MLX's kernels (MODELLED)", "## Modelled decode tokens/s (MODELLED)"):
        assert heading in readme   # the sections parity.py and modelled_decode.py rewrite
