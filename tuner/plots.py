"""PNG of a study's history: each trial's time, the best so far, the baseline, pruned and failed trials."""
from __future__ import annotations

from pathlib import Path

from optuna.trial import TrialState

from metalforge.plotting import figure, save
from metalforge.tuner.protocol import BASELINE_S, TIMER, standing


def plot_history(study, path, title: str) -> Path:
    trials = study.get_trials(deepcopy=False)
    done = standing(study)
    kind = done[0].user_attrs.get(TIMER, "model") if done else "model"
    fig, ax = figure(figsize=(8, 4))
    if done:
        xs = [t.number for t in done]
        ys = [t.value * 1e6 for t in done]
        ax.scatter(xs, ys, s=14, color="#4c72b0", label="completed")
        best, line = float("inf"), []
        for t in done:
            best = min(best, t.value * 1e6)
            line.append(best)
        ax.step(xs, line, where="post", color="#55a868", label="best so far")
        floor = min(ys)
    else:
        floor = 1.0
    for state, marker, color, label in ((TrialState.PRUNED, "x", "#c44e52", "pruned (invalid or duplicate)"),
                                        (TrialState.FAIL, "v", "#8172b2", "failed (compile or wrong answer)")):
        xs = [t.number for t in trials if t.state == state]
        if xs:
            ax.scatter(xs, [floor * 0.9] * len(xs), marker=marker, color=color, label=label)
    base = study.user_attrs.get(BASELINE_S)
    if base:
        ax.axhline(base * 1e6, linestyle="--", color="#dd8452", label="MLX built-in")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"time per call (µs, {'MODELLED' if kind == 'model' else 'measured on Metal'})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path)
