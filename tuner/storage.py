"""Where studies live: opening an Optuna storage from what the user gave (SQLite by default, any
SQLAlchemy URL, a journal file), riding out a database that restarts or a network that blips,
and naming studies so that one made over another search space is never resumed by mistake."""
from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from pathlib import Path

import optuna
from optuna.storages import BaseStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend

from metalforge import devices, signals
from metalforge.errors import MetalforgeError
from metalforge.results import user_results_dir
from metalforge.tuner.recovery import RETRY
from metalforge.tuner.shapes import Target


class StorageUnavailable(MetalforgeError):
    """The database stayed out of reach longer than the storage timeout: the run stops, resumable."""


def mask(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***: storage URLs carry secrets,
    and errors, notices and logs quote them."""
    return re.sub(r"(\b[\w+.-]+://[^:/@\s]*:)[^@\s]*@", r"\1***@", str(text))


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


def storage_for(device, storage: str | None, heartbeat_s: float = 10.0, timeout_s: float = 300.0):
    """Default: a SQLite file per device in the user's results folder. Any SQLAlchemy URL works
    (PostgreSQL for several machines); a path ending in .log / .journal is an Optuna journal file;
    "memory" keeps the study in this process only.
    RDB storages get heartbeats, so trials of a killed worker are failed and retried, and every
    call to them is retried while the database is out of reach, for up to `timeout_s`."""
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
    # a connection the server dropped (restart, network) is replaced before use, not failed on
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {"pool_pre_ping": True}
    if storage.startswith("postgresql"):
        # a worker paused (or cut off) inside a transaction would hold its row locks, and with them
        # every other worker, for as long as it is gone: the server ends such a session once the
        # worker's trial would be stale anyway, and the worker's next call reconnects
        idle_ms = int(3 * heartbeat_s * 1000)
        engine["connect_args"] = {"options": f"-c idle_in_transaction_session_timeout={idle_ms}"}
    started, attempt = time.monotonic(), 0
    while True:
        attempt += 1
        try:
            rdb = optuna.storages.RDBStorage(
                storage, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=RETRY)
            _REACHED.add(storage)
            return Resilient(_CachedStorage(rdb), rdb, storage, timeout_s)
        except Exception as e:  # sqlalchemy errors: bad URL, missing driver, unreachable server
            # several workers opening a new database at once race to create its tables: the losers
            # fail on a duplicate table or version row, and a moment later find the tables made
            if _schema_race(e) and attempt < _SCHEMA_ATTEMPTS:
                time.sleep(0.2 * attempt)
                continue
            # a server this process reached before is restarting (the next study of a run): waited
            # for like one restarting mid-trial; one never reached is a wrong URL until shown otherwise
            if _transient(e) and storage in _REACHED and time.monotonic() - started < timeout_s:
                if attempt == 1:
                    print(f"metalforge: tuning storage {mask(storage)} out of reach ({_first_line(e)}); "
                          f"retrying for up to {timeout_s:g} s", file=sys.stderr, flush=True)
                time.sleep(min(5.0, 0.25 * 2 ** min(attempt, 5)))
                continue
            raise MetalforgeError(f"cannot open tuning storage '{mask(storage)}': {_first_line(e)}") from None


_REACHED: set[str] = set()   # storage URLs this process has opened
_SCHEMA_ATTEMPTS = 5


def _schema_race(e: Exception) -> bool:
    text = str(e).lower()
    return ("already exists" in text or "unique constraint" in text or "duplicate" in text
            or "database is locked" in text)


def _first_line(e: BaseException) -> str:
    return mask(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def _transient(e: BaseException) -> bool:
    """A database out of reach for now (restarting, network down, locked), as opposed to a wrong
    URL, a missing driver or a bug: SQLAlchemy's OperationalError and InterfaceError, also when
    Optuna wraps them in its StorageInternalError."""
    import sqlalchemy.exc as sa
    while e is not None:
        # (PendingRollbackError: a session whose connection died mid-transaction, until removed)
        if isinstance(e, (sa.OperationalError, sa.InterfaceError, sa.PendingRollbackError)) or \
                (isinstance(e, sa.DBAPIError) and e.connection_invalidated):
            return True
        e = e.__cause__
    return False


def _database_error(e: BaseException):
    """The database's own error in `e` (also under Optuna's StorageInternalError), else None."""
    import sqlalchemy.exc as sa
    return next((x for x in (e, e.__cause__) if isinstance(x, sa.SQLAlchemyError)), None)


class Resilient(BaseStorage, BaseHeartbeat):
    """An RDB storage whose calls are retried with backoff while the database is out of reach,
    with one line when it goes and one when it is back; past `timeout_s` the call raises
    StorageUnavailable (the study is intact: the same command resumes it). Heartbeats, sent from
    a thread, never raise: the run's own next call meets the outage."""

    def __init__(self, backend, rdb, url: str, timeout_s: float):
        self._backend, self._rdb, self._url, self._timeout_s = backend, rdb, url, timeout_s
        self._lock = threading.Lock()
        self._down_since: float | None = None   # shared by the run and its heartbeat thread

    def _call(self, name: str, *args, **kwargs):
        method = getattr(self._backend, name)
        delay = 0.25
        while True:
            try:
                result = method(*args, **kwargs)
            except Exception as e:
                if not _transient(e):
                    refusal = _database_error(e)
                    if refusal is not None:   # permissions, a full disk: the database's word, one line
                        raise MetalforgeError(f"tuning storage {mask(self._url)}: {_first_line(refusal)}") from None
                    raise
                self._outage(e)
                self._forget_session()
                with signals.released():   # nothing half written now: Ctrl-C may stop the wait
                    time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._recovered()
            return result

    def _forget_session(self) -> None:
        """Drop this thread's database session: one whose connection died mid-transaction refuses
        every later call until it is rolled back, which the dead connection cannot do."""
        try:
            self._rdb.remove_session()
        except Exception:
            pass   # it is being thrown away: what it says on the way out changes nothing

    def _outage(self, e: Exception) -> None:
        with self._lock:
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                print(f"metalforge: tuning storage {mask(self._url)} out of reach ({_first_line(e)}); "
                      f"retrying for up to {self._timeout_s:g} s", file=sys.stderr, flush=True)
            elif now - self._down_since > self._timeout_s:
                raise StorageUnavailable(
                    f"tuning storage {mask(self._url)} out of reach for {self._timeout_s:g} s "
                    f"({_first_line(e)}); the study is kept: run the same command again to resume") from None

    def _recovered(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is not None:
                print(f"metalforge: tuning storage back after {time.monotonic() - self._down_since:.1f} s",
                      file=sys.stderr, flush=True)
                self._down_since = None

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._call("record_heartbeat", trial_id)
        except StorageUnavailable:
            pass

    def __getattr__(self, name):   # anything else of the backend (engine, url, ...) as is
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._backend, name)


def _retried(name: str):
    def method(self, *args, **kwargs):
        return self._call(name, *args, **kwargs)
    method.__name__ = name
    return method


for _name in sorted({n for base in (BaseStorage, BaseHeartbeat) for n in dir(base)
                     if not n.startswith("__") and callable(getattr(base, n))} - set(vars(Resilient))):
    setattr(Resilient, _name, _retried(_name))
Resilient.__abstractmethods__ = frozenset()


# ---- study names ---------------------------------------------------------------------------------
def space_version(family) -> str:
    """A short hash of the family's search space (parameter names and domains): a study is only
    resumed over the space it was made with. Optuna refuses a categorical parameter whose choices
    changed ("does not support dynamic value space") and an old config may not exist any more."""
    space = [(p.name, [repr(v) for v in p.domain]) for p in family.params]
    return hashlib.sha256(json.dumps(space).encode()).hexdigest()[:8]


def study_name(device, target: Target) -> str:
    return f"{_base_name(device, target)}/space-{space_version(target.family)}"


def _base_name(device, target: Target) -> str:
    """The name every release gave this study before names carried the space's version."""
    return f"{devices.get(device).name}/{target.family.name}/{target.bucket}"


def earlier_studies(storage, device, target: Target) -> list[str]:
    """Studies of this target made over another search space (an earlier metalforge's)."""
    base, name = _base_name(device, target), study_name(device, target)
    return sorted(s.study_name for s in storage.get_all_studies()
                  if s.study_name != name and (s.study_name == base or s.study_name.startswith(base + "/space-")))
