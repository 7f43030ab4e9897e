"""metalforge: generate, check, autotune and run Apple-GPU (Metal) kernels for LLM decoding on MLX.

    from metalforge import kernels        # families, devices, checks, emulator
    from metalforge.kernels import emulator
    from metalforge import tuner          # Optuna autotuning, results lookup
"""
__version__ = "0.1.0"
