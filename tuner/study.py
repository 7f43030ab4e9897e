"""One Optuna study per (device, family, shape bucket, dtype): opening it, the trial loop (one
worker's: others run the same loop on the same storage), its end, and the results entry it yields.
Storage, a trial's evaluation and the recovery of dead workers' trials have modules of their own."""
from __future__ import annotations

import sys
import time
import warnings
from typing import Callable

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import TrialState

from metalforge import devices, signals
from metalforge.errors import MetalforgeError
from metalforge.results import Entry, lookup
from metalforge.tuner.objective import CandidateFailed, Objective, config_key
from metalforge.tuner.protocol import BASELINE_S, FINISHED, INVALID, TIMER, WORKER, discarded, interrupted, repeat, standing
from metalforge.tuner.recovery import fail_dead_local_workers, recover_interrupted, worker_alive
from metalforge.tuner.sampler import TunerSampler
from metalforge.tuner.settings import Settings
from metalforge.tuner.shapes import Target
from metalforge.tuner.storage import earlier_studies, storage_for, study_name
from metalforge.tuner.timers import measures

SAMPLERS = ("auto", "tpe", "random", "grid")


def check_sampler(kind: str) -> str:
    if kind not in SAMPLERS:
        raise MetalforgeError(f"unknown sampler '{kind}'; valid samplers: {', '.join(SAMPLERS)}")
    return kind


class _Grid(optuna.samplers.GridSampler):
    """Optuna's grid, less its study.stop() once every config is handed out: Optuna allows that
    only inside study.optimize (elsewhere it raises), and run_study's loop stops there itself
    (budget_met: every config of the space tried)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(kind: str, family, trials: int, seed):
    """auto: every config when the budget covers the space, else TunerSampler (tuner/sampler.py);
    tpe: Optuna's TPE as it comes; random; grid."""
    check_sampler(kind)
    if kind == "auto" and family.space_size() <= trials:
        kind = "grid"
    if kind == "auto":
        return TunerSampler(seed=seed)
    if kind == "grid":
        return _Grid({p.name: list(p.domain) for p in family.params}, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(target: Target, settings: Settings) -> optuna.Study:
    """The study of `target`, created when new. A study of the same target made over another
    search space (by an earlier metalforge) is kept as it is, and said so: its configs may not
    exist any more, and Optuna refuses a parameter whose choices changed."""
    storage = storage_for(settings.device, settings.storage, settings.heartbeat_s, settings.storage_timeout_s)
    name = study_name(settings.device, target)
    if name not in {s.study_name for s in storage.get_all_studies()}:
        for old in earlier_studies(storage, settings.device, target):
            print(f"metalforge: study '{old}' was made by an earlier metalforge over another search space; "
                  f"tuning in a new study beside it, '{name}' (the old one is kept)", file=sys.stderr)
    return optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                               sampler=make_sampler(settings.sampler, target.family, settings.trials, settings.seed))


def counts(study: optuna.Study) -> dict:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    fresh = [t for t in trials if not repeat(t)]
    return {
        "complete": sum(t.state == TrialState.COMPLETE for t in fresh),
        "invalid": sum(t.state == TrialState.PRUNED and INVALID in t.user_attrs for t in fresh),
        "failed": sum(t.state == TrialState.FAIL and not interrupted(t) for t in fresh),
        "interrupted": sum(interrupted(t) for t in fresh),
        "duplicate": len(trials) - len(fresh),
        "discarded": len(discarded(study)),
    }


def evaluated(study: optuna.Study) -> int:
    """Configs verified and timed (or failed doing so): the budget `--trials` counts these. Repeats,
    interrupted trials and configs over a device limit (pruned in microseconds, before anything
    is compiled; most of a large space on a small device) do not count."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED)
               if not repeat(t) and not interrupted(t) and INVALID not in t.user_attrs)


def best_trial(study: optuna.Study):
    done = standing(study)
    return min(done, key=lambda t: t.value) if done else None


def budget_met(study: optuna.Study, trials: int, space_size: int) -> bool:
    """`trials` evaluated configs (repeats are free), or every config of the space tried
    (nothing left to learn)."""
    if evaluated(study) >= trials:
        return True
    keys = {config_key(t.params) for t in study.get_trials(deepcopy=False, states=FINISHED)
            if t.params and not interrupted(t)}
    return len(keys) >= space_size


def warm_start(study: optuna.Study, target: Target, settings: Settings) -> None:
    """Enqueue the family default, MLX's configuration on the device (Family.mlx_config: the
    search's worst case is then parity with MLX's kernel) and the best known config (results
    files) before sampling."""
    family = target.family
    if study.get_trials(deepcopy=False):
        return
    seeds = [family.default_config()]
    mlx = family.mlx_config(target.shape, target.dtype, settings.device)
    if mlx is not None:
        seeds.append(mlx)
    known = lookup(settings.device, target.family.name, target.shape, target.dtype)
    if known.entry is not None:
        seeds.append(known.config)
    for config in seeds:
        study.enqueue_trial(config, skip_if_exists=True)


def prepare_study(target: Target, settings: Settings) -> optuna.Study:
    """Open the study, queue again what interrupted workers left, and seed a new study with the
    known configs. Run once before starting local workers: two processes seeding one new study
    at once would queue the same configs twice."""
    study = open_study(target, settings)
    recover_interrupted(study)
    if settings.warm_start:
        warm_start(study, target, settings)
    return study


def run_study(target: Target, settings: Settings, progress: Callable | None = None,
              study: optuna.Study | None = None) -> optuna.Study:
    """Run (or resume) the study until it holds `settings.trials` evaluated configs or times out;
    `study` when prepare_study already opened it. `progress(study)` after every trial."""
    study = study or prepare_study(target, settings)
    objective = Objective(target, settings, study)
    size = target.family.space_size()
    # repeats and over-limit configs are cheap but not free: cap the proposals so a sampler stuck
    # on them still ends
    cap = 4 * settings.trials + size
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    # an interrupt stops a trial's evaluation (Objective lets it through), never Optuna's creating
    # or recording of a trial, which would leave it half made; held over the bookkeeping, it lands
    # between trials
    with signals.held():
        for _ in range(cap):
            if budget_met(study, settings.trials, size) or (deadline is not None and time.monotonic() >= deadline):
                break
            if is_heartbeat_enabled(study._storage):
                optuna.storages.fail_stale_trials(study)
            evaluate(study, objective, _ask(study))
            if progress:
                progress(study)
            signals.deliver()
        _finish_abandoned(study, objective, settings)
    if BASELINE_S not in study.user_attrs:
        study.set_user_attr(BASELINE_S, baseline(target, settings).seconds)
    return study


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():   # heartbeats "are supposed to be used with Study.optimize": this is our optimize
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask()


def evaluate(study: optuna.Study, objective: Objective, trial: optuna.Trial) -> None:
    """Run one trial and record its outcome, with heartbeats while it runs. A trial that another
    worker finished meanwhile (it failed this one's trial after its heartbeats stopped, the process
    having been paused; or both took one queued config) keeps that outcome: this one drops it."""
    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                value, state = objective(trial), TrialState.COMPLETE
            except optuna.TrialPruned:
                value, state = None, TrialState.PRUNED
            except CandidateFailed:
                value, state = None, TrialState.FAIL
            except KeyboardInterrupt:
                _record(study, trial, None, TrialState.FAIL)   # interrupted: queued again on resume
                raise
        _record(study, trial, value, state)
    except optuna.exceptions.UpdateFinishedTrialError:
        print(f"metalforge: trial {trial.number} was finished by another worker meanwhile (this one missed its "
              "heartbeats, or both took one queued config); its outcome stands, going on", file=sys.stderr)


def _record(study, trial, value, state) -> None:
    try:
        study.tell(trial, value, state=state)
    except ValueError as e:   # "Cannot tell a FAIL trial.": finished by another worker
        if not str(e).startswith("Cannot tell a "):
            raise
        raise optuna.exceptions.UpdateFinishedTrialError(str(e)) from None


def _finish_abandoned(study, objective, settings: Settings) -> None:
    """With the budget met, trials held by workers that died must not stay RUNNING for ever:
    this machine's dead workers are seen at once; a trial of another machine's worker is waited
    for until it finishes or its heartbeat goes stale. Configs queued again are evaluated here,
    each by the one worker whose claim of it lands (Optuna's ask would sample a new config when
    another worker got there first)."""
    if not is_heartbeat_enabled(study._storage):
        return
    deadline = time.monotonic() + 4 * settings.heartbeat_s   # stale after the grace period (3 beats)
    while True:
        fail_dead_local_workers(study, grace_s=3 * settings.heartbeat_s)
        optuna.storages.fail_stale_trials(study)
        for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if study._storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
                evaluate(study, objective, optuna.Trial(study, waiting._trial_id))
        # a live local worker finishes its own trials; only other machines' need watching
        unsettled = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                     if worker_alive(t.user_attrs.get(WORKER, "")) is not True]
        if not unsettled or time.monotonic() > deadline:
            return
        with signals.released():   # an interrupt lands in a trial's evaluation or in the sleep
            time.sleep(min(1.0, settings.heartbeat_s / 2))


def baseline(target: Target, settings: Settings):
    family = target.family
    runner = None
    if measures(settings.timer):
        inputs = family.baseline_inputs(target.shape, target.dtype, family.make_inputs(target.shape, target.dtype))
        runner = lambda: family.baseline(target.shape, target.dtype, inputs)
    return settings.timer.baseline(runner, family=family, shape=target.shape, dtype=target.dtype,
                                   device=devices.get(settings.device))


def entry(study: optuna.Study, target: Target, device=None) -> dict | None:
    """The results entry for a finished study (None when no trial completed); a modelled one
    priced for `device` (a profile name) by the per-kernel model."""
    best = best_trial(study)
    if best is None:
        return None
    base = study.user_attrs.get(BASELINE_S)
    timer = best.user_attrs.get(TIMER, "model")
    out = Entry(shape=dict(target.shape.__dict__), dtype=target.dtype, config=dict(best.params),
                time_s=float(best.value), timer=timer, baseline_s=base,
                speedup=(base / best.value) if base else None, trials=counts(study)).to_dict()
    if timer == "model" and device is not None:
        # the search ranked configs by Family.modelled_seconds; the entry states the per-kernel model's
        # price of the winner against MLX's real kernel, with the family's per-kernel error
        from metalforge.kernels.timing.compare import priced_entry
        out = priced_entry(target.family, target.shape, target.dtype, devices.get(device), out)
        out = no_slower_than_mlx_config(out, target, device)
    return out


def no_slower_than_mlx_config(out: dict, target: Target, device: str) -> dict:
    """A priced entry, or the same entry with MLX's configuration (Family.mlx_config) where the
    per-kernel model prices that faster. The search ranks configs by Family.modelled_seconds and
    the entry is priced from traces; at config-whole proxies the two agree within 1%
    (tests/test_scaled_work.py), so this guards what warm_start cannot: a study that never
    evaluated MLX's configuration (warm_start off, a study resumed from an earlier metalforge)
    and the residue (a windowed prefill's barriers, traced up to 1.4x their count)."""
    from metalforge.kernels.timing.compare import priced_entry
    mlx = target.family.mlx_config(target.shape, target.dtype, device)
    if mlx is None or mlx == out["config"] or out.get("unpriced"):
        return out
    theirs = priced_entry(target.family, target.shape, target.dtype, devices.get(device), {**out, "config": mlx})
    return theirs if not theirs.get("unpriced") and theirs["time_s"] < out["time_s"] else out
