"""Ours against MLX's real kernels, per family and bucket, by the per-kernel model: the parity table.

    python benchmarks/parity.py [--devices m1,m2-max,m3-max-40,m4-pro] [--out docs/benchmarks.md]
                                [--readme README.md]

For the built-in model and an 8B-class model (hidden 4096, intermediate 14336, 32 query / 8 KV
heads of 128), decode at contexts 512 to 32k and prompts of 128 to 4096 tokens: every kernel shape
the engine's op plan gives a family of ours (engine/ops.py OPS: a family added there is priced
without an edit here), our shipped config (results lookup) and MLX's real kernel chosen by MLX's
rules, both priced from their traces by the calibrated per-kernel model (`metalforge compare`).
Each row carries the family's per-kernel error and its verdict (kernels/timing/gate.py verdict):
a gain beyond the error, parity (within it), MLX faster (then MLX's kernel runs: the tuner ships
"mlx" for that bucket), or unvalidated. Shapes the trace cannot price yet say why.
Modelled, not measured: no Mac ran these.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

from metalforge import devices
from metalforge.errors import MetalforgeError
from metalforge.files import write_section
from metalforge.kernels.families import get as get_family
from metalforge.kernels.timing import compare, fit, gate
from metalforge.tuner import defaults, shapes

DEVICES = ("m1", "m2-max", "m3-max-40", "m4-pro")
CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
PROMPTS = (128, 256, 512, 1024, 2048, 4096)
MODEL_NAMES = ("built-in (Qwen2.5-0.5B-sized, 4-bit)", "8B-class (Llama-3-8B-sized, 4-bit)")
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    device: str
    family: str
    shape: str
    ours_s: float | None
    mlx_s: float | None
    mlx_kernel: str
    ratio: float | None     # MLX's seconds / ours: above 1, ours faster
    error: float | None
    verdict: str            # gate.verdict's words, or "not priced (reason)"

    @property
    def runs(self) -> str:
        """What the engine's `auto` runs on a Mac: ours only on a gain beyond the model's error."""
        return "ours" if self.verdict == gate.GAIN else "MLX"


def jobs(model: dict) -> list[tuple[str, dict]]:
    """(family, shape values) of every kernel the op plan gives a family of ours, decode and prefill."""
    plan = shapes.from_model_config(model, contexts=CONTEXTS, prefill=PROMPTS)
    return [(family, values) for family, shapes_ in plan.items() for values in shapes_]


def price(model_name: str, device: str, family: str, values: dict) -> Row:
    dev = devices.get(device)
    try:
        r = compare.compare(family, dev, values)
    except MetalforgeError as e:
        reason = str(e).splitlines()[0]
        return Row(model_name, device, family, _shape_text(family, values), None, None, "-", None, None,
                   f"not priced ({reason[:160]})")
    return Row(model_name, device, family, r["shape"], r["ours"]["seconds"], r["mlx"]["seconds"], r["mlx"]["kernel"],
               r["ratio"], r["error"], gate.verdict(r["ratio"], family))


def _shape_text(family: str, values: dict) -> str:
    fam = get_family(family)
    try:
        return fam.describe(fam.shape(values))
    except MetalforgeError:
        return ",".join(f"{k}={v}" for k, v in values.items())


def rows(device_names=DEVICES, progress=None) -> list[Row]:
    out = []
    for model_name, model in zip(MODEL_NAMES, defaults.MODELS):
        for device in device_names:
            for family, values in jobs(model):
                out.append(price(model_name, device, family, values))
                if progress:
                    progress(out[-1])
    return out


def _us(seconds: float | None) -> str:
    return f"{seconds * 1e6:.1f}" if seconds else "-"


def _ratio(r: Row) -> str:
    if r.ratio is None:
        return "-"
    text = f"{r.ratio:.3f}x" if abs(r.ratio - 1) < 0.005 else f"{r.ratio:.2f}x"   # 0.999x: MLX's, by a hair
    return text if r.error is not None else f"({text})"


def table(rs: list[Row]) -> str:
    lines = ["| model | device | family | shape | ours (us) | MLX's real kernel (us) | MLX / ours | error | verdict "
             "| `auto` runs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        error = f"{r.error:.0%}" if r.error is not None else "unvalidated"
        lines.append(f"| {r.model.split(' (')[0]} | {r.device} | {r.family} | {r.shape} | {_us(r.ours_s)} | "
                     f"{_us(r.mlx_s)} `{r.mlx_kernel.split('_float')[0]}` | {_ratio(r)} | {error} | {r.verdict} | "
                     f"{r.runs} |")
    return "\n".join(lines)


def summary(rs: list[Row], gains_listed: bool = True) -> list[str]:
    """Per family: buckets by verdict, and the gains beyond the error (each, or their range)."""
    out = []
    by_family = collections.defaultdict(list)
    for r in rs:
        by_family[r.family].append(r)
    for family, group in by_family.items():
        counts = collections.Counter(r.verdict if not r.verdict.startswith("not priced") else "not priced"
                                     for r in group)
        words = ", ".join(f"{v} {n}" for v, n in counts.most_common())
        gains = [r for r in group if r.verdict == gate.GAIN]
        error = fit.family_error(family)
        out.append(f"- **{family}** ({len(group)} buckets, per-kernel error "
                   f"{f'{error:.0%}' if error is not None else 'unvalidated'}): {words}")
        if gains_listed:
            out += [f"  - gain beyond the error: {r.model.split(' (')[0]} {r.shape} on {r.device}: {r.ratio:.2f}x "
                    f"({(r.ratio - 1 - r.error) * 100:.1f} points past the {r.error:.0%} error)" for r in gains]
        elif gains:
            ratios = [r.ratio for r in gains]
            out.append(f"  - gains beyond the error: {min(ratios):.2f}x to {max(ratios):.2f}x "
                       f"(each in docs/benchmarks.md)")
        reasons = sorted({_reason(r.verdict) for r in group if r.verdict.startswith("not priced")})
        out += [f"  - not priced: {reason}" for reason in reasons]
    return out


def _reason(verdict: str) -> str:
    """A "not priced" verdict's reason without what varies by shape (the access count, the MSL)."""
    return verdict[len("not priced ("):-1].split(": emulator: kernel")[0].split(" and the dispatch made")[0]


def worst_shipped(rs: list[Row]) -> float | None:
    """The lowest ratio the engine's `auto` ships among priced buckets: 1.0 where MLX runs."""
    priced = [r.ratio if r.runs == "ours" else 1.0 for r in rs if r.ratio is not None]
    return min(priced) if priced else None


SECTION = """## Parity with MLX's real kernels (MODELLED)

Written by `{command}`. Per family and bucket, our shipped config against MLX's real kernel
(chosen by MLX's rules, run in the emulator), both priced from their traces by the calibrated
per-kernel model; the error is the family's leave-one-chip-out per-kernel error (unvalidated: no
kernel-level data, the ratio is shown in brackets and claims nothing). Verdicts: **{gain}** (ours
runs under `auto`), **{parity}**, **{mlx}** (the results entry says "mlx": MLX's op runs, so the
worst case is parity), **{unvalidated}**, or not priced (why). Modelled on the profiles {devices};
no Mac ran these.

{summary}

Worst ratio shipped under `auto` (MLX's kernel where it is modelled faster): {worst}; a bucket not
priced has no evidence, so `auto` runs MLX's op there too.

{table}
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default=",".join(DEVICES), help="comma-separated device profiles")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md",
                   help="the README whose summary section is updated")
    args = p.parse_args(argv)
    names = [devices.get(d).name for d in args.devices.split(",")]
    rs = rows(names, progress=lambda r: print(f"{r.device} {r.family} {r.shape}: {_ratio(r)} {r.verdict}", flush=True))
    worst = worst_shipped(rs)
    worst_text = f"{worst:.2f}x" if worst is not None else "-"
    summary_lines = summary(rs)
    command = " ".join(["python benchmarks/parity.py"] + (argv if argv is not None else sys.argv[1:]))
    write_section(args.out, "Parity with MLX's real kernels (MODELLED)", SECTION.format(
        command=command, gain=gate.GAIN, parity=gate.PARITY, mlx=gate.MLX_RUNS, unvalidated=gate.UNVALIDATED,
        devices=", ".join(names), summary="\n".join(summary_lines), worst=worst_text, table=table(rs)))
    write_section(args.readme, "Parity with MLX's kernels (MODELLED)", README_SECTION.format(
        command=command, summary="\n".join(summary(rs, gains_listed=False)), worst=worst_text, devices=", ".join(names)))
    print("\n".join(summary_lines))
    print(f"worst ratio shipped under auto: {worst_text}")
    return 0


README_SECTION = """## Parity with MLX's kernels (MODELLED)

Every family against MLX's real kernel, per bucket of the built-in model and an 8B-class model
(decode at 512 to 32k tokens of context, prompts of 128 to 4096) on {devices}, priced by the
calibrated per-kernel model (`{command}`; the full table is in
[docs/benchmarks.md](docs/benchmarks.md)). Where MLX's kernel is modelled faster, the results
entry says "mlx" and MLX's op runs: worst ratio shipped under `auto`, {worst} (a bucket not priced
has no evidence, so `auto` runs MLX's op there too).

{summary}
"""


if __name__ == "__main__":
    sys.exit(main())
