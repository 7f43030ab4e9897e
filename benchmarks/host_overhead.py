"""Host overhead: the Python time an engine op call spends before its kernel launches (the
choice of config, then the kernels to launch: rendered, hashed and built, or found in a cache),
and the time of a results lookup, for this tree and for an earlier revision side by side.

    python benchmarks/host_overhead.py                                  # this tree only
    python benchmarks/host_overhead.py --previous 93e1661 --out docs/benchmarks.md   # and 93e1661, written there

The calls are one decode step's ops of the 8B-class model (tuner/defaults.py MODELS) at 4,096
tokens of context, as its model type's op plan gives them (engine/models: `op_plan`), each op
served by a family of ours. The earlier revision runs from `git archive REV` in a temporary
folder, laid out as pyproject's package-dir says, in a subprocess of its own; it may predate the
op plan, so this tree hands it the planned calls (op, sizes, and the serving family's shape) as
JSON. What is timed is what both revisions do for a call: the engine's per-op choice
(`Kernels.decide`, or `Kernels._choose` by family before it) and the kernels for the chosen
config's launches (`Family.built` where it exists, else `Family.launches` and `backends.kernel`
per launch, as `Family.run` did). A call the earlier revision cannot serve (its family or a shape
field not there yet) is "-". The launch itself (Metal or the emulator) is not ours and is not
timed. Targets: <= 10 us per op call, <= 0.1 ms per lookup."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "m3-max-40"
CONTEXT = 4096
TARGET_OP_US, TARGET_LOOKUP_US = 10.0, 100.0
HEADING = "Host overhead"
SECTION = """## {heading}

Python time per engine op call before its kernels launch (the engine's choice of config, then the
kernels for the config's launches) and per results lookup, for each op of one decode step of the
8B-class model at {context} tokens of context (its op plan's calls that a family of ours serves), on
{device}'s profile, float16, on the emulator backend (the launch itself is not timed). Rendering,
hashing and building kernels happen once per (family, config, compile-time shape, dtype); results
files are read again only when they change. This tree is revision {revision}. {beside}Written by
`{command}`.

{table}
"""


def planned_calls() -> list[dict]:
    """One decode step's op calls that a family of ours serves: {op, values, family, shape}."""
    from metalforge.engine import models
    from metalforge.engine.ops import kernel_shapes
    from metalforge.tuner import defaults

    args = models.parse(defaults.MODELS[1])
    plan = models.get(args.model_type).op_plan(args, contexts=(CONTEXT,))
    calls = []
    for p in plan:
        for family, (shape, *_) in kernel_shapes([p]).items():
            calls.append({"op": p.op, "values": p.values, "family": family, "shape": shape})
    return calls


def _per_call_us(fn, calls: int) -> float:
    fn()   # the first call fills the caches (renders, compiles nothing: kernels build lazily)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(runs)


def _op_call(kernels, call: dict, device):
    """(a callable doing what the engine does before it launches `call`'s kernels, in whichever
    revision is imported, and how many times to repeat it), or None where that revision cannot
    serve the call."""
    from metalforge.kernels import backends, get_family
    from metalforge.errors import MetalforgeError

    try:
        fam = get_family(call["family"])
    except MetalforgeError:
        return None
    if hasattr(kernels, "decide"):
        def choose():   # (config, shape): the config is None where MLX's op serves the call
            d = kernels.decide(call["op"], call["values"], "float16")
            return d.config, d.shape
    else:   # before the op layer: the engine chose by family name
        def choose():
            shape, config, _ = kernels._choose(call["family"], call["shape"], "float16")
            return config, shape
    if choose()[0] is None:
        return None
    if hasattr(fam, "built"):   # cached: many repeats
        return lambda: fam.built(*choose(), "float16", "emulator", device), 2000
    return lambda: [backends.kernel(launch.kernel, "emulator", device)
                    for launch in fam.launches(*choose(), "float16")], 50


def measure(calls: list[dict]) -> dict:
    """Per-call microseconds (None: cannot serve) in the tree this process imports metalforge from."""
    from metalforge import devices, results
    from metalforge.engine.ops import Kernels

    device = devices.get(DEVICE)
    kernels = Kernels("emulator", device)
    out = {}
    for call in calls:
        name = f"{call['family']} " + ",".join(f"{k}={v}" for k, v in call["shape"].items() if v)   # 0: off
        timed = _op_call(kernels, call, device)
        if timed is None:
            out[f"op {name}"] = out[f"lookup {name}"] = None
            continue
        out[f"op {name}"] = _per_call_us(*timed)
        out[f"lookup {name}"] = _per_call_us(lambda: results.lookup(DEVICE, call["family"], call["shape"], "float16"), 20)
    return out


def _previous_tree(rev: str, into: Path) -> Path:
    """`rev` of this repository as an importable `metalforge` package under `into`."""
    src = into / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    dirs = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    package = into / "path" / "metalforge"
    package.mkdir(parents=True)
    for f in (src / dirs["metalforge"]).iterdir():
        (package / f.name).symlink_to(f)
    for name, folder in dirs.items():
        if name != "metalforge":
            (package / name.split(".", 1)[1]).symlink_to(src / folder)
    return into / "path"


def measure_previous(rev: str, calls: list[dict]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = _previous_tree(rev, Path(d))
        env = {**os.environ, "PYTHONPATH": str(path)}
        run = subprocess.run([sys.executable, __file__, "--calls", json.dumps(calls)], capture_output=True, text=True,
                             env=env, cwd=d)
        if run.returncode:
            sys.exit(f"host_overhead.py: revision {rev} failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
        return json.loads(run.stdout)


def _us(value) -> str:
    return "-" if value is None else f"{value:.1f} us"


def table(now: dict, before: dict | None, rev: str | None) -> list[str]:
    head = f"| call | this tree | {rev} | speed-up | target |" if before else "| call | this tree | target |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, us in now.items():
        target = TARGET_OP_US if name.startswith("op") else TARGET_LOOKUP_US
        mark = f"<= {target:g} us: " + ("met" if us <= target else "NOT met")
        if before:
            then = before.get(name)
            lines.append(f"| {name} | {_us(us)} | {_us(then)} | {'-' if then is None else f'{then / us:.0f}x'} | {mark} |")
        else:
            lines.append(f"| {name} | {_us(us)} | {mark} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--previous", help="a git revision to measure side by side (e.g. 93e1661, before the caches)")
    p.add_argument("--out", type=Path, help=f"also write the table into this Markdown file's '{HEADING}' section "
                                            "(docs/benchmarks.md)")
    p.add_argument("--calls", help=argparse.SUPPRESS)   # the previous tree's subprocess: the calls as JSON
    args = p.parse_args()
    if args.calls:
        print(json.dumps(measure(json.loads(args.calls))))
        return 0
    # this tree only from here: the earlier revision may have neither module
    from metalforge.files import write_section
    from metalforge.provenance import command, revision

    calls = planned_calls()
    now = measure(calls)
    rev = before = None
    if args.previous:   # named as it is today: a branch moves
        before = measure_previous(args.previous, calls)
        commit = revision(args.previous)
        rev = args.previous if commit == args.previous else f"{args.previous} ({commit})"
    lines = table(now, before, rev)
    print("\n".join(lines))
    if args.out:
        beside = (f"Beside revision {rev}, run from `git archive` in a process of its own (\"-\": that revision "
                  "has no family for the call, or refuses its shape). ") if rev else ""
        write_section(args.out, HEADING, SECTION.format(heading=HEADING, context=CONTEXT, device=DEVICE,
                                                        revision=revision(), beside=beside, command=command(),
                                                        table="\n".join(lines)))
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
