"""Host overhead: the Python time an engine op call spends before its kernel launches (the
choice of config, then the kernels to launch: rendered, hashed and built, or found in a cache),
and the time of a results lookup, for this tree and for an earlier revision side by side.

    python benchmarks/host_overhead.py                        # this tree only
    python benchmarks/host_overhead.py --previous main --write # and `main`, into docs/benchmarks.md

The earlier revision runs from `git archive REV` in a temporary folder, laid out as pyproject's
package-dir says, in a subprocess of its own. What is timed is what both revisions do for a call:
`Kernels._choose` (the engine's per-op choice) and the kernels for the chosen config's launches
(`Family.built` where it exists, else `Family.launches` and `backends.kernel` per launch, as
`Family.run` did). The launch itself (Metal or the emulator) is not ours and is not timed.
Targets: <= 10 us per op call, <= 0.1 ms per lookup."""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "m3-max-40"
# a decode step of a 7B-class model: a quantized projection and attention over the engine's paged pool
OPS = {
    "qmv": dict(M=1, N=4096, K=4096, bits=4, group_size=64),
    "decode_attention": dict(B=1, Hq=32, Hkv=8, S=4096, D=128, block_size=16, num_blocks=256),
}
TARGET_OP_US, TARGET_LOOKUP_US = 10.0, 100.0


def _per_call_us(fn, calls: int) -> float:
    fn()   # the first call fills the caches (renders, compiles nothing: kernels build lazily)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(runs)


def measure() -> dict:
    """Per-call microseconds in the tree this process imports metalforge from."""
    from metalforge import devices, results
    from metalforge.engine.ops import Kernels
    from metalforge.kernels import backends, get_family

    device = devices.get(DEVICE)
    kernels = Kernels("emulator", device)
    out = {}
    for family, values in OPS.items():
        fam = get_family(family)
        if hasattr(fam, "built"):
            def call(family=family, values=values, fam=fam):
                shape, config, _ = kernels._choose(family, values, "float16")
                return fam.built(config, shape, "float16", "emulator", device)
        else:
            def call(family=family, values=values, fam=fam):
                shape, config, _ = kernels._choose(family, values, "float16")
                return [backends.kernel(launch.kernel, "emulator", device)
                        for launch in fam.launches(config, shape, "float16")]
        out[f"op {family}"] = _per_call_us(call, 2000 if hasattr(fam, "built") else 50)
        out[f"lookup {family}"] = _per_call_us(lambda: results.lookup(DEVICE, family, values, "float16"), 20)
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


def measure_previous(rev: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = _previous_tree(rev, Path(d))
        env = {**os.environ, "PYTHONPATH": str(path)}
        run = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env,
                             cwd=d, check=True)
        return json.loads(run.stdout)


def table(now: dict, before: dict | None, rev: str | None) -> list[str]:
    head = f"| call | this tree | {rev} | speed-up | target |" if before else "| call | this tree | target |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, us in now.items():
        target = TARGET_OP_US if name.startswith("op") else TARGET_LOOKUP_US
        mark = "met" if us <= target else "NOT met"
        if before:
            lines.append(f"| {name} | {us:.1f} us | {before[name]:.1f} us | {before[name] / us:.0f}x | "
                         f"<= {target:g} us: {mark} |")
        else:
            lines.append(f"| {name} | {us:.1f} us | <= {target:g} us: {mark} |")
    return lines


def write_section(lines: list[str], rev: str | None) -> Path:
    """Replace (or add) the "Host overhead" section of docs/benchmarks.md."""
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = "\n".join([
        "## Host overhead", "",
        "Python time per engine op call before its kernel launches (the engine's choice of config, then "
        "the kernels for the config's launches) and per results lookup, on "
        f"{DEVICE}'s profile, float16, written by `python benchmarks/host_overhead.py"
        + (f" --previous {rev.split()[0]}" if rev else "") + " --write`"
        + (f" beside revision {rev}" if rev else "") + ". Rendering, hashing and building kernels now "
        "happen once per (family, config, compile-time shape, dtype); results files are read again "
        "only when they change.", "", *lines, ""])
    pattern = re.compile(r"^## Host overhead\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda m: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(text)
    return doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--previous", help="a git revision to measure side by side (e.g. main)")
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # the previous tree's subprocess
    args = p.parse_args()
    now = measure()
    if args.json:
        print(json.dumps(now))
        return 0
    before = measure_previous(args.previous) if args.previous else None
    rev = None
    if args.previous:   # named as it is today: a branch moves
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.previous], check=True,
                                capture_output=True, text=True).stdout.strip()
        rev = args.previous if commit == args.previous else f"{args.previous} ({commit})"
    lines = table(now, before, rev)
    print("\n".join(lines))
    if args.write:
        print(f"written: {write_section(lines, rev)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
