"""Interrupts held over work that must not be cut, delivered when it ends or lets them through."""
import os
import signal

import pytest

from metalforge import signals


def test_ctrl_c_inside_held_arrives_when_it_ends():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals.held():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("after the signal")   # not cut here
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the real handler is back"


def test_released_lets_a_held_interrupt_through_at_once():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals.held():
            os.kill(os.getpid(), signal.SIGINT)
            with signals.released():
                reached.append("inside released")
            reached.append("after released")
    assert reached == []


def test_deliver_between_steps_and_nothing_pending_is_silent():
    with signals.held():
        signals.deliver()   # nothing arrived: no effect
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signals.deliver()
    # the arrival was delivered once, not again at the end of held()


_CTRL_C_WHILE_FORKING = """
import os, signal
from metalforge.emulator import confine
os.register_at_fork(before=lambda: os.kill(os.getpid(), signal.SIGINT))   # lands mid-fork
try:
    confine.run(["true"], confine.Walls(read=None, memory_bytes=None, cpu_seconds=None), 30)
except KeyboardInterrupt:
    print("interrupted")
else:
    print("lost")
"""


def test_ctrl_c_landing_while_a_tool_forks_is_not_lost():
    """Python drops exceptions raised in at-fork handlers; without the hold the run went on."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _CTRL_C_WHILE_FORKING], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "interrupted", out.stderr[-2000:]
