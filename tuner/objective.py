"""A trial's evaluation: propose a config, check it against the device's limits, verify its output,
time it, and never run one config twice."""
from __future__ import annotations

import time
from typing import Callable

import optuna
from optuna.trial import TrialState

from metalforge import devices, signals
from metalforge.errors import MetalforgeError
from metalforge.kernels.checks import check
from metalforge.tuner.protocol import (DISCARDED, DUPLICATE_OF, ERROR, INVALID, REPEATS, RETIME_OF, SPREAD, TIMER,
                                       WORKER, discarded, interrupted, repeat)
from metalforge.tuner.recovery import THIS_WORKER
from metalforge.tuner.settings import Settings
from metalforge.tuner.shapes import Target
from metalforge.tuner.timers import measures
from metalforge.tuner.verify import Verifier


class CandidateFailed(Exception):
    """A candidate did not compile or gave a wrong answer: its trial fails, the run goes on."""


def config_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


class Objective:
    """Propose, check, verify, time. Invalid configs never reach the renderer; broken ones fail."""

    def __init__(self, target: Target, settings: Settings, study: optuna.Study):
        self.target = target
        self.settings = settings
        self.study = study
        self.family = target.family
        self.device = devices.get(settings.device)
        self.timer = settings.timer
        self._verifier: Verifier | None = None
        self._since_check: list[int] = []   # trials timed since the last good drift check
        self._reference: float | None = None
        self._timing_inputs: dict | None = None   # one set of inputs for every timed run

    @property
    def verifier(self) -> Verifier:
        if self._verifier is None:
            self._verifier = Verifier(self.family, self.target.shape, self.target.dtype,
                                      backend=self.settings.backend, device=self.device)
        return self._verifier

    def suggest(self, trial: optuna.Trial) -> dict:
        return {p.name: trial.suggest_categorical(p.name, list(p.domain)) for p in self.family.params}

    def __call__(self, trial: optuna.Trial) -> float:
        """Runs with interrupts held (run_study): they land only in the verification and the
        timing, never inside a write to the study, whose half-done transaction would hold the
        database's lock against the write that records the interruption."""
        trial.set_user_attr(WORKER, THIS_WORKER)
        config = self.suggest(trial)
        reused = self._reuse_earlier(trial, config)
        if reused is not None:
            return reused
        self._check(trial, config)
        self._verify(trial, config)
        self._check_drift()
        return self._time(trial, config)

    def _reuse_earlier(self, trial, config) -> float | None:
        """Never run a config twice; a repeat proposal gets the earlier outcome, so the sampler's
        model stays true (pruning it would tell TPE a good config is bad)."""
        earlier = self._earlier_same_config(trial, config)
        if earlier is None:
            return None
        trial.set_user_attr(DUPLICATE_OF, earlier.number)
        if INVALID in earlier.user_attrs:
            return None   # checked (and pruned) again below: cheap, and it says why
        if earlier.state == TrialState.COMPLETE:
            trial.set_user_attr(TIMER, earlier.user_attrs.get(TIMER, self.timer.kind))
            trial.set_constraint("resources", 0.0)
            return earlier.value
        if earlier.state == TrialState.FAIL:
            trial.set_user_attr(ERROR, earlier.user_attrs.get(ERROR, ""))
            raise CandidateFailed(f"same config as failed trial {earlier.number}")
        raise optuna.TrialPruned(f"same config as trial {earlier.number}, still running")

    def _check(self, trial, config) -> None:
        """The device's limits, before anything is rendered or compiled."""
        problems = check(self.family, config, self.target.shape, self.target.dtype, self.device)
        trial.set_constraint("resources", float(len(problems)))
        if problems:
            trial.set_user_attr(INVALID, "; ".join(map(str, problems)))
            raise optuna.TrialPruned("; ".join(map(str, problems)))

    def _verify(self, trial, config) -> None:
        """The kernel's output against the reference, on proxy shapes (emulated off a Mac)."""
        if not self.settings.verify:
            return
        try:
            with signals.released():
                self.verifier(config)
        except MetalforgeError as e:
            trial.set_user_attr(ERROR, str(e)[:4000])
            raise CandidateFailed(str(e)) from None

    def _time(self, trial, config) -> float:
        with signals.released():
            timing = self.timer.time(self._runner(config), family=self.family, config=config,
                                     shape=self.target.shape, dtype=self.target.dtype, device=self.device)
        trial.set_user_attr(TIMER, timing.kind)
        trial.set_user_attr(SPREAD, timing.spread)
        trial.set_user_attr(REPEATS, timing.repeats)
        # two workers that drew one config at the same moment both passed _reuse_earlier (neither
        # saw the other's parameters yet); by now each sees the other's, and the later-numbered one
        # records itself as the repeat, so a config never counts twice
        earlier = self._earlier_same_config(trial, config)
        if earlier is not None:
            trial.set_user_attr(DUPLICATE_OF, earlier.number)
        self._since_check.append(trial.number)
        return timing.seconds

    def _runner(self, config) -> Callable | None:
        if not measures(self.timer):
            return None
        if self._timing_inputs is None:
            self._timing_inputs = self.family.make_inputs(self.target.shape, self.target.dtype)
        inputs = self._timing_inputs
        return lambda: self.family.run(config, self.target.shape, self.target.dtype, inputs, backend="metal")

    def _earlier_same_config(self, trial, config):
        """The lowest-numbered earlier trial with this config, so two workers that drew the same
        config agree on which of them runs it. Discarded (drifted) trials, trials of killed
        workers (failed without an error) and repeats do not count: the first two are measured
        again, a repeat points at the trial that does count."""
        gone = discarded(self.study)
        key = config_key(config)
        for t in self.study.get_trials(deepcopy=False):
            if t.number >= trial.number or t.number in gone or not t.params or config_key(t.params) != key:
                continue
            # a repeat holds no outcome of its own (it copied, or was pruned waiting for, the
            # trial it repeats); counting it would let an interrupted config's retry repeat a repeat
            # that was pruned while the interrupted trial ran, and the config would never be run
            if interrupted(t) or repeat(t) or t.state == TrialState.WAITING:
                continue
            return t
        return None

    # ---- thermal drift (timers that measure; a model never drifts) -------------------------------
    def _reference_time(self) -> float:
        config = self.family.default_config()
        return self.timer.time(self._runner(config), family=self.family, config=config, shape=self.target.shape,
                               dtype=self.target.dtype, device=self.device).seconds

    def _check_drift(self) -> None:
        if not measures(self.timer):   # a model does not drift
            return
        if self._reference is None:
            self._reference = self._reference_time()
            return
        if len(self._since_check) < self.settings.drift_every:
            return
        now = self._reference_time()
        if abs(now / self._reference - 1) <= self.settings.drift_threshold:
            self._since_check = []
            return
        # Drifted: the trials since the last good check were timed on a changed machine.
        gone = sorted(discarded(self.study) | set(self._since_check))
        self.study.set_user_attr(DISCARDED, gone)
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        for n in self._since_check:
            self.study.enqueue_trial(by_number[n].params, user_attrs={RETIME_OF: n})
        self._since_check = []
        for _ in range(3):
            time.sleep(self.settings.cooldown_s)
            now = self._reference_time()
            if abs(now / self._reference - 1) <= self.settings.drift_threshold:
                return
        self._reference = now   # the machine settled at a new speed: compare against that from now on
