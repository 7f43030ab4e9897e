"""The command line: real subprocess runs of the installed `metalforge` entry point."""
import pathlib
import re
import subprocess
import sys

import pytest

from metalforge.kernels import check_space


def metalforge(*args):
    return subprocess.run([sys.executable, "-m", "metalforge.cli", *args], capture_output=True, text=True)


def test_devices_lists_every_profile():
    out = metalforge("devices")
    assert out.returncode == 0
    assert "m3-max-40" in out.stdout and "Apple M4 Max (40-core GPU)" in out.stdout


def test_render_prints_msl():
    out = metalforge("render", "qmv", "--device", "m2", "--shape", "M=1,N=256,K=512", "--config", "simdgroups=4")
    assert out.returncode == 0, out.stderr
    assert "constexpr int SG = 4;" in out.stdout and "simd_sum" in out.stdout


def test_check_reports_valid_count_and_reasons():
    out = metalforge("check", "prefill_attention", "--device", "m1", "--shape", "B=1,Hq=32,Hkv=8,L=512,D=128")
    assert out.returncode == 0, out.stderr
    # the counts the library finds (tests/test_rendering.py hand-checks a slice of them)
    valid, report = check_space("prefill_attention", dict(B=1, Hq=32, Hkv=8, L=512, D=128), "float16", "m1")
    assert f"{report.valid} of {report.total} configs are valid" in out.stdout and report.total == 153600
    memory = sum(n for reason, n in report.reasons.items() if "threadgroup memory" in reason)
    assert f"{memory} invalid: threadgroup memory exceeds the maximum threadgroup memory allowed (32768)" in out.stdout
    assert "more than 64 (128 registers a lane)" in out.stdout


def test_check_single_invalid_config_exits_1_with_both_numbers():
    out = metalforge("check", "prefill_attention", "--device", "m1", "--shape", "B=1,Hq=32,Hkv=8,L=512,D=128",
                     "--dtype", "float32", "--config", "BQ=32", "BK=32", "stage=float")
    assert out.returncode == 1
    assert "Threadgroup memory size (50688) exceeds the maximum threadgroup memory allowed (32768)" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["render", "gemm", "--device", "m1", "--shape", "M=1"], "unknown kernel family 'gemm'"),
    (["render", "qmv", "--device", "m1", "--shape", "M=1,N=8,K=64", "--config", "foo=1"], "unknown parameter 'foo'"),
    (["render", "qmv", "--device", "m1", "--shape", "M=1,N=8,K=64", "--config", "simdgroups=5"], "outside its domain"),
    (["check", "qmv", "--device", "m0", "--shape", "M=1,N=8,K=64"], "unknown device 'm0'"),
    (["check", "qmv", "--device", "m1", "--shape", "M=1,N=8"], "shape is missing K"),
    (["check", "qmv", "--device", "m1", "--shape", "M=1,N=8,K=64,bits=7"], "bits=7 is not supported"),
    (["render", "prefill_attention", "--device", "m1", "--shape", "B=1,Hq=8,Hkv=8,L=64,D=128", "--dtype",
      "float32", "--config", "BQ=64", "BK=64", "stage=float"], "exceeds the maximum threadgroup memory"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
    out = metalforge(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_python_api_example_runs():
    """docs/kernels.md's Python API block, as a user would paste it (the emulator runs the kernel here)."""
    text = (pathlib.Path(__file__).parents[1] / "docs" / "kernels.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("print(", "str(")   # no output needed
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["check"](namespace["fam"], namespace["config"], namespace["shape"], "float16", "m1") == []


def test_the_readme_emulator_quick_start_runs():
    """The README's 'run a Metal kernel on Linux' block as written: its kernel computes exp."""
    import mlx.core as mx
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Quick start 2", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    a, out = namespace["a"], namespace["out"]
    assert mx.allclose(out, mx.exp(a), rtol=1e-5, atol=1e-6).item()
    again = namespace["same"](inputs=[a], grid=(a.size, 1, 1), threadgroup=(256, 1, 1),
                              output_shapes=[a.shape], output_dtypes=[a.dtype])[0]
    assert mx.array_equal(again, out).item()


def test_help_imports_no_mlx_optuna_emulator_or_jinja():
    """`metalforge --help` answers at once: it loads none of the heavy packages (each command's
    own arguments, and what they import, are built only when that command runs)."""
    code = ("import sys\nfrom metalforge import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sys.modules), file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "generate" in run.stdout and "tune" in run.stdout, "the help lists every command"
    loaded = run.stderr.split()
    heavy = [m for m in loaded if m.split(".")[0] in ("mlx", "optuna", "jinja2", "sqlalchemy", "numpy", "yaml")
             or m.startswith(("metalforge.emulator", "metalforge.kernels", "metalforge.engine", "metalforge.tuner"))]
    assert not heavy, f"--help imported {heavy[:10]}"
    assert "metalforge.cli" in loaded, "the probe saw the CLI's own imports"
