"""Emulator speed: simulated threads per second and barrier crossings per second for a tree
reduction (barrier-bound) and for our decode attention (SIMD-exchange-bound), with MLX's own CPU
op for the same job timed side by side, the conformance front end's cost per kernel (in its own
process) next to a cold compile, the dispatch overhead of a launch (a sandboxed worker process
and the shared-memory copies) and trace mode's cost (MLX's sdpa_vector and full-size qmv_fast,
plain and traced). Writes
JSON and a PNG next to --out.

    python benchmarks/emulator_speed.py --out benchmarks/results/emulator_speed [--doc docs/benchmarks.md]

`--doc` writes the figures, with the words that explain them (SECTION), into that Markdown file's
"Emulator speed" section.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import mlx.core as mx

from metalforge import emulator
from metalforge.emulator import frontend
from metalforge.emulator import kernel as emulated
from metalforge.kernels import backends, get_family as family
from metalforge.files import write_section
from metalforge.plotting import figure, write_report
from metalforge.provenance import command, revision

REDUCE = """
    uint i = thread_index_in_threadgroup;
    threadgroup float buf[TG];
    buf[i] = x[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint stride = TG / 2; stride > 0; stride /= 2) {
        if (i < stride) buf[i] += buf[i + stride];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (i == 0) out[threadgroup_position_in_grid.x] = buf[0];
"""

HEADING = "Emulator speed"
SECTION = """## {heading}

Written by `{command}` at revision {revision} ({machine}, {cores} cores, load average {load:.1f}
when it ended: other work on the cores slows every figure). The emulator is not a
GPU: each simulated thread is a fiber on a CPU core, so its speed is that of a scalar CPU
implementation. Per kernel: the best of three runs, the simulated threads, barrier crossings and
SIMD lane exchanges per second (the emulator's own counts), and MLX's CPU op for the same job
timed alongside:

| kernel | ms | M threads/s | M barrier crossings/s | M SIMD lane exchanges/s | MLX's CPU op, ms | emulator / MLX |
|---|---:|---:|---:|---:|---:|---:|
{kernels}

The conformance front end (clang parsing the generated MSL against the emulator's Metal header,
precompiled once) costs {front_ms:.0f} ms a kernel against {compile_ms:.0f} ms for the same kernel's
cold compile and a small run ({share:.0%}; {front_kernels} kernels, a fresh cache). A launch (a
message to the sandboxed worker process and back, the buffers' copies) costs, median host time:
{dispatch}. Trace mode (bounds checks, the race log, counting every access) against a plain run
of MLX's own kernels:

| MLX kernel | plain, ms | traced, ms | traced / plain |
|---|---:|---:|---:|
{trace}
"""


def timed(fn, repeats=3):
    fn()  # warm-up (compiles)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t)
    return best


def summary(name, seconds, stats, mlx_seconds):
    """Rates from the emulator's own counts of the last dispatch(es)."""
    return {"kernel": name, "seconds": seconds, **stats,
            "threads_per_s": stats["threads"] / seconds,
            "barrier_crossings_per_s": stats["barrier_crossings"] / seconds,
            "simd_lane_exchanges_per_s": stats["simd_lanes"] / seconds,
            "mlx_cpu_seconds": mlx_seconds, "slowdown_vs_mlx_cpu": seconds / mlx_seconds}


def bench_reduction(n=1 << 20, tg=256):
    x = mx.random.normal((n,))
    k = emulator.metal_kernel(name="bench_reduce", input_names=["x"], output_names=["out"], source=REDUCE)
    run = lambda: k(inputs=[x], template=[("TG", tg)], output_shapes=[(n // tg,)], output_dtypes=[mx.float32],
                    grid=(n, 1, 1), threadgroup=(tg, 1, 1))[0]
    seconds = timed(run)
    mlx_seconds = timed(lambda: mx.sum(x.reshape(-1, tg), axis=1))
    return summary(f"tree reduction, {n} elements, threadgroups of {tg}", seconds, k.last_stats, mlx_seconds)


def bench_decode(S=2048):
    fam = family("decode_attention")
    shape = fam.shape(dict(B=1, Hq=32, Hkv=8, S=S, D=128))
    config = fam.config({"threads": 256, "splits": 4, "share_kv": True, "keys_per_step": 2})
    inputs = fam.make_inputs(shape, "float16")
    mx.eval(inputs)
    seconds = timed(lambda: fam.run(config, shape, "float16", inputs, backend="emulator"))
    stats = {"threads": 0, "barrier_crossings": 0, "simd_lanes": 0}
    for launch in fam.launches(config, shape, "float16"):
        for key, value in backends.kernel(launch.kernel, "emulator").last_stats.items():
            stats[key] += value
    mlx_seconds = timed(lambda: fam.baseline(shape, "float16", inputs))
    return summary(f"decode_attention B=1 Hq=32 Hkv=8 S={S} D=128 fp16, split-K 4", seconds, stats, mlx_seconds)


def bench_front_end():
    """The conformance front end's cost per kernel next to a cold compile of the same kernels (a
    fresh cache, the shared header and runtime object built beforehand: every kernel pays the rest)."""
    spent = []
    check = frontend.check

    def timed_check(msl, kname):
        t = time.perf_counter()
        try:
            return check(msl, kname)
        finally:
            spent.append(time.perf_counter() - t)

    fam = family("decode_attention")
    shape = fam.shape(dict(B=1, Hq=4, Hkv=2, S=64, D=64))
    config = fam.config({"threads": 64, "splits": 2, "share_kv": True, "keys_per_step": 2})
    inputs = fam.make_inputs(shape, "float16")
    x = mx.random.normal((1024,))
    reduce = emulator.metal_kernel(name="fe_reduce", input_names=["x"], output_names=["out"], source=REDUCE)
    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("METALFORGE_CACHE")
        os.environ["METALFORGE_CACHE"] = cache
        try:
            warm = emulator.metal_kernel(name="fe_warm", input_names=["x"], output_names=["out"],
                                         source="out[thread_position_in_grid.x] = x[thread_position_in_grid.x];")
            mx.eval(warm(inputs=[x], output_shapes=[(1024,)], output_dtypes=[mx.float32], grid=(1024, 1, 1),
                         threadgroup=(256, 1, 1))[0])
            frontend.check = timed_check
            emulated.conformance_facts.cache_clear()
            spent.clear()
            t = time.perf_counter()
            mx.eval(reduce(inputs=[x], template=[("TG", 256)], output_shapes=[(4,)], output_dtypes=[mx.float32],
                           grid=(1024, 1, 1), threadgroup=(256, 1, 1))[0])
            mx.eval(fam.run(config, shape, "float16", inputs, backend="emulator"))
            total = time.perf_counter() - t
        finally:
            frontend.check = check
            if previous is None:
                os.environ.pop("METALFORGE_CACHE", None)
            else:
                os.environ["METALFORGE_CACHE"] = previous
    front = sum(spent)
    return {"kernels": len(spent), "front_end_s_per_kernel": front / len(spent),
            "compile_s_per_kernel": (total - front) / len(spent), "front_end_share_of_cold_compile": front / (total - front)}


def bench_dispatch(repeats=200):
    """Host time of one launch of a tiny kernel (32 threads), and of one with 4 MiB in and out:
    what the sandbox adds per call (a message to the worker and back, the buffers' copies)."""
    out = {}
    for label, n in (("tiny", 32), ("4 MiB", 1 << 20)):
        x = mx.random.normal((n,))
        k = emulator.metal_kernel(name=f"dispatch_{n}", input_names=["x"], output_names=["out"],
                                  source="out[thread_position_in_grid.x] = x[thread_position_in_grid.x] + 1.0f;")
        call = lambda: k(inputs=[x], output_shapes=[(n,)], output_dtypes=[mx.float32], grid=(32, 1, 1),
                         threadgroup=(32, 1, 1))[0]
        mx.eval(call())
        times = []
        for _ in range(repeats if n == 32 else repeats // 10):
            t = time.perf_counter()
            mx.eval(call())
            times.append(time.perf_counter() - t)
        out[label] = sorted(times)[len(times) // 2]
    return out


def bench_trace_overhead(S=512, N=14336, K=4096):
    """MLX's own kernels (from its headers) run plain and traced, side by side: what trace mode
    (bounds checks, race log, counting every access) costs a dispatch, for sdpa_vector at S keys
    and for qmv_fast at an 8B model's MLP shape (N rows of K), traced whole."""
    from metalforge.kernels import mlx_library
    q = mx.random.normal((1, 8, 1, 128)).astype(mx.float16)
    k, v = (mx.random.normal((1, 2, S, 128)).astype(mx.float16) for _ in range(2))
    x = mx.random.normal((1, K)).astype(mx.float16)
    w, scales, biases = mx.quantize(mx.random.normal((N, K)).astype(mx.float16), group_size=64, bits=4)
    jobs = {f"MLX sdpa_vector B=1 Hq=8 Hkv=2 S={S} D=128 fp16":
            lambda traces: mlx_library.sdpa_vector(q, k, v, scale=128 ** -0.5, traces=traces),
            f"MLX qmv_fast M=1 N={N} K={K} 4-bit fp16":
            lambda traces: mlx_library.qmv(x, w, scales, biases, group_size=64, bits=4, fast=True, traces=traces)}
    out = []
    for name, run in jobs.items():
        plain = timed(lambda: run(None), repeats=1)
        traced = timed(lambda: run([]), repeats=1)
        out.append({"kernel": name, "plain_s": plain, "traced_s": traced, "trace_overhead": traced / plain})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/emulator_speed", help="OUT.json and OUT.png")
    ap.add_argument("--doc", help=f"also write the figures into this Markdown file's '{HEADING}' section "
                                  "(docs/benchmarks.md)")
    args = ap.parse_args()
    fe = bench_front_end()
    print(f"conformance front end: {fe['front_end_s_per_kernel'] * 1e3:.0f} ms per kernel, cold compile (and a small "
          f"run) {fe['compile_s_per_kernel'] * 1e3:.0f} ms per kernel: {fe['front_end_share_of_cold_compile']:.0%} "
          f"of it ({fe['kernels']} kernels, this CPU)")
    dispatch = bench_dispatch()
    print("dispatch overhead (median host time per launch): " +
          ", ".join(f"{label} {seconds * 1e6:.0f} us" for label, seconds in dispatch.items()))
    tr = bench_trace_overhead()
    for t in tr:
        print(f"trace mode: {t['kernel']}: plain {t['plain_s'] * 1e3:.0f} ms, traced {t['traced_s'] * 1e3:.0f} ms "
              f"({t['trace_overhead']:.1f}x)")
    results = [bench_reduction(), bench_decode()]
    for r in results:
        print(f"{r['kernel']}\n  {r['seconds'] * 1e3:9.1f} ms  {r['threads_per_s'] / 1e6:7.2f} M threads/s  "
              f"{r['barrier_crossings_per_s'] / 1e6:7.2f} M barrier crossings/s  "
              f"{r['simd_lane_exchanges_per_s'] / 1e6:7.2f} M SIMD lane exchanges/s  "
              f"MLX CPU op {r['mlx_cpu_seconds'] * 1e3:.2f} ms (emulator is {r['slowdown_vs_mlx_cpu']:.0f}x slower)")
    fig, ax = figure(figsize=(7, 3))
    names = ["tree reduction", "decode attention"]
    ax.barh(names, [r["threads_per_s"] / 1e6 for r in results], color=["#4c72b0", "#dd8452"])
    ax.set_xlabel("simulated GPU threads per second (millions), this CPU")
    ax.set_title("metalforge emulator speed (CPU emulation, not Metal timings)")
    write_report(args.out, {"front_end": fe, "dispatch_s": dispatch, "trace": tr, "kernels": results}, fig)
    if args.doc:
        write_section(args.doc, HEADING, SECTION.format(
            heading=HEADING, command=command(),
            revision=revision(), machine=f"{platform.system()} {platform.machine()}", cores=os.cpu_count(),
            load=os.getloadavg()[0],
            kernels="\n".join(f"| {r['kernel']} | {r['seconds'] * 1e3:.1f} | {r['threads_per_s'] / 1e6:.2f} | "
                              f"{r['barrier_crossings_per_s'] / 1e6:.2f} | {r['simd_lane_exchanges_per_s'] / 1e6:.2f} | "
                              f"{r['mlx_cpu_seconds'] * 1e3:.2f} | {r['slowdown_vs_mlx_cpu']:.1f}x |" for r in results),
            front_ms=fe["front_end_s_per_kernel"] * 1e3, compile_ms=fe["compile_s_per_kernel"] * 1e3,
            share=fe["front_end_share_of_cold_compile"], front_kernels=fe["kernels"],
            dispatch=", ".join(f"{label} {seconds * 1e6:.0f} us" for label, seconds in dispatch.items()),
            trace="\n".join(f"| {t['kernel']} | {t['plain_s'] * 1e3:.0f} | {t['traced_s'] * 1e3:.0f} | "
                             f"{t['trace_overhead']:.1f}x |" for t in tr)))
        print(f"wrote {args.doc}: {HEADING}")


if __name__ == "__main__":
    main()
