"""How many trials the tuner's search needs to come within 5% of the exhaustive optimum of the
model objective, against random search, for every family (side by side, same seeds, one run).

    python benchmarks/tuner_search.py --device m3-max-40 --seeds 8 --out benchmarks/results/tuner_search
"""
from __future__ import annotations

import argparse
import statistics

import optuna

from metalforge.kernels import check_space
from metalforge.kernels.families import get as get_family
from metalforge.tuner import shapes, study as st
from metalforge.tuner.timers import ModelTimer
from metalforge.plotting import figure, write_report

SHAPES = {
    "qmv": dict(M=1, N=4096, K=4096, bits=4, group_size=64),
    "decode_attention": dict(B=1, Hq=32, Hkv=8, S=4096, D=128),
    "prefill_attention": dict(B=1, Hq=32, Hkv=8, L=512, D=128),
}


def trials_to_reach(values: list[float], goal: float) -> int | None:
    for i, v in enumerate(values, 1):
        if v <= goal:
            return i
    return None


def search(family_name, shape, device, sampler, seed, budget):
    target = shapes.Target(family_name, shape, "float16")
    # no warm start: the shipped results already hold these shapes' optima
    settings = st.Settings(device=device, trials=budget, storage="memory", timer=ModelTimer(), sampler=sampler,
                           seed=seed, verify=False, warm_start=False)
    study = st.run_study(target, settings)
    best, curve = float("inf"), []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if "duplicate_of" in t.user_attrs:
            continue   # a repeat proposal costs no evaluation
        if t.state == optuna.trial.TrialState.COMPLETE:
            best = min(best, t.value)
        curve.append(best)
    return curve


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="m3-max-40")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--out", default="benchmarks/results/tuner_search")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    report = {}
    for name, values in SHAPES.items():
        fam = get_family(name)
        shape = fam.shape(values)
        valid, space = check_space(fam, shape, "float16", args.device)
        optimum = min(fam.cost(c, shape, "float16", args.device) for c in valid)
        row = {"space": space.total, "valid": space.valid, "optimum_s": optimum}
        for sampler in ("tpe", "random"):
            curves = [search(name, shape, args.device, sampler, seed, args.budget) for seed in range(args.seeds)]
            hits = [trials_to_reach(c, optimum * 1.05) for c in curves]
            reached = [h for h in hits if h is not None]
            # a seed that never got there counts as the whole budget, so misses are not hidden
            row[sampler] = {"median_trials": statistics.median(h or args.budget for h in hits),
                            "reached": f"{len(reached)}/{len(hits)}", "hits": hits,
                            "mean_gap_curve": [statistics.mean(c[i] / optimum - 1 for c in curves if len(c) > i)
                                               for i in range(args.budget)]}
        report[name] = row
        print(f"{name:18} space {space.total:4d} (valid {space.valid:4d})   trials to within 5% of the optimum: "
              f"TPE median {row['tpe']['median_trials']} (reached on {row['tpe']['reached']} seeds)   "
              f"random median {row['random']['median_trials']} (reached on {row['random']['reached']} seeds)")
    fig, axes = figure(1, len(report), figsize=(4 * len(report), 3.2))
    for ax, (name, row) in zip(axes, report.items()):
        for sampler, color in (("tpe", "#4c72b0"), ("random", "#dd8452")):
            curve = [100 * g for g in row[sampler]["mean_gap_curve"]]
            ax.plot(range(1, len(curve) + 1), curve, color=color, label=sampler)
        ax.axhline(5, linestyle="--", color="grey", linewidth=0.8)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{name} ({row['valid']} valid configs)", fontsize=9)
        ax.set_xlabel("trials")
        ax.set_ylabel("mean gap to optimum (%)")
        ax.legend(fontsize=8)
    fig.suptitle(f"search efficiency on the MODELLED objective, {args.device}", fontsize=10)
    write_report(args.out, {"device": args.device, "objective": "model", "families": report}, fig)


if __name__ == "__main__":
    main()
