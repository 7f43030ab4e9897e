"""Replay the classes of bad input a hostile but fair user tries, and say which meet the promise:
one line on stderr, exit status 2, nothing changed on disk, no hang, no dead process.

    python tests/bad_input.py           # prints each case and the met / not met counts

The test suite runs the same cases one by one (tests/test_bad_input.py)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from metalforge.testing import write_model

TIMEOUT_S = 180


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]     # prepares files in a fresh folder, returns the argv after `metalforge`
    expect: str = ""                       # a phrase the one-line error must contain
    env: dict | None = None
    secret: str = ""                       # text the error must never show (a password)


def _model(tmp: Path, **config_changes) -> Path:
    folder = tmp / "model"
    if not folder.exists():
        write_model(folder, layers=1, hidden=128, heads=2, kv_heads=1, inter=128, vocab=256, shards=1)
    if config_changes:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config_changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _file(tmp: Path, name: str, data: bytes | str) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _generate(tmp, *extra, **config):
    return ["generate", "--model", str(_model(tmp, **config)), "--prompt-tokens", "3,4,5", "--max-tokens", "2", *extra]


def _tune(tmp, *extra):
    shapes = _file(tmp, "shapes.yaml", "qmv:\n- {M: 1, N: 64, K: 256}\n")
    return ["tune", "--device", "m1", "--shapes", str(shapes), "--trials", "1", "--storage", "memory", *extra]


def _merge(tmp, text):
    return ["results", "merge", str(_file(tmp, "a.yaml", text)), "--out", str(tmp / "c.yaml")]


def _results_text(**entry_changes) -> str:
    """A results file for m1 holding one qmv entry, with `entry_changes` made to it."""
    entry = {"shape": {"M": 1, "N": 64, "K": 256, "bits": 4, "group_size": 64}, "dtype": "float16", "config": {},
             "time_s": 1e-6, "timer": "model", **entry_changes}
    return json.dumps({"schema_version": 1, "device": {"name": "m1"}, "entries": {"qmv": {"any": entry}}})


def _unwritable_dir(tmp: Path) -> Path:
    """A folder nobody can create, root included (chmod would not stop root): its parent is a file."""
    return _file(tmp, "a-file", "") / "sub"


def _prompt_cache(tmp: Path, mutate) -> Path:
    model = _model(tmp)
    out = tmp / "p.safetensors"
    subprocess.run([sys.executable, "-m", "metalforge.cli", "cache", "save", "--model", str(model), "--prompt-tokens",
                    "3,4,5,6", "--out", str(out)], check=True, capture_output=True)
    mutate(out)
    return out


def _flip_last_tensor_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))


def _edit_tokens(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.replace(b'[3, 4, 5, 6]', b'[3, 4, 5, "x"]'))


NOT_UTF8 = b"\xff\xfe\x00binary\x80\x81"

CASES = [
    # -- sizes a GPU cannot address, and nonsense numbers
    Case("check: S = 10**12", lambda t: ["check", "decode_attention", "--device", "m1", "--shape",
                                         "B=1,Hq=8,Hkv=8,S=1000000000000,D=128"], "32-bit indexing"),
    Case("render: K = 10**30", lambda t: ["render", "qmv", "--device", "m1", "--shape",
                                          "M=1,N=64,K=1000000000000000000000000000000"], "32-bit indexing"),
    Case("check: N*K over 2**31", lambda t: ["check", "qmv", "--device", "m1", "--shape",
                                             "M=1,N=1000000,K=1000000"], "32-bit indexing"),
    Case("trace: N*K over 2**31", lambda t: ["trace", "qmv", "--device", "m1", "--shape",
                                             "M=1,N=1000000,K=1000000"], "32-bit indexing"),
    Case("tune: shapes with N = K = 10**12", lambda t: ["tune", "--device", "m1", "--storage", "memory", "--shapes", str(
        _file(t, "s.yaml", "qmv:\n- {M: 1, N: 1000000000000, K: 1000000000000}\n"))], "32-bit indexing"),
    Case("tune: .inf in a shapes file", lambda t: ["tune", "--device", "m1", "--storage", "memory", "--shapes", str(
        _file(t, "s.yaml", "qmv:\n- {M: 1, N: .inf, K: 256}\n"))], "not an integer"),
    Case("tune: --workers 0", lambda t: _tune(t, "--workers", "0"), "--workers"),
    Case("tune: --workers -1", lambda t: _tune(t, "--workers", "-1"), "--workers"),
    Case("tune: --timeout -1", lambda t: _tune(t, "--timeout", "-1"), "--timeout"),
    Case("tune: --timeout nan", lambda t: _tune(t, "--timeout", "nan"), "--timeout"),
    Case("tune: --seed -1", lambda t: _tune(t, "--seed", "-1"), "seed"),
    Case("tune: --seed 2**40", lambda t: _tune(t, "--seed", str(2**40)), "seed"),
    Case("tune: --trials 0", lambda t: _tune(t, "--trials", "0"), "--trials"),
    Case("tune: --contexts -5", lambda t: ["tune", "--device", "m1", "--storage", "memory", "--contexts", "-5"],
         "--contexts"),
    Case("generate: --kv-tokens 0", lambda t: _generate(t, "--kv-tokens", "0"), "kv_tokens"),
    Case("generate: --temperature nan", lambda t: _generate(t, "--temperature", "nan"), "temperature"),
    Case("generate: --max-tokens -3", lambda t: _generate(t, "--max-tokens", "-3"), "max_tokens"),
    Case("generate: --seed 2**40", lambda t: _generate(t, "--seed", str(2**40)), "seed"),
    Case("generate: --num-draft 0", lambda t: _generate(t, "--prompt-lookup", "2", "--num-draft", "0"), "num_draft"),
    Case("generate: --num-draft alone", lambda t: _generate(t, "--num-draft", "2"), "--num-draft needs"),
    Case("generate: --max-kv-size 2", lambda t: _generate(t, "--max-kv-size", "2"), "max_kv_size=2"),
    Case("generate: --kv-group-size 48", lambda t: _generate(t, "--kv-bits", "8", "--kv-group-size", "48"),
         "kv_group_size=48"),
    Case("generate: --prompt-lookup -1", lambda t: _generate(t, "--prompt-lookup", "-1"), "prompt_lookup"),
    Case("generate: token id 10**6", lambda t: ["generate", "--model", str(_model(t)), "--prompt-tokens", "1000000"],
         "outside the vocabulary"),
    Case("generate: token id -1", lambda t: ["generate", "--model", str(_model(t)), "--prompt-tokens", "-1"],
         "outside the vocabulary"),
    # -- model folders
    Case("config: num_hidden_layers 1e9", lambda t: _generate(t, num_hidden_layers=1e9), "num_hidden_layers"),
    Case("config: num_attention_heads 0", lambda t: _generate(t, num_attention_heads=0), "num_attention_heads"),
    Case("config: a list", lambda t: ["generate", "--model", str(_file(t, "m/config.json", "[1, 2]").parent),
                                      "--prompt-tokens", "1"], "JSON object"),
    Case("config: not UTF-8", lambda t: ["generate", "--model", str(_file(t, "m/config.json", NOT_UTF8).parent),
                                         "--prompt-tokens", "1"], "UTF-8"),
    Case("config: heads do not divide", lambda t: _generate(t, num_key_value_heads=3), "multiple"),
    Case("weights: a tensor of the wrong shape", lambda t: _generate(t, intermediate_size=96), "has shape"),
    Case("tune: model with vocab_size 1e12", lambda t: ["tune", "--device", "m1", "--storage", "memory", "--model",
                                                        str(_model(t, vocab_size=10**12))], "vocab_size"),
    # -- files that are not what they claim
    Case("tune: shapes file not UTF-8", lambda t: ["tune", "--device", "m1", "--storage", "memory", "--shapes",
                                                   str(_file(t, "s.yaml", NOT_UTF8))], "UTF-8"),
    Case("tune: --results not UTF-8 (checked before tuning)",
         lambda t: _tune(t, "--results", str(_file(t, "r.yaml", NOT_UTF8))), "UTF-8"),
    Case("tune: --results corrupt YAML (checked before tuning)",
         lambda t: _tune(t, "--results", str(_file(t, "r.yaml", "entries: [unclosed"))), "corrupt"),
    Case("tune: --results is a folder", lambda t: _tune(t, "--results", str(t)), "folder"),
    Case("tune: --results in a unwritable folder",
         lambda t: _tune(t, "--results", str(_unwritable_dir(t) / "r.yaml")), "writable"),
    Case("tune: METALFORGE_RESULTS unwritable", lambda t: _tune(t) if _file(t, "a-file", "") else [],
         "writable", env={"METALFORGE_RESULTS": "{tmp}/a-file/results"}),
    Case("tune: user results file not UTF-8", lambda t: _tune(t), "UTF-8",
         env={"METALFORGE_RESULTS": "{tmp}/user"}),
    Case("tune: journal in a unwritable folder",
         lambda t: ["tune", "--device", "m1", "--shapes", _tune(t)[4], "--trials", "1",
                    "--storage", str(_unwritable_dir(t) / "j.journal")], "journal"),
    Case("tune: journal file not UTF-8",
         lambda t: ["tune", "--device", "m1", "--shapes", _tune(t)[4], "--trials", "1",
                    "--storage", str(_file(t, "j.journal", NOT_UTF8))], "journal"),
    Case("generate: user results file not UTF-8", lambda t: _generate(t, "--backend", "emulator", "--device", "m1"), "UTF-8",
         env={"METALFORGE_RESULTS": "{tmp}/user"}),
    Case("generate: METALFORGE_EMULATOR_THREADS not a number",
         lambda t: _generate(t, "--backend", "emulator", "--device", "m1"),
         "METALFORGE_EMULATOR_THREADS must be a whole number >= 1, got 'two'", env={"METALFORGE_EMULATOR_THREADS": "two"}),
    Case("generate: METALFORGE_EMULATOR_COMPILE_TIMEOUT_S negative",
         lambda t: _generate(t, "--backend", "emulator", "--device", "m1"),
         "METALFORGE_EMULATOR_COMPILE_TIMEOUT_S must be a number >= 0.001, got '-5'",
         env={"METALFORGE_EMULATOR_COMPILE_TIMEOUT_S": "-5", "METALFORGE_CACHE": "{tmp}/cache"}),
    Case("cache save: --out in a unwritable folder",
         lambda t: ["cache", "save", "--model", str(_model(t)), "--prompt-tokens", "3,4",
                    "--out", str(_unwritable_dir(t) / "p.safetensors")], "cannot write"),
    Case("cache save: --out is a folder",
         lambda t: ["cache", "save", "--model", str(_model(t)), "--prompt-tokens", "3,4",
                    "--out", str(_file(t, "d.safetensors/x", "").parent)], "folder"),
    Case("cache info: one flipped bit", lambda t: ["cache", "info", str(_prompt_cache(t, _flip_last_tensor_bit))],
         "checksum"),
    Case("generate: one flipped bit in --prompt-cache",
         lambda t: _generate(t, "--prompt-cache", str(_prompt_cache(t, _flip_last_tensor_bit))), "checksum"),
    Case("cache info: hand-edited tokens", lambda t: ["cache", "info", str(_prompt_cache(t, _edit_tokens))],
         "prompt cache"),
    Case("tune: --sampler bogus (refused before the database or a folder is made)",
         lambda t: [a for a in _tune(t, "--sampler", "bogus") if a not in ("--storage", "memory")], "sampler"),
    Case("tune: --storage URL with a password, server unreachable",
         lambda t: ["tune", "--device", "m1", "--shapes", _tune(t)[4], "--trials", "1",
                    "--storage", "postgresql+psycopg://mf:hunter2@127.0.0.1:9/tuning"], "cannot open tuning storage",
         secret="hunter2"),
    Case("tune: --storage-timeout 0", lambda t: _tune(t, "--storage-timeout", "0"), "--storage-timeout"),
    Case("tune: METALFORGE_STORAGE_TIMEOUT_S=soon", lambda t: _tune(t), "METALFORGE_STORAGE_TIMEOUT_S",
         env={"METALFORGE_STORAGE_TIMEOUT_S": "soon"}),
    Case("results merge: a file without a device", lambda t: _merge(t, "schema_version: 1\nentries: {}\n"), "device"),
    Case("results merge: device is a string", lambda t: _merge(t, "schema_version: 1\ndevice: m1\nentries: {}\n"),
         "device"),
    Case("results merge: shape: 5", lambda t: _merge(t, _results_text(shape=5)), "shape"),
    Case("results merge: config: 5", lambda t: _merge(t, _results_text(config=5)), "config"),
    Case("cache save: --out onto the model's weights",
         lambda t: ["cache", "save", "--model", str(_model(t)), "--prompt-tokens", "3,4",
                    "--out", str(_model(t) / "model.safetensors")], "not a metalforge prompt cache"),
    Case("generate: --stop ''", lambda t: _generate(t, "--stop", ""), "empty stop string"),
    Case("results merge: not UTF-8", lambda t: ["results", "merge", str(_file(t, "a.yaml", NOT_UTF8)),
                                                "--out", str(t / "c.yaml")], "UTF-8"),
]


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix != ".lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    met: bool
    why: str


def replay(case: Case) -> Outcome:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        argv = case.setup(tmp)
        env = {**os.environ, "METALFORGE_RESULTS": str(tmp / "results-home")}
        for k, v in (case.env or {}).items():
            env[k] = v.format(tmp=tmp)
        if env["METALFORGE_RESULTS"] == f"{tmp}/user":
            _file(tmp, "user/m1.yaml", NOT_UTF8)
        before = _snapshot(tmp)
        try:
            run = subprocess.run([sys.executable, "-m", "metalforge.cli", *argv], capture_output=True, text=True,
                                 env=env, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return Outcome(False, f"no answer within {TIMEOUT_S} s")
        err = run.stderr.strip().splitlines()
        if run.returncode != 2:
            return Outcome(False, f"exit status {run.returncode}: {run.stderr.strip()[-300:]}")
        if len(err) != 1 or not err[0].startswith("metalforge: error:") or "Traceback" in run.stderr:
            return Outcome(False, f"stderr is not one error line: {run.stderr.strip()[-300:]}")
        if case.expect and case.expect.lower() not in err[0].lower():
            return Outcome(False, f"the error does not name the problem ({case.expect!r}): {err[0]}")
        if case.secret and case.secret in run.stdout + run.stderr:
            return Outcome(False, f"the output shows the secret {case.secret!r}: {err[0]}")
        if _snapshot(tmp) != before:
            return Outcome(False, "files changed")
        return Outcome(True, err[0])


def main() -> int:
    met = 0
    for case in CASES:
        outcome = replay(case)
        met += outcome.met
        print(f"{'met    ' if outcome.met else 'NOT MET'}  {case.name:52} {outcome.why[:110]}", flush=True)
    print(f"\n{met} met, {len(CASES) - met} not met, of {len(CASES)} cases")
    return 0 if met == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
