"""The tuner's trial protocol: what a trial and a study record (Optuna user attributes), and which
trials count. Every reader and writer of these names goes through here."""
from __future__ import annotations

from optuna.trial import TrialState

# ---- a trial's attributes ---------------------------------------------------------------------
WORKER = "worker"              # host:pid:start of the process that ran it (dead local workers are seen at once)
DUPLICATE_OF = "duplicate_of"  # a repeat of an earlier trial's config: that trial's outcome, never run twice
INVALID = "invalid"            # over a device limit: pruned before anything was compiled
ERROR = "error"                # the config failed (compile, run or mismatch): a verdict, never retried
RETIME_OF = "retime_of"        # queued again because thermal drift discarded that trial's timing
TIMER = "timer"                # "metal" or "model": how its time was obtained
SPREAD = "spread"              # (p90 - p10) / median of its timing repeats
REPEATS = "repeats"            # how many timed runs the median is of

# ---- a study's attributes ---------------------------------------------------------------------
DISCARDED = "discarded"        # numbers of trials whose timings drift made worthless
BASELINE_S = "baseline_s"      # MLX's built-in for the same job, timed by the same timer

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def discarded(study) -> set[int]:
    return set(study.user_attrs.get(DISCARDED, []))


def standing(study) -> list:
    """Completed trials whose timing stands (not discarded by drift), in trial order."""
    gone = discarded(study)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number not in gone]


def interrupted(t) -> bool:
    """A trial whose worker was killed or interrupted (failed without an error of its config):
    it says nothing about its config, which is run again, and it never counts as evaluated."""
    return t.state == TrialState.FAIL and ERROR not in t.user_attrs


def repeat(t) -> bool:
    return DUPLICATE_OF in t.user_attrs
