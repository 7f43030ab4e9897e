"""Fit the cost model's constants to published Apple measurements and report how wrong it is.

    python benchmarks/calibrate.py [--data benchmarks/data/apple_measurements.yaml]
                                   [--out benchmarks/results/calibration] [--write | --check]

Prints predicted against measured tokens per second for every data point (fitted on all points),
the fitted constants, and the error on held-out chips (each chip's points predicted by constants
fitted without that chip): the figure every modelled number in metalforge carries. Writes a PNG
of predicted against measured, one colour per chip generation. `--write` replaces the shipped
constants (kernels/calibration.yaml) with this fit; `--check` exits 1 when they differ from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

from metalforge import files
from metalforge.kernels import calibration as cal, cost
from metalforge.plotting import figure, write_report

HERE = Path(__file__).resolve().parent
GENERATION = {"applegpu_g13": "M1", "applegpu_g14": "M2", "applegpu_g15": "M3", "applegpu_g16": "M4"}


def generation(p: cal.Point) -> str:
    return GENERATION.get(p.device.architecture[:12], p.device.architecture)


def report(points, result: cost.Calibration) -> dict:
    c = result.constants
    print(f"{len(points)} published measurements, {result.chips} chips "
          f"({sum(p.kind == 'decode' for p in points)} decode, {sum(p.kind == 'prefill' for p in points)} prefill)\n")
    print(f"{'chip':10} {'cores':>5} {'kind':8} {'model':15} {'weights':22} {'measured':>9} {'fitted':>9} "
          f"{'err':>7} {'held-out':>9}  source")
    held_out = cal.leave_one_chip_out(points)
    held = {id(p): e for pairs in held_out.values() for p, e in pairs}
    rows = []
    for p in points:
        fitted = cal.predict(p, c)
        rows.append(dict(chip=p.chip, generation=generation(p), gpu_cores=p.gpu_cores, kind=p.kind, model=p.model,
                         measured=p.tokens_per_s, fitted=fitted, held_out_error=held[id(p)], source=p.source))
        print(f"{p.chip:10} {p.gpu_cores:5d} {p.kind:8} {p.model:15} {p.weights:22} {p.tokens_per_s:9.2f} "
              f"{fitted:9.2f} {fitted / p.tokens_per_s - 1:+7.1%} {held[id(p)]:+9.1%}  {p.source}")
    print("\nfitted constants (kernels/cost.py uses them):")
    print(f"  A  bandwidth factor          {c.bandwidth_factor:.4f}   (x bytes / published bandwidth)")
    print(f"  B  core seconds per byte     {c.core_seconds_per_byte:.4f}   (x bytes / (GPU cores x GHz)): "
          f"{1 / c.core_seconds_per_byte if c.core_seconds_per_byte else float('inf'):.1f} bytes per core-cycle")
    print(f"  C  overhead per layer        {c.layer_overhead_s * 1e6:.1f} us")
    for g, d in c.compute_factor.items():
        print(f"  D  compute factor {g:10} {d:.3f}   ({1 / d:.0%} of peak FP32 sustained)")
    print("\nheld-out error (leave one chip out), median |predicted / measured - 1|:")
    for kind, err in result.held_out_error.items():
        print(f"  {kind:8} {err:.1%}")
    print("  per chip: " + ", ".join(f"{chip} {statistics.median(abs(e) for _, e in pairs):.1%}"
                                     for chip, pairs in held_out.items()))
    return dict(constants=dataclasses.asdict(c), held_out_error=result.held_out_error, points=rows)


def plot(rows: list[dict]):
    fig, axes = figure(1, 2, figsize=(11, 5))
    colours = {"M1": "tab:blue", "M2": "tab:orange", "M3": "tab:green", "M4": "tab:red"}
    for ax, kind in zip(axes, cal.KINDS):
        sel = [r for r in rows if r["kind"] == kind]
        for gen, colour in colours.items():
            pts = [r for r in sel if r["generation"] == gen]
            if pts:
                ax.scatter([r["measured"] for r in pts], [r["measured"] * (1 + r["held_out_error"]) for r in pts],
                           c=colour, label=gen, s=28)
        lo = min(r["measured"] for r in sel) * 0.7
        hi = max(r["measured"] for r in sel) * 1.4
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), title=f"{kind}: held-out prediction",
               xlabel="published tokens/s (measured on the chip)", ylabel="modelled tokens/s (chip held out)")
        ax.legend(title="chip generation")
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE / "data" / "apple_measurements.yaml"))
    ap.add_argument("--out", default=str(HERE / "results" / "calibration"), help="OUT.json and OUT.png")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="replace the shipped constants with this fit")
    mode.add_argument("--check", action="store_true", help="exit 1 if the shipped constants differ from this fit")
    args = ap.parse_args(argv)
    points = cal.load_points(args.data)
    result = cal.calibrate(args.data)
    data = report(points, result)
    write_report(args.out, data, plot(data["points"]))
    if args.write:
        files.write_atomic(cost.calibration_path(), result.to_yaml())
        print(f"wrote {cost.calibration_path()}")
    elif args.check and result.to_yaml() != cost.calibration_path().read_text():
        print(f"{cost.calibration_path()} differs from this fit: run with --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
