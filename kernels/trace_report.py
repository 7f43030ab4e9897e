"""`metalforge trace`: what our kernel and MLX's real kernel for the same job do, counted by the
emulator's trace mode (emulator/trace.py) and shown side by side.

Ours: the family's config (given, else the one results.lookup picks for the device), each launch
run as the one-kernel library MLX generates for it. MLX's: the kernel MLX's host code picks for
the job on that device (quantized.cpp, scaled_dot_product_attention.cpp; kernels/mlx_dispatch.py
holds those rules as data), run from MLX's own headers (kernels/mlx_library.py).
"""
from __future__ import annotations

import math
import re
import mlx.core as mx

from metalforge.emulator.library import run_custom_kernel
from metalforge.emulator.trace import SECTORS, Dispatch
from metalforge.errors import MetalforgeError
from metalforge.kernels import mlx_headers, mlx_library
from metalforge.kernels.family import LENGTHS, shape_str


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


def _chip(device) -> tuple[int, str]:
    """(GPU generation, size letter) of a profile's architecture, e.g. applegpu_g15s -> (15, 's')."""
    m = re.match(r"applegpu_g(\d+)(\w)", device.architecture)
    return (int(m.group(1)), m.group(2)) if m else (0, "")


def decode_blocks(device, S: int, gqa: int) -> int:
    """scaled_dot_product_attention.cpp sdpa_vector_2pass(): key blocks by chip size and keys."""
    _, size = _chip(device)
    n_simds = gqa
    if size == "s":
        if S > 1024 and n_simds > 4:
            return 128 if S <= 8192 else 256 if S <= 32768 else 512 if S <= 65536 else 1024
        return 64
    if size == "d":
        if n_simds <= 2 and S > 8192:
            return 256
        if n_simds >= 6 and S >= 16384:
            return 512 if S < 65536 else 1024
        return 128
    return 64 if n_simds >= 4 else 32


def mlx(fam, shape, dtype, device, inputs: dict) -> list[Dispatch]:
    traces: list = []
    gen, size = _chip(device)
    if fam.name in ("qmv", "qmm"):
        x, w, s, b = inputs["x"], inputs["w"], inputs["scales"], inputs["biases"]
        q = dict(group_size=shape.group_size, bits=shape.bits, traces=traces)
        # quantized.cpp: qmv_quad for K of 64 or 128 (power-of-two bits) before any other rule
        if shape.K in (64, 128) and shape.bits & (shape.bits - 1) == 0:
            mlx_library.qmv_quad(x, w, s, b, **q)
        elif fam.name == "qmm" and mlx_library.qmm_splitk_partitions(shape.M, shape.N, shape.K, shape.group_size) > 1:
            mlx_library.qmm_t_splitk(x, w, s, b, **q)
        elif fam.name == "qmm":
            mlx_library.qmm_t(x, w, s, b, **q)
        elif shape.M >= 2 and gen >= 15:
            mlx_library.qmv_wide(x, w, s, b, **q)
        else:
            mlx_library.qmv(x, w, s, b, fast=mlx_library.qmv_fast_applies(shape.N, shape.K, shape.bits), **q)
    elif fam.name == "decode_attention":
        if getattr(shape, "block_size", 0):
            raise MetalforgeError("MLX's decode attention takes a contiguous cache: trace block_size=0")
        q, k, v = inputs["queries"], inputs["keys"], inputs["values"]
        scale = 1 / math.sqrt(shape.D)
        if (size in ("d", "s") and shape.S >= 1024) or (shape.Hkv < shape.Hq and shape.S >= 4096):
            mlx_library.sdpa_vector_2pass(q, k, v, scale=scale, traces=traces,
                                          blocks=decode_blocks(device, shape.S, shape.Hq // shape.Hkv))
        else:
            mlx_library.sdpa_vector(q, k, v, scale=scale, traces=traces)
    elif fam.name == "prefill_attention":
        mlx_library.steel_attention(inputs["queries"], inputs["keys"], inputs["values"], scale=1 / math.sqrt(shape.D),
                                    do_causal=True, traces=traces)
    else:
        raise MetalforgeError(f"trace: no MLX kernel is known for family {fam.name}")
    return traces


def report(fam, config, shape, dtype, device, seed: int = 0) -> dict:
    inputs = fam.make_inputs(shape, dtype, seed)
    return {"family": fam.name, "device": device.name, "shape": shape_str(shape, fam.variant_fields), "dtype": dtype.name,
            "ours": [t.as_dict() for t in ours(fam, config, shape, dtype, inputs)],
            "mlx": [t.as_dict() for t in mlx(fam, shape, dtype.mlx, device, inputs)]}


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
