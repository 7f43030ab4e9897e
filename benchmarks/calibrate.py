"""Fit the time models' constants to published Apple measurements and report how wrong they are.

    python benchmarks/calibrate.py [--data benchmarks/data/apple_measurements.yaml]
                                   [--out benchmarks/results/calibration] [--write | --check]

Prints predicted against measured tokens per second for every data point (fitted on all points),
the fitted constants, and the error on held-out chips (each chip's points predicted by constants
fitted without that chip): the figure every modelled number in metalforge carries. Writes a PNG
of predicted against measured, one colour per chip generation. `--write` replaces the shipped
constants (kernels/calibration.yaml) with this fit; `--check` exits 1 when they differ from it.

Then the per-kernel model (kernels/timing): predicted against measured for every published kernel
point (benchmarks/data/kernel_measurements.yaml; MLX's kernels traced in the emulator at proxy
shapes and scaled), the points left out and why, the leave-one-chip-out median error per family
and regime, and the whole-model check: decode steps priced as the sum of MLX's kernels plus one
fitted per-dispatch cost, held out by chip. `--write` also replaces kernels/timing/constants.yaml.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np
import yaml

from metalforge import files
from metalforge.kernels import calibration as cal, cost
from metalforge.kernels.timing import fit as kfit, whole_model
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


def kernel_report(rows, skipped) -> dict:
    """The per-kernel model: every point predicted (all-point fit and chip held out), per-family error."""
    c = kfit.fit(rows)
    held = {id(r): e for r, e in kfit.leave_one_chip_out(rows)}
    print(f"\nper-kernel model: {len(rows)} published kernel timings priced on {len({r.chip for r in rows})} chips, "
          f"{len(skipped)} left out\n")
    print(f"{'family':18} {'chip':10} {'shape':44} {'measured us':>11} {'fitted':>8} {'held-out':>9}  kernels")
    for r, e in zip(rows, kfit.errors(rows, c)):
        shape = ",".join(f"{k}={v}" for k, v in r.point.shape)
        print(f"{r.family:18} {r.chip:10} {shape:44} {r.point.seconds * 1e6:11.1f} {e:+8.1%} {held[id(r)]:+9.1%}  "
              + " + ".join(r.kernels))
    print("\nleft out (cannot be priced yet):")
    for p, why in skipped:
        print(f"  {p.chip} {p.library} {p.kernel} {dict(p.shape)}: {why}")
    print("\nfitted per-kernel constants (kernels/timing/model.py; dram: from the whole-model check below):")
    for name, v in c.as_dict().items():
        print(f"  {name:9} {v:.4g}")
    if c.mma == 0:
        print("  (mma at 0 is unidentifiable, not measured absent: the MMA-heavy points, MLX's steel attention on "
              "one chip, are priced as well by sync and schedule, whose counts grow with the same tiles)")
    families = kfit.family_errors(rows)
    print("\nleave-one-chip-out median |predicted / measured - 1| per family:")
    for f, e in families.items():
        note = "" if e["chips"] >= 2 else "  (one chip: no chip to hold out against, unvalidated)"
        print(f"  {f:18} {e['regime']:8} {e['error']:7.1%} over {e['points']} points, {e['chips']} chip(s){note}")
    return {"constants": c, "families": families}


def whole_model_report(points, constants) -> dict:
    rows, skipped = whole_model.rows(points, constants)
    dram, d = whole_model.fit(rows)
    err, held = whole_model.held_out(rows)
    print(f"\nwhole-model check (decode = sum of MLX's kernels' prices without their launch + "
          f"{whole_model.DISPATCHES_PER_LAYER} dispatches a layer at d = {d * 1e6:.2f} us each; "
          f"DRAM factor {dram:.3f} x bytes / bandwidth for the cold weights):")
    for row, e in zip(rows, held):
        p = row[0]
        print(f"  {p.chip:10} {p.model:15} {p.weights:22} {p.tokens_per_s:8.2f} tok/s  modelled "
              f"{whole_model.predict(row, dram, d):8.2f}  held-out {e:+.1%}  ({p.software})")
    for p, why in skipped:
        print(f"  left out: {p.chip} {p.model} {p.weights}: {why}")
    print(f"  held-out median error (both constants fitted without the chip): {err:.1%} over {len(rows)} decode points")
    return {"dram": dram, "dispatch_s": d, "held_out_error": round(err, 4), "points": len(rows)}


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


def _close(a, b) -> bool:
    """Equal, numbers to 1e-9 relative (another BLAS moves the last digits of a least-squares fit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, (int, float)):
        return bool(np.isclose(a, b, rtol=1e-9, atol=0))
    return a == b


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
    rows, skipped = kfit.rows()
    per_kernel = kernel_report(rows, skipped)
    data["whole_model"] = whole_model_report(points, per_kernel["constants"])
    data["per_kernel"] = {"constants": per_kernel["constants"].as_dict(), "families": per_kernel["families"]}
    if args.write:
        kfit.write(rows, skipped, data["whole_model"])
        print(f"wrote {kfit.constants_path()}")
    write_report(args.out, data, plot(data["points"]))
    if args.write:
        files.write_atomic(cost.calibration_path(), result.to_yaml())
        print(f"wrote {cost.calibration_path()}")
    elif args.check and not _close(yaml.safe_load(result.to_yaml()), yaml.safe_load(cost.calibration_path().read_text())):
        print(f"{cost.calibration_path()} differs from this fit: run with --write", file=sys.stderr)
        return 1
    elif args.check:
        shipped = kfit.shipped()["constants"].vector()
        fitted = dataclasses.replace(per_kernel["constants"], dram=data["whole_model"]["dram"]).vector()
        if not np.allclose(shipped, fitted, rtol=1e-9, atol=0):
            print(f"{kfit.constants_path()} differs from this fit: run with --write", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
