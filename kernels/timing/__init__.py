"""The per-kernel time model: the time of a dispatch priced from what the emulator's trace mode
counted it doing (traces.py: counters at a small proxy shape, scaled to the real one; model.py: the
price and the fit of its constants to published per-kernel timings; mlx_jobs.py: MLX's real kernels,
chosen by MLX's rules, run at a proxy shape). The same price applies to MLX's kernels and ours.
"""
