"""The tuner's default sampler: Optuna's TPE, started and kept honest by random proposals.

Two changes to plain TPE, both chosen with benchmarks/tuner_search.py on the modelled objective:
- the random start is counted in *evaluated* configs, not proposals: on a small device most of a
  large space is over a limit and pruned before compiling, and TPE started after five proposals
  may have seen one real outcome;
- every EXPLORE-th proposal is random, so a seed that converged on a local optimum keeps finding
  better regions (without it TPE's mean gap fell behind random search's late in the budget).
"""
from __future__ import annotations

import optuna
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.trial import TrialState

STARTUP = 10   # evaluated configs proposed at random before TPE models them
EXPLORE = 4    # every EXPLORE-th proposal after that is random too


class TunerSampler(BaseSampler):
    def __init__(self, seed: int | None = None, startup: int = STARTUP, explore: int = EXPLORE):
        self._random = RandomSampler(seed=seed)
        # TPE models every finished trial, pruned over-limit configs included (as bad outcomes)
        self._tpe = TPESampler(seed=seed, n_startup_trials=0)
        self._startup = startup
        self._explore = explore
        self._decided: tuple[int | None, bool] = (None, False)   # (trial number, random?)

    def _is_random(self, study: optuna.Study, trial) -> bool:
        """Decided once per trial (asked again for every parameter; with an RDB storage each
        count of the finished trials is a query)."""
        if self._decided[0] != trial.number:
            explore = self._explore and trial.number % self._explore == self._explore - 1
            starting = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < self._startup
            self._decided = (trial.number, bool(explore or starting))
        return self._decided[1]

    def infer_relative_search_space(self, study, trial):
        return {} if self._is_random(study, trial) else self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space) if search_space else {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        sampler = self._random if self._is_random(study, trial) else self._tpe
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._tpe.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._random.reseed_rng()
        self._tpe.reseed_rng()
