"""metalforge: generate, check, autotune and run Apple-GPU (Metal) kernels for LLM decoding on MLX.

    from metalforge import kernels        # families, devices, checks, launch backends
    from metalforge import emulator       # MSL on the CPU: a drop-in for mx.fast.metal_kernel
    from metalforge import tuner          # Optuna autotuning, results lookup
"""
__version__ = "0.1.0"
