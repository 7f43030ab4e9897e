"""Fit the per-kernel time model's constants to published Apple measurements and report how wrong it is.

    python benchmarks/calibrate.py [--data benchmarks/data/apple_measurements.yaml]
                                   [--out benchmarks/results/calibration] [--write | --check]

The per-kernel model (kernels/timing): predicted against measured for every published kernel point
(benchmarks/data/kernel_measurements.yaml; MLX's and llama.cpp's kernels traced in the emulator at
proxy shapes and scaled), the points left out and why, and the leave-one-chip-out median error per
family and regime for every choice of the terms the data may not identify (kernels/timing/fit.py
OPTIONAL: the host round trip of a point timed per call, the system cache), the shipped choice
marked; then the largest held-out errors per
family, and the whole-model check: decode steps priced as mlx-lm's step (engine/whole_model.py: the op
plan's kernels, MLX's, plus mlx-lm's other dispatches at one fitted per-dispatch cost), held out by chip. Writes OUT.json and a PNG of held-out predicted against
measured. `--write` replaces kernels/timing/constants.yaml with this fit; `--check` exits 1 when it
differs from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from metalforge.engine import whole_model
from metalforge.kernels import model_measurements
from metalforge.kernels.timing import fit as kfit
from metalforge.plotting import figure, write_report

HERE = Path(__file__).resolve().parent
WORST = 3   # largest held-out errors shown per family


def _shape(r) -> str:
    return ",".join(f"{k}={v}" for k, v in r.point.shape)


def _waits(p) -> str:
    """The host round trips a call's time carries: 1 per call, 1/n queued n per wait, 0 unstated or on the GPU."""
    return "1" if p.host_waits == 1 else f"1/{p.calls_per_wait}" if p.host_waits else "0"


def kernel_report(rows, skipped, table: dict, held: tuple) -> dict:
    """The per-kernel model: every point predicted (all-point fit and chip held out), per-family error."""
    c = kfit.fit(rows, held)
    held_out = kfit.leave_one_chip_out(rows, held)
    by_row = {id(r): e for r, e in held_out}
    print(f"per-kernel model: {len(rows)} published kernel timings priced on {len({r.chip for r in rows})} chips, "
          f"{len(skipped)} left out\n")
    print(f"{'family':18} {'bound':7} {'chip':10} {'timer':14} {'waits':>5} {'shape':44} {'measured us':>11} "
          f"{'fitted':>8} {'held-out':>9}  kernels")
    for r, e in zip(rows, kfit.errors(rows, c)):
        print(f"{r.family:18} {kfit.bound(r, c):7} {r.chip:10} {r.point.timer:14} {_waits(r.point):>5} {_shape(r):44} "
              f"{r.point.seconds * 1e6:11.1f} {e:+8.1%} {by_row[id(r)]:+9.1%}  " + " + ".join(r.kernels))
    print("\nleft out (cannot be priced yet):")
    for p, why in skipped:
        print(f"  {p.chip} {p.library} {p.kernel} {dict(p.shape)}: {why}")
    print("\nfitted per-kernel constants (kernels/timing/model.py; dram: from the whole-model check below):")
    for name, v in c.as_dict().items():
        print(f"  {name:9} {v:.4g}" + ("   (held at 0: not identified, see below)" if name in held else ""))
    if c.mma == 0 and "mma" not in held:
        print("  (mma at 0 is unidentifiable, not measured absent: the MMA-heavy points are priced as well by "
              "onchip and sync, whose counts grow with the same tiles)")
    print("\nleave-one-chip-out median |predicted / measured - 1| per family, for each choice of the terms held at 0 "
          "(a term is fitted only where freeing it lowers the mean of the families' errors):")
    families = sorted({r.family for r in rows})
    print(f"  {'terms held at 0':28} " + " ".join(f"{f:>18}" for f in families) + "      mean")
    for choice, errs in table.items():
        mean = np.mean([errs[f]["error"] for f in families])
        print(f"  {', '.join(choice) or 'none':28} " + " ".join(f"{errs[f]['error']:18.1%}" for f in families)
              + f"   {mean:7.1%}" + ("   <- shipped" if choice == held else ""))
    result = table[held]
    print("\nshipped, per family:")
    for f, e in result.items():
        note = "" if e["chips"] >= 2 else "  (one chip: no chip to hold out against, unvalidated)"
        print(f"  {f:18} {e['regime']:8} {e['error']:7.1%} over {e['points']} points, {e['chips']} chip(s){note}")
    regimes = kfit.regime_errors(rows, held)
    print("\nshipped, per family and what bounds each point (its bytes or its on-chip work, as the all-point fit "
          "prices them; the family's regime above is what it serves, decode or prompt):")
    for (f, b), e in regimes.items():
        print(f"  {f:18} {b:8} {e['error']:7.1%} over {e['points']} points, {e['chips']} chip(s)")
    print("\nlargest held-out errors per family (the next term to look for):")
    for f in families:
        worst = sorted(((r, e) for r, e in held_out if r.family == f), key=lambda x: -abs(x[1]))[:WORST]
        for r, e in worst:
            p = r.point
            print(f"  {f:18} {e:+7.1%}  {r.chip:10} {p.timer:14} {p.dtype or '?':9} {'DRAM' if kfit.reads_dram(p) else 'cache':5} "
                  f"{_shape(r)}  ({p.timing[:60]})")
    return {"constants": c, "families": result, "held": list(held),
            "regimes": [{"family": f, "bound": b, **e} for (f, b), e in regimes.items()],
            "points": [{"family": r.family, "bound": kfit.bound(r, c), "chip": r.chip, "timer": r.point.timer,
                        "host_waits": r.point.host_waits, "shape": dict(r.point.shape),
                        "measured_s": r.point.seconds, "held_out_error": e} for r, e in held_out]}


def whole_model_report(points, constants) -> dict:
    rows, skipped = whole_model.rows(points, constants)
    dram, d = whole_model.fit(rows)
    err, held = whole_model.held_out(rows)
    print(f"\nwhole-model check (decode = mlx-lm's step: the op plan's kernels, MLX's, priced without their launch, "
          f"and every dispatch of the step, theirs and the others of mlx-lm's graph, at d = {d * 1e6:.2f} us each; "
          f"DRAM factor {dram:.3f} x bytes / bandwidth for the cold weights):")
    for (p, cost), e in zip(rows, held):
        layers = p.facts.config["num_hidden_layers"]
        print(f"  {p.chip:10} {p.model:15} {p.weights:22} {p.tokens_per_s:8.2f} tok/s  modelled "
              f"{whole_model.predict((p, cost), dram, d):8.2f}  held-out {e:+.1%}  "
              f"({cost.dispatches / layers:.1f} dispatches a layer; {p.software})")
    for p, why in skipped:
        print(f"  left out: {p.chip} {p.model} {p.weights}: {why}")
    print(f"  held-out median error (both constants fitted without the chip): {err:.1%} over {len(rows)} decode points")
    print(f"  per-dispatch cost in a step d = {d * 1e6:.2f} us; a kernel's launch fitted on kernel timings "
          f"{constants.launch * 1e6:.2f} us")
    prefill, left_out = whole_model.rows(points, constants, "prefill")
    prefill_err, prefill_held = whole_model.held_out(prefill, fitted_on=rows) if prefill else (None, [])
    print("\nprefill check (not fitted: a prompt = its chunks' kernels, MLX's, and mlx-lm's other dispatches a chunk, "
          "priced with the decode fit's two constants, fitted without the point's chip):")
    for (p, cost), e in zip(prefill, prefill_held):
        print(f"  {p.chip:10} {p.model:15} {p.weights:22} {p.tokens:6} tokens, chunks of {p.chunk:4} {p.tokens_per_s:8.2f} tok/s  "
              f"modelled {p.tokens_per_s * (1 + e):8.2f}  held-out {e:+.1%}  ({p.software})")
    for p, why in left_out:
        print(f"  left out: {p.chip} {p.model} {p.weights} {p.tokens} tokens: {why}")
    if prefill:
        print(f"  held-out median error: {prefill_err:.1%} over {len(prefill)} prefill points")
    return {"dram": dram, "dispatch_s": d, "held_out_error": round(err, 4), "points": len(rows),
            "prefill_held_out_error": None if prefill_err is None else round(prefill_err, 4),
            "prefill_points": len(prefill)}


def plot(kernel_points: list[dict]):
    fig, ax = figure(1, 1, figsize=(6.5, 5.5))
    for family in sorted({p["family"] for p in kernel_points}):
        sel = [p for p in kernel_points if p["family"] == family]
        ax.scatter([p["measured_s"] * 1e6 for p in sel], [p["measured_s"] * 1e6 * (1 + p["held_out_error"]) for p in sel],
                   label=family, s=24)
    times = [p["measured_s"] * 1e6 for p in kernel_points]
    lo, hi = min(times) * 0.3, max(times) * 3
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), title="per-kernel model: chip held out",
           xlabel="published kernel time (us)", ylabel="modelled (us), its chip left out of the fit")
    ax.legend(title="family")
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(model_measurements.DATA), help="published whole-model speeds")
    ap.add_argument("--out", default=str(HERE / "results" / "calibration"), help="OUT.json and OUT.png")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="replace the shipped constants with this fit")
    mode.add_argument("--check", action="store_true", help="exit 1 if the shipped constants differ from this fit")
    args = ap.parse_args(argv)
    rows, skipped = kfit.rows()
    table = kfit.ablation(rows)
    held = kfit.held_terms(rows, table)
    per_kernel = kernel_report(rows, skipped, table, held)
    whole = whole_model_report(model_measurements.load_points(args.data), per_kernel["constants"])
    data = {"per_kernel": {"constants": per_kernel["constants"].as_dict(), "families": per_kernel["families"],
                           "regimes": per_kernel["regimes"], "held": per_kernel["held"],
                           "points": per_kernel["points"]},
            "whole_model": whole}
    write_report(args.out, data, plot(per_kernel["points"]))
    if args.write:
        kfit.write(rows, skipped, whole, held)
        print(f"wrote {kfit.constants_path()}")
    elif args.check:
        shipped = kfit.shipped()["constants"].vector()
        fitted = dataclasses.replace(per_kernel["constants"], dram=whole["dram"]).vector()
        if not np.allclose(shipped, fitted, rtol=1e-9, atol=0):
            print(f"{kfit.constants_path()} differs from this fit: run with --write", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
