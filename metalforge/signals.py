"""Ctrl-C (SIGINT) and a tuning worker's stop (SIGTERM), held over work that must not be cut in
half and delivered again, to the handlers in place, the moment it ends or lets them through."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_holds: list[tuple[dict, list[int]]] = []   # per open held(): the handlers it replaced, what arrived


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()   # where Python runs handlers


@contextmanager
def held():
    """Used inside ctypes callbacks (Python drops their exceptions, so an interrupt there would be
    lost) and around a tuning study's bookkeeping (an interrupt inside Optuna's own updates leaves
    trials half recorded)."""
    if not _main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    previous = {s: h for s, h in previous.items() if h is not None}   # None: not set from Python
    for s in previous:
        signal.signal(s, lambda sig, frame: arrived.append(sig))
    _holds.append((previous, arrived))
    try:
        yield
    finally:
        _holds.pop()
        for s, h in previous.items():
            signal.signal(s, h)
        for sig in arrived:
            signal.raise_signal(sig)


@contextmanager
def released():
    """Inside held(): the real handlers again, for work that an interrupt may stop anywhere (a
    trial's evaluation); what arrived while held is delivered on entry."""
    if not _holds or not _main_thread():
        yield
        return
    previous, arrived = _holds[-1]
    recording = {s: signal.getsignal(s) for s in previous}
    for s, h in previous.items():
        signal.signal(s, h)
    pending, arrived[:] = list(arrived), []
    try:
        for sig in pending:
            signal.raise_signal(sig)
        yield
    finally:
        for s, h in recording.items():
            signal.signal(s, h)


def deliver() -> None:
    """Inside held(): deliver now what arrived meanwhile (between two steps that may be cut)."""
    with released():
        pass
