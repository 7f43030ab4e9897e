"""How many evaluated configs the tuner's search needs to come within 5% of the exhaustive optimum
of the model objective, against random search, for every family an 8B-class model's op plan runs
(side by side, same seeds, one run).

    python benchmarks/tuner_search.py --device m3-max-40 --seeds 64 --out benchmarks/results/tuner_search
                                      [--doc docs/benchmarks.md]

`--doc` writes the table, with the words that explain it (SECTION), into that Markdown file's
"Tuner search" section.

A trial counts when its config was evaluated: repeats reuse an earlier outcome, and configs over a
device limit are pruned before anything is compiled (microseconds, where an evaluation on a Mac
compiles and times a kernel). The goals (issue 9): the median over seeds reaches 5% of the optimum
within 5% of the valid configs, and the mean gap is never worse than random search's at any budget.
"""
from __future__ import annotations

import argparse
import math
import statistics

import optuna

from metalforge.kernels import check_space
from metalforge.kernels.families import get as get_family
from metalforge.tuner import defaults, protocol, shapes, study as st
from metalforge.tuner.timers import ModelTimer
from metalforge.files import write_section
from metalforge.plotting import figure, write_report
from metalforge.provenance import command, revision


def model_shapes() -> dict[str, dict]:
    """Each family's first kernel shape in the 8B-class model's op plan: decode at 4,096 tokens
    (attention over the engine's paged pool), a 512-token prompt."""
    plan = shapes.from_model_config(defaults.MODELS[1], contexts=(4096,), prefill=(512,))
    return {family: values[0] for family, values in plan.items()}


TIE = 0.005   # mean gaps closer than half a percent of the optimum are a tie
HEADING = "Tuner search"
SECTION = """## {heading}

Written by `{command}` at revision {revision}, on {device}'s profile, MODELLED objective. Per family,
at the first kernel shape of the 8B-class model's op plan (decode at 4,096 tokens over the engine's
paged pool, a 512-token prompt): how many configs the default sampler evaluates before it comes
within 5% of the exhaustive optimum of the modelled objective, against random search with the
same {seeds} seeds, each search {budget}. A trial counts when its config was evaluated: repeats
reuse an earlier outcome and configs over a device limit are pruned before anything compiles. A
seed that never gets there counts as the whole budget. The goals: the median within 5% of the
valid configs, and a mean gap to the optimum never worse than random search's at any budget
(gaps within {tie:g}% of the optimum tie: the model's own error is far larger). The default
sampler's two constants (random start, exploration rate) were chosen with this benchmark.

| family | configs | valid | default sampler: median (seeds reaching 5%) | random: median (seeds reaching 5%) | goal: median <= | mean gap never worse than random |
|---|---:|---:|---:|---:|---:|---|
{rows}
"""


def section(report: dict, run: str, device: str, seeds: int, budget: int | None) -> str:
    rows = [f"| {name} | {r['space']} | {r['valid']} | {r['auto']['median_trials']:g} ({r['auto']['reached']}) | "
            f"{r['random']['median_trials']:g} ({r['random']['reached']}) | {r['goal_trials']:.0f}: "
            f"{'met' if r['meets_median_goal'] else 'NOT met'} | "
            f"{'yes' if r['never_worse_than_random'] else 'no, at ' + ', '.join(map(str, r['worse_than_random_at'][:5]))} |"
            for name, r in report.items()]
    return SECTION.format(heading=HEADING, command=run, revision=revision(), device=device, seeds=seeds,
                          budget=f"at most {budget} evaluations" if budget else "at most 10% of the valid configs (20 at least)",
                          tie=100 * TIE, rows="\n".join(rows))


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
        if protocol.repeat(t) or protocol.INVALID in t.user_attrs:
            continue   # a repeat or an over-limit proposal costs no evaluation
        if t.state == optuna.trial.TrialState.COMPLETE:
            best = min(best, t.value)
        curve.append(best)
    return curve


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="m3-max-40")
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--budget", type=int, help="evaluated configs per search (default: 10%% of the valid ones)")
    ap.add_argument("--families", help="comma-separated families (default: every family the op plan runs)")
    ap.add_argument("--out", default="benchmarks/results/tuner_search", help="OUT.json and OUT.png")
    ap.add_argument("--doc", help=f"also write the table into this Markdown file's '{HEADING}' section "
                                  "(docs/benchmarks.md)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    report = {}
    planned = model_shapes()
    wanted = args.families.split(",") if args.families else list(planned)
    if unknown := [f for f in wanted if f not in planned]:
        ap.error(f"the 8B-class model's op plan runs no {unknown[0]}; it runs {', '.join(planned)}")
    for name, values in ((f, planned[f]) for f in wanted):
        fam = get_family(name)
        shape = fam.shape(values)
        valid, space = check_space(fam, shape, "float16", args.device)
        optimum = min(fam.modelled_seconds(c, shape, "float16", args.device) for c in valid)
        row = {"space": space.total, "valid": space.valid, "optimum_s": optimum}
        budget = args.budget or max(20, space.valid // 10)
        goal = 0.05 * space.valid
        for sampler in ("auto", "random"):
            curves = [search(name, shape, args.device, sampler, seed, budget) for seed in range(args.seeds)]
            hits = [trials_to_reach(c, optimum * 1.05) for c in curves]
            reached = [h for h in hits if h is not None]
            # a seed that never got there counts as the whole budget, so misses are not hidden
            row[sampler] = {"median_trials": statistics.median(h or budget for h in hits),
                            "reached": f"{len(reached)}/{len(hits)}", "hits": hits,
                            "mean_gap_curve": [statistics.mean(c[min(i, len(c) - 1)] / optimum - 1 for c in curves)
                                               for i in range(budget)]}
        ours, rnd = row["auto"], row["random"]
        row["goal_trials"] = goal
        # misses count as never: a budget under the goal cannot meet it by running out
        row["meets_median_goal"] = statistics.median(h or math.inf for h in ours["hits"]) <= goal
        # within half a percent of the optimum the two are tied: the model's own stated error is
        # 7-8%, so a smaller gap between modelled times says nothing
        worse = [i + 1 for i, (a, b) in enumerate(zip(ours["mean_gap_curve"], rnd["mean_gap_curve"])) if a > b + TIE]
        row["worse_than_random_at"] = worse
        row["never_worse_than_random"] = not worse
        report[name] = row
        print(f"{name:18} space {space.total:4d} (valid {space.valid:4d})   evaluations to within 5% of the optimum: "
              f"default sampler median {ours['median_trials']} (reached on {ours['reached']} seeds)   "
              f"random median {rnd['median_trials']} (reached on {rnd['reached']} seeds)   goal <= {goal:.0f}: "
              f"{'met' if row['meets_median_goal'] else 'NOT met'}; mean gap never worse than random: "
              f"{'yes' if row['never_worse_than_random'] else 'NO, at ' + str(worse)}")
    fig, axes = figure(1, len(report), figsize=(4 * len(report), 3.2), squeeze=False)
    for ax, (name, row) in zip(axes[0], report.items()):
        for sampler, color in (("auto", "#4c72b0"), ("random", "#dd8452")):
            curve = [100 * g for g in row[sampler]["mean_gap_curve"]]
            ax.plot(range(1, len(curve) + 1), curve, color=color, label=sampler)
        ax.axhline(5, linestyle="--", color="grey", linewidth=0.8)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{name} ({row['valid']} valid configs)", fontsize=9)
        ax.set_xlabel("configs evaluated")
        ax.set_ylabel("mean gap to optimum (%)")
        ax.legend(fontsize=8)
    fig.suptitle(f"search efficiency on the MODELLED objective, {args.device}", fontsize=10)
    write_report(args.out, {"device": args.device, "objective": "model", "families": report}, fig)
    if args.doc:
        write_section(args.doc, HEADING, section(report, command(), args.device, args.seeds, args.budget))
        print(f"wrote {args.doc}: {HEADING}")


if __name__ == "__main__":
    main()
