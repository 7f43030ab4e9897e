"""The `metalforge` command. Every user-facing problem is one line on stderr and exit status 2.
Subcommands import what they use when they run: `metalforge --help` must not load MLX, Optuna
and the emulator first."""
from __future__ import annotations

import argparse
import sys

from metalforge.errors import MetalforgeError


def _families():
    from metalforge.kernels.families import FAMILIES
    return FAMILIES


def cmd_devices(args) -> int:
    from metalforge import devices
    detected = devices.detect()
    print(f"{'':2}{'name':12} {'GPU':34} {'arch':15} {'cores':>5} {'GB/s':>7} {'TFLOPS':>7} {'tg mem':>7} {'threads':>7}")
    for p in devices.profiles().values():
        mark = "* " if detected and detected.name == p.name else "  "
        print(f"{mark}{p.name:12} {p.display_name:34} {p.architecture:15} {p.gpu_cores:5d} "
              f"{p.memory_bandwidth_gbs:7.1f} {p.peak_fp32_tflops:7.2f} {p.threadgroup_memory_bytes:7d} "
              f"{p.max_threads_per_threadgroup:7d}")
    if detected is None:
        print("\nno Apple GPU detected here: commands take --device NAME")
    elif detected.name not in devices.profiles():
        print(f"\n* detected: {detected.display_name} (no shipped profile; limits from MLX)")
    return 0


def cmd_families(args) -> int:
    import dataclasses
    for fam in _families().values():
        fields = ",".join(f.name for f in dataclasses.fields(fam.shape_type))
        print(f"{fam.name:18} shape {fields}; {len(fam.params)} tunables, {fam.space_size()} configs; "
              f"serves {fam.op or 'no engine op'}")
    return 0


def _family_shape_dtype(args):
    from metalforge.kernels.families import get
    from metalforge.kernels import dtypes
    fam = get(args.family)
    if not args.shape:
        fields = ", ".join(f"{f}=..." for f in fam.shape_type.__dataclass_fields__)
        raise MetalforgeError(f"{fam.name}: --shape is required ({fields})")
    return fam, fam.shape(",".join(args.shape)), dtypes.get(args.dtype)


def _config(fam, items):
    from metalforge.kernels.family import parse_assignments
    return fam.config(parse_assignments(",".join(items or []), what="config"))


def cmd_render(args) -> int:
    from metalforge import devices
    from metalforge.kernels import checks
    fam, shape, dtype = _family_shape_dtype(args)
    config = _config(fam, args.config)
    device = devices.resolve(args.device)
    problems = checks.check(fam, config, shape, dtype, device)
    if problems and not args.force:
        raise MetalforgeError(f"{fam.name}: config is invalid on {device.name}: "
                              + "; ".join(map(str, problems)) + " (--force renders it anyway)")
    print(fam.render(config, shape, dtype))
    return 0


def cmd_check(args) -> int:
    from metalforge import devices
    from metalforge.kernels import checks
    fam, shape, dtype = _family_shape_dtype(args)
    device = devices.resolve(args.device)
    if args.config:
        config = _config(fam, args.config)
        problems = checks.check(fam, config, shape, dtype, device)
        print(f"{fam.name} {config} on {device.name}: " + ("valid" if not problems else "INVALID"))
        for p in problems:
            print(f"  {p}")
        return 1 if problems else 0
    valid, report = checks.check_space(fam, shape, dtype, device)
    print(f"{fam.name} on {device.display_name}, {dtype.name}:")
    print("\n".join(report.lines()))
    return 0


def cmd_trace(args) -> int:
    import json
    from metalforge import devices, results
    from metalforge.kernels import checks, trace_report
    fam, shape, dtype = _family_shape_dtype(args)
    device = devices.resolve(args.device)
    config = _config(fam, args.config) if args.config else results.lookup(device, fam.name, shape, dtype.name).config
    problems = checks.check(fam, config, shape, dtype, device)
    if problems:
        raise MetalforgeError(f"{fam.name}: config is invalid on {device.name}: " + "; ".join(map(str, problems)))
    data = trace_report.report(fam, config, shape, dtype, device)
    print(json.dumps(data, indent=1) if args.json else trace_report.format_table(data))
    return 0


def cmd_compare(args) -> int:
    import json
    from metalforge import devices
    from metalforge.kernels.timing import compare
    if not args.shape:
        raise MetalforgeError("compare: give --shape, e.g. M=1,N=4096,K=4096")
    r = compare.compare(args.family, devices.resolve(args.device), ",".join(args.shape), args.dtype)
    print(json.dumps(r, indent=1) if args.json else compare.format_text(r))
    return 0


def cmd_tune(args) -> int:
    from metalforge.tuner.cli import run
    return run(args)


def cmd_bench(args) -> int:
    from metalforge.tuner.bench import run
    return run(args)


def cmd_generate(args) -> int:
    from metalforge.engine.cli import generate
    return generate(args)


def cmd_cache(args) -> int:
    from metalforge.engine.cli import cache
    return cache(args)


def cmd_serve(args) -> int:
    from metalforge.engine.server.cli import serve
    return serve(args)


def cmd_results(args) -> int:
    from metalforge import results
    data, taken = results.merge_files(args.files, args.out)
    total = sum(len(b) for b in data["entries"].values())
    print(f"{args.out}: {total} entries for {data['device']['name']} ({taken} taken from {len(args.files)} file(s))")
    return 0


def _kernel_arguments(name: str):
    def add(c) -> None:
        c.add_argument("family", help="kernel family: " + ", ".join(_families()))
        c.add_argument("--device", default="auto", help="device profile name, or auto (detect)")
        c.add_argument("--shape", nargs="+", help="shape fields, e.g. M=1,N=4096,K=4096,bits=4,group_size=64")
        c.add_argument("--dtype", default="float16", help="float16, bfloat16 or float32")
        if name != "compare":   # compare prices the chosen config
            c.add_argument("--config", nargs="*", help="parameters, e.g. simdgroups=2 rows_per_simdgroup=4")
        if name == "render":
            c.add_argument("--force", action="store_true", help="render even if the config is invalid")
        if name == "trace":
            c.add_argument("--json", action="store_true", help="print one JSON object with keys ours and mlx")
        if name == "compare":
            c.add_argument("--json", action="store_true", help="one JSON object: ours, mlx, ratio, error, validated")
    return add


def _tune_arguments(t) -> None:
    from metalforge.tuner.cli import add_arguments
    add_arguments(t)


def _bench_arguments(b) -> None:
    src = b.add_mutually_exclusive_group()
    src.add_argument("--model", help="mlx-lm model folder: its shapes, and the engine end to end against mlx-lm")
    src.add_argument("--shapes", help="YAML file of shapes per family")
    b.add_argument("--device", default="auto", help="device profile (default: the detected GPU)")
    b.add_argument("--dtype", default="float16", help="float16, bfloat16 or float32")
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--decode-tokens", type=int, default=128)
    b.add_argument("--out", default="metalforge-bench", help="writes OUT.yaml (measured results), OUT.md and OUT.png")


def _results_arguments(r) -> None:
    rsub = r.add_subparsers(dest="results_command", required=True)
    m = rsub.add_parser("merge", help="merge results files (measured beats modelled, faster beats slower)")
    m.add_argument("files", nargs="+", help="results YAML files of one device")
    m.add_argument("--out", required=True, help="file to write (merged into, if it exists), atomically")


def _generate_arguments(g) -> None:
    from metalforge.engine.cli import add_generate_arguments
    add_generate_arguments(g)


def _cache_arguments(c) -> None:
    from metalforge.engine.cli import add_cache_arguments
    add_cache_arguments(c)


def _serve_arguments(s) -> None:
    from metalforge.engine.server.cli import add_arguments
    add_arguments(s)


# name: (function, help line, adds its arguments); a command's arguments (and the modules they
# import) are built only when that command runs
COMMANDS = {
    "devices": (cmd_devices, "list Apple GPU profiles, marking the detected one", lambda d: None),
    "families": (cmd_families, "list the kernel families: shape fields, tunables, the engine op each serves",
                 lambda f: None),
    "render": (cmd_render, "print the MSL of one config", _kernel_arguments("render")),
    "check": (cmd_check, "check one config, or count the valid configs of the space", _kernel_arguments("check")),
    "trace": (cmd_trace, "count what our kernel and MLX's real kernel for a job do (emulator trace mode), "
                         "side by side", _kernel_arguments("trace")),
    "compare": (cmd_compare, "our chosen config and MLX's real kernel for a job, priced by the per-kernel "
                             "model with the family's error (or 'unvalidated')", _kernel_arguments("compare")),
    "tune": (cmd_tune, "autotune kernel configs for a device (Optuna)", _tune_arguments),
    "bench": (cmd_bench, "on a Mac: time the chosen kernels and the engine against MLX and mlx-lm, "
                         "and write shareable measured results", _bench_arguments),
    "results": (cmd_results, "combine results files from several machines", _results_arguments),
    "generate": (cmd_generate, "generate tokens with an mlx-lm style model folder", _generate_arguments),
    "cache": (cmd_cache, "save, inspect or clear prompt caches", _cache_arguments),
    "serve": (cmd_serve, "an OpenAI-compatible HTTP server over continuous batching", _serve_arguments),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser, or with `only`, that command's arguments alone (the others keep
    their help line): `metalforge --help` imports nothing of MLX, Optuna or the emulator."""
    p = argparse.ArgumentParser(prog="metalforge", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (fn, helptext, arguments) in COMMANDS.items():
        c = sub.add_parser(name, help=helptext)
        if only is None or only == name:
            arguments(c)
        c.set_defaults(fn=fn)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=argv[0] if argv and argv[0] in COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except MetalforgeError as e:
        print(f"metalforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metalforge: interrupted", file=sys.stderr)
        return 130
    except OSError as e:   # the machine's word on a path: unwritable, missing, full, a folder
        where = f"{e.filename}: " if e.filename else ""
        print(f"metalforge: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
