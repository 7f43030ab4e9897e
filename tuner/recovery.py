"""Workers that died, were killed or were paused: which trials they left, and queueing their
configs again, once each."""
from __future__ import annotations

import copy
import datetime
import os
import socket
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from metalforge.tuner.protocol import WORKER, interrupted

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


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken
    for the worker that died; '' where /proc is absent (macOS: the pid alone is checked)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


THIS_WORKER = f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"   # this process, as trials name it


def worker_alive(worker: str) -> bool | None:
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
        if not orphan and worker_alive(t.user_attrs.get(WORKER, "")) is not False:
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        RETRY(study, study._storage.get_trial(t._trial_id))
        recovered += 1
    return recovered
