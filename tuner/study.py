"""One Optuna study per (device, family, shape bucket, dtype): the trial loop, storage, resume,
parallel workers, drift handling, and the results entry a finished study yields."""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from metalforge import devices, signals
from metalforge.errors import MetalforgeError
from metalforge.kernels.checks import check
from metalforge.results import Entry, lookup, user_results_dir
from metalforge.tuner.sampler import TunerSampler
from metalforge.tuner.protocol import (BASELINE_S, DISCARDED, DUPLICATE_OF, ERROR, FINISHED, INVALID, REPEATS,
                                       RETIME_OF, SPREAD, TIMER, WORKER, discarded, interrupted, repeat, standing)
from metalforge.tuner.shapes import Target
from metalforge.tuner.timers import Timer, default_timer, measures
from metalforge.tuner.verify import Verifier

# Heartbeats (stale trials of killed workers are retried) are marked experimental by Optuna.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class _Retry(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry, minus what belonged to the dead attempt: its worker (the copy would look
    like a trial of a dead worker and be failed again) and its constraint (set anew); and once
    per trial, however many recoveries see it."""

    def __call__(self, study, trial) -> None:
        if any(t.system_attrs.get("failed_trial") == trial.number for t in study.get_trials(deepcopy=False)):
            return
        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != WORKER}
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != "constraints"}
        super().__call__(study, trial)


# A trial whose worker died is run again (twice at most): by the heartbeat when the worker was on
# another machine, at once on resume when it was a process of this machine (see recover_interrupted).
RETRY = _Retry(max_retry=2)


def default_heartbeat_s() -> float:
    """Seconds between a worker's heartbeats; a trial is stale after three missed ones.
    $METALFORGE_HEARTBEAT_S shortens it (tests; a lab on a fast network)."""
    raw = os.environ.get("METALFORGE_HEARTBEAT_S", "10")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 1:
        raise MetalforgeError(f"METALFORGE_HEARTBEAT_S must be a number of seconds >= 1, got {raw!r}")
    return value


class CandidateFailed(Exception):
    """A candidate did not compile or gave a wrong answer: its trial fails, the run goes on."""


@dataclass
class Settings:
    device: object
    trials: int = 24
    timeout: float | None = None
    storage: str | None = None
    timer: Timer = field(default_factory=default_timer)
    backend: str | None = None        # kernel backend used to verify candidates (auto: metal or emulator)
    sampler: str = "auto"             # auto, tpe, random, grid
    seed: int | None = None
    drift_every: int = 8              # re-time the reference config every this many timings
    drift_threshold: float = 0.10     # relative change that counts as drift
    cooldown_s: float = 5.0           # wait after drift before re-measuring
    verify: bool = True
    warm_start: bool = True           # enqueue the default and best known configs first
    heartbeat_s: float = field(default_factory=default_heartbeat_s)


def _check_journal(path) -> None:
    """Refuse a file that is not an Optuna journal before Optuna appends to it: every line JSON.
    (A half-written last line, left by a kill during a write, is Optuna's to skip.)"""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return
    except OSError as e:
        raise MetalforgeError(f"cannot open journal '{path}': {e.strerror or e}") from None
    lines = data.split(b"\n")
    try:
        for line in lines[:-1]:
            if line.strip():
                json.loads(line.decode("utf-8"))
        lines[-1].decode("utf-8")
    except ValueError as e:   # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise MetalforgeError(f"cannot read journal '{path}': not an Optuna journal ({type(e).__name__})") from None


def storage_for(device, storage: str | None, heartbeat_s: float = 10.0):
    """Default: a SQLite file per device in the user's results folder. Any SQLAlchemy URL works
    (PostgreSQL for several machines); a path ending in .log / .journal is an Optuna journal file;
    "memory" keeps the study in this process only.
    RDB storages get heartbeats, so trials of a killed worker are failed and retried."""
    if storage == "memory":
        return optuna.storages.InMemoryStorage()
    if storage is None:
        folder = user_results_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MetalforgeError(f"cannot create the results folder {folder}: {e.strerror or e}") from None
        storage = f"sqlite:///{folder / (devices.get(device).name + '.db')}"
    if storage.endswith((".log", ".journal")) or storage.startswith("journal:"):
        path = storage.removeprefix("journal:")
        _check_journal(path)
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        except OSError as e:
            raise MetalforgeError(f"cannot open journal '{path}': {e.strerror or e}") from None
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                storage, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=RETRY)
        except Exception as e:  # sqlalchemy errors: bad URL, missing driver, unreachable server
            # several workers opening a new database at once race to create its tables: the losers
            # fail on a duplicate table or version row, and a moment later find the tables made
            if _schema_race(e) and attempt + 1 < _SCHEMA_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise MetalforgeError(f"cannot open tuning storage '{storage}': {str(e).splitlines()[0]}") from None


_SCHEMA_ATTEMPTS = 5


def _schema_race(e: Exception) -> bool:
    text = str(e).lower()
    return ("already exists" in text or "unique constraint" in text or "duplicate" in text
            or "database is locked" in text)


def study_name(device, target: Target) -> str:
    return f"{devices.get(device).name}/{target.family.name}/{target.bucket}"


def make_sampler(kind: str, family, trials: int, seed):
    """auto: every config when the budget covers the space, else TunerSampler (tuner/sampler.py);
    tpe: Optuna's TPE as it comes; random; grid."""
    if kind == "auto" and family.space_size() <= trials:
        kind = "grid"
    if kind == "auto":
        return TunerSampler(seed=seed)
    if kind == "grid":
        return optuna.samplers.GridSampler({p.name: list(p.domain) for p in family.params}, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise MetalforgeError(f"unknown sampler '{kind}'; valid samplers: auto, tpe, random, grid")


def open_study(target: Target, settings: Settings) -> optuna.Study:
    family = target.family
    return optuna.create_study(
        study_name=study_name(settings.device, target),
        storage=storage_for(settings.device, settings.storage, settings.heartbeat_s),
        sampler=make_sampler(settings.sampler, family, settings.trials, settings.seed),
        direction="minimize", load_if_exists=True)


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


# ---- workers that died ---------------------------------------------------------------------------
def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken
    for the worker that died; '' where /proc is absent (macOS: the pid alone is checked)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


THIS_WORKER = f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"   # this process, as trials name it


def _worker_alive(worker: str) -> bool | None:
    """Whether the process that ran a trial still runs; None when it ran on another machine
    (only the heartbeat can tell) or the record is unreadable."""
    host, _, rest = worker.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or _start_time(int(pid)) == start


def recover_interrupted(study: optuna.Study) -> int:
    """Queue again the configs of interrupted trials: RUNNING trials of this machine's dead
    workers (killed before Optuna could record anything; failed here at once rather than after
    the heartbeat's grace period) and trials failed by Ctrl-C, each once. Two resuming workers
    cannot both fail a trial (a finished trial refuses a second state change); should both queue
    one Ctrl-C'd config, the second copy is a repeat and gets the first one's outcome."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    recovered = fail_dead_local_workers(study, trials)
    for t in trials:
        if t.state != TrialState.RUNNING and interrupted(t) and t.params and t.number not in retried:
            RETRY(study, study._storage.get_trial(t._trial_id))
            recovered += 1
    return recovered


def fail_dead_local_workers(study: optuna.Study, trials=None, grace_s: float = 30.0) -> int:
    """Fail, and queue again, the RUNNING trials of this machine's workers that died; only the
    worker whose state change lands queues the config. A trial that never got its owner (its
    process died while Optuna created it, before any heartbeat) is failed after `grace_s`."""
    recovered = 0
    now = datetime.datetime.now()
    for t in trials if trials is not None else study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.state != TrialState.RUNNING:
            continue
        orphan = WORKER not in t.user_attrs and t.datetime_start is not None and \
            (now - t.datetime_start).total_seconds() > grace_s
        if not orphan and _worker_alive(t.user_attrs.get(WORKER, "")) is not False:
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        RETRY(study, study._storage.get_trial(t._trial_id))
        recovered += 1
    return recovered


def best_trial(study: optuna.Study):
    done = standing(study)
    return min(done, key=lambda t: t.value) if done else None


class _Budget:
    """Stop at `trials` evaluated configs (repeats are free), or when every config of the space
    has been tried (nothing left to learn)."""

    def __init__(self, family, trials: int):
        self.size = family.space_size()
        self.trials = trials

    def __call__(self, study, trial):
        if evaluated(study) >= self.trials:
            study.stop()
            return
        keys = {config_key(t.params) for t in study.get_trials(deepcopy=False, states=FINISHED)
                if t.params and not interrupted(t)}
        if len(keys) >= self.size:
            study.stop()


def warm_start(study: optuna.Study, target: Target, settings: Settings) -> None:
    """Enqueue the family default and the best known config (results files) before sampling."""
    family = target.family
    if study.get_trials(deepcopy=False):
        return
    seeds = [family.default_config()]
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
    """Run (or resume) the study until it holds `settings.trials` finished trials or times out;
    `study` when prepare_study already opened it."""
    study = study or prepare_study(target, settings)
    objective = Objective(target, settings, study)
    family = target.family
    # an interrupt held over Optuna's bookkeeping lands between trials, not in the next one
    callbacks = [_Budget(family, settings.trials), lambda s, t: signals.deliver()]
    if progress:
        callbacks.append(lambda s, t: progress(s, t))
    started = time.monotonic()
    while evaluated(study) < settings.trials:
        # repeats and over-limit configs are cheap but not free: cap the loop so a sampler stuck
        # on them still ends
        cap = 4 * settings.trials + family.space_size()
        timeout = None if settings.timeout is None else settings.timeout - (time.monotonic() - started)
        if timeout is not None and timeout <= 0:
            break
        try:
            # an interrupt stops a trial's evaluation (Objective lets it through), never Optuna's
            # creating or recording of a trial, which would leave it half made
            with signals.held():
                study.optimize(objective, n_trials=cap, timeout=timeout,
                               callbacks=callbacks, catch=(CandidateFailed,), gc_after_trial=False)
            break
        except ValueError as e:
            # SQLite cannot lock a row (no SELECT ... FOR UPDATE), so two workers can both take the
            # same queued config; the second to finish finds its trial finished by the first, whose
            # result stands. Nothing is lost: go on with the budget.
            if not str(e).startswith("Cannot tell a COMPLETE trial"):
                raise
    _finish_abandoned(study, objective, settings)
    if BASELINE_S not in study.user_attrs:
        study.set_user_attr(BASELINE_S, baseline(target, settings).seconds)
    return study


def _finish_abandoned(study, objective, settings: Settings) -> None:
    """With the budget met, trials held by workers that died must not stay RUNNING for ever:
    this machine's dead workers are seen at once; a trial of another machine's worker is waited
    for until it finishes or its heartbeat goes stale. Configs queued again are evaluated here."""
    if not is_heartbeat_enabled(study._storage):
        return
    deadline = time.monotonic() + 4 * settings.heartbeat_s   # stale after the grace period (3 beats)
    while True:
        with signals.held():   # an interrupt lands in a trial's evaluation or in the sleep
            fail_dead_local_workers(study, grace_s=3 * settings.heartbeat_s)
            optuna.storages.fail_stale_trials(study)
            _run_queued(study, objective)
            # a live local worker finishes its own trials; only other machines' need watching
            unsettled = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                         if _worker_alive(t.user_attrs.get(WORKER, "")) is not True]
        if not unsettled or time.monotonic() > deadline:
            return
        time.sleep(min(1.0, settings.heartbeat_s / 2))


def _run_queued(study, objective) -> None:
    """Evaluate the configs queued again (WAITING trials), each claimed by one worker: Optuna's
    own loop would sample a new config when another worker got there first."""
    for waiting in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if not study._storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING):
            continue   # claimed by another worker
        trial = optuna.Trial(study, waiting._trial_id)
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except CandidateFailed:
            study.tell(trial, state=TrialState.FAIL)
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)   # interrupted: queued again on resume
            raise
        else:
            study.tell(trial, value)


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
        # the search ranked configs by the analytic cost; the entry states the per-kernel model's
        # price of the winner against MLX's real kernel, with the family's per-kernel error
        from metalforge.kernels.timing.compare import priced_entry
        out = priced_entry(target.family, target.shape, target.dtype, devices.get(device), out)
    return out
