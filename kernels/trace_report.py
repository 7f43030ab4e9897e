"""`metalforge trace`: what our kernel and MLX's real kernel for the same job do, counted by the
emulator's trace mode (emulator/trace.py) and shown side by side.

Ours: the family's config (given, else the one results.lookup picks for the device), each launch
run as the one-kernel library MLX generates for it. MLX's: the kernel MLX's host code picks for
the job on that device (quantized.cpp, scaled_dot_product_attention.cpp; kernels/mlx_dispatch.py
holds those rules as data), run from MLX's own headers (kernels/mlx_library.py).
"""
from __future__ import annotations

import dataclasses
import math

import mlx.core as mx

from metalforge.emulator.library import run_custom_kernel
from metalforge.emulator.trace import SECTORS, Dispatch
from metalforge.kernels import mlx_headers
from metalforge.kernels.family import LENGTHS


def ours(fam, config, shape, dtype, inputs: dict) -> list[Dispatch]:
    env, out = dict(inputs), []
    for launch in fam.launches(config, shape, dtype):
        if launch.lengths:
            env[LENGTHS] = mx.array(launch.lengths, dtype=mx.int32)
        results, fn = run_custom_kernel(launch.kernel, headers=mlx_headers.include_root(),
                                        inputs=[env[n] for n in launch.kernel.input_names],
                                        output_shapes=launch.output_shapes, output_dtypes=launch.output_dtypes,
                                        grid=launch.grid, threadgroup=launch.threadgroup, init_value=launch.init_value)
        env.update(zip(launch.kernel.output_names, results))
        tg = tuple(min(t, g) for t, g in zip(launch.threadgroup, launch.grid))
        out.append(Dispatch(launch.kernel.name, tuple(math.ceil(g / t) for g, t in zip(launch.grid, tg)), tg,
                          fn.last_trace))
    return out


def mlx(fam, shape, dtype, device) -> list[Dispatch]:
    """MLX's kernels for the job as mlx-lm calls MLX (Family.mlx_jobs), as MLX's rules choose them
    on this device (kernels/mlx_dispatch.py), each run on its job's own inputs (a contiguous
    cache where ours reads a paged pool): the counters depend on sizes, not values."""
    from metalforge.kernels.timing import mlx_jobs
    return [d for op, sizes in fam.mlx_jobs(dataclasses.asdict(shape))
            for d in mlx_jobs.traced(op, sizes, dtype.name, device.name)]


def report(fam, config, shape, dtype, device, seed: int = 0) -> dict:
    inputs = fam.make_inputs(shape, dtype, seed)
    return {"family": fam.name, "device": device.name, "shape": fam.describe(shape), "dtype": dtype.name,
            "ours": [t.as_dict() for t in ours(fam, config, shape, dtype, inputs)],
            "mlx": [t.as_dict() for t in mlx(fam, shape, dtype, device)]}


def _totals(side: list[dict]) -> dict:
    """One column: the counters summed over a side's dispatches."""
    out: dict = {}
    for d in side:
        c = d["counters"]
        for key in ("threads", "threadgroups", "barriers", "simd_functions", "threadgroup_accesses",
                    "bank_conflicts", "matrix_loads", "matrix_stores", "matrix_multiplies"):
            out[key] = out.get(key, 0) + c[key]
        out["threadgroup memory (B)"] = max(out.get("threadgroup memory (B)", 0), c["threadgroup_memory_bytes"])
        for b in c["device"].values():
            out["device accesses"] = out.get("device accesses", 0) + b["accesses"]
            out["device instructions"] = out.get("device instructions", 0) + b["instructions"]
            for size in SECTORS:
                out[f"{size}-B sectors"] = out.get(f"{size}-B sectors", 0) + b["sectors"][size]
            out["device footprint (B)"] = out.get("device footprint (B)", 0) + b["footprint_bytes"]
    return out


def format_table(data: dict) -> str:
    ours_t, mlx_t = _totals(data["ours"]), _totals(data["mlx"])
    lines = [f"{data['family']} {data['shape']} {data['dtype']} on {data['device']}"]
    for side in ("ours", "mlx"):
        for d in data[side]:
            lines.append(f"  {side:4} {d['kernel']}: {d['threadgroups']} threadgroups of {d['threadgroup']}")
    lines.append(f"  {'counter':24} {'ours':>14} {'mlx':>14}")
    for key in dict.fromkeys([*ours_t, *mlx_t]):
        lines.append(f"  {key:24} {ours_t.get(key, 0):>14,} {mlx_t.get(key, 0):>14,}")
    return "\n".join(lines)
