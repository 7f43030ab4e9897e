"""Autotuning of kernel configs per device with Optuna, and the results the engine looks up.

    from metalforge import tuner
    choice = tuner.lookup("m3-max-40", "qmv", dict(M=1, N=4096, K=4096), "float16")
"""
from metalforge.results import lookup
from metalforge.tuner.settings import Settings
from metalforge.tuner.study import run_study
from metalforge.tuner.timers import MetalTimer, ModelTimer, Timer, Timing

__all__ = ["lookup", "run_study", "Settings", "MetalTimer", "ModelTimer", "Timer", "Timing"]
