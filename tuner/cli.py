"""`metalforge tune`: tune a model's (or a shapes file's) kernels for a device and save the results.
tqdm and the plots load only when a run shows progress or draws (start-up time)."""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import optuna

from metalforge import arguments
from metalforge.errors import MetalforgeError
from metalforge import devices
from metalforge.kernels import dtypes
from metalforge.kernels.timing import gate
from metalforge.kernels.families import FAMILIES
from metalforge import results
from metalforge.tuner import shapes, worker
from metalforge.tuner.settings import Settings
from metalforge.tuner.storage import study_name
from metalforge.tuner.study import check_sampler, entry, evaluated, open_study, prepare_study, run_study


def add_arguments(p) -> None:
    p.add_argument("--device", default="auto", help="device profile name, or auto (detect)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="mlx-lm model folder (its config.json gives the shapes)")
    src.add_argument("--shapes", help="YAML file: {family: [{field: value}, ...]}")
    p.add_argument("--families", help="comma-separated subset of: " + ", ".join(FAMILIES))
    p.add_argument("--dtype", default="float16", help="activation dtype (float16, bfloat16, float32)")
    p.add_argument("--contexts", default=",".join(map(str, shapes.DEFAULT_CONTEXTS)),
                   help="decode context lengths, bucketed to powers of two")
    p.add_argument("--num-draft", type=int, default=0,
                   help="also tune speculative decoding's verify passes of N drafts (N+1 tokens a sequence)")
    p.add_argument("--trials", type=int, default=24, help="finished trials per study (resumed studies count theirs)")
    p.add_argument("--timeout", type=float, help="seconds per study")
    p.add_argument("--storage", help="Optuna storage: SQLAlchemy URL or journal file (default: per-device SQLite)")
    p.add_argument("--storage-timeout", type=float,
                   help="seconds the storage's database may stay out of reach (restart, network) before the run "
                        "stops, resumable (default: $METALFORGE_STORAGE_TIMEOUT_S, else 300)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing each study")
    p.add_argument("--sampler", default="auto", help="auto (grid for small spaces, else TPE), tpe, random, grid")
    p.add_argument("--seed", type=int)
    p.add_argument("--results", help="results YAML to merge into (default: the user's results folder)")
    p.add_argument("--plot", action="store_true", help="write a PNG of each study's history")


def _settings(args, device) -> Settings:
    arguments.positive_int("--trials", args.trials)
    if args.timeout is not None:
        arguments.positive_number("--timeout", args.timeout)
    if args.seed is not None:
        arguments.seed(args.seed)
    check_sampler(args.sampler)
    more = {}
    if args.storage_timeout is not None:
        more["storage_timeout_s"] = arguments.positive_number("--storage-timeout", args.storage_timeout)
    return Settings(device=device.name, trials=args.trials, timeout=args.timeout, storage=args.storage,
                    sampler=args.sampler, seed=args.seed, **more)


def _contexts(text) -> list[int]:
    try:
        contexts = [int(c) for c in str(text).split(",") if c.strip()]
    except ValueError:
        raise MetalforgeError(f"--contexts must be comma-separated integers, got '{text}'") from None
    if not contexts or min(contexts) < 1:
        raise MetalforgeError(f"--contexts must be positive integers, got '{text}'")
    return contexts


def _results_path(args, device) -> Path:
    """Where results go, checked before any tuning: an unreadable or corrupt file, or a folder
    that cannot be written, is found now rather than after an hour of trials."""
    path = Path(args.results) if args.results else results.user_results_dir() / f"{device.name}.yaml"
    if path.is_dir():
        raise MetalforgeError(f"--results {path}: is a folder, not a results file")
    if path.exists():
        results.load(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=path.parent)
    except OSError as e:
        raise MetalforgeError(f"cannot write results to {path}: {path.parent} is not a writable folder "
                              f"({e.strerror or e})") from None
    probe.close()
    return path


def run(args) -> int:
    # ERROR, not WARNING: Optuna logs an interrupted trial with its traceback, and Ctrl-C is no bug
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # a Ctrl-C inside a database call makes SQLAlchemy log the aborted cursor with a traceback
    logging.getLogger("sqlalchemy").setLevel(logging.CRITICAL)
    device = devices.resolve(args.device)
    dtype = dtypes.get(args.dtype).name
    contexts = _contexts(args.contexts)
    arguments.positive_int("--workers", args.workers)
    settings = _settings(args, device)
    num_draft = arguments.positive_int("--num-draft", args.num_draft, minimum=0)
    if num_draft and args.shapes:
        raise MetalforgeError("--num-draft plans a model's verify passes; a --shapes file lists its shapes itself")
    if args.model:
        shape_sets = shapes.from_model_folder(args.model, contexts=contexts, num_draft=num_draft)
    elif args.shapes:
        shape_sets = shapes.from_yaml(args.shapes)
    else:
        shape_sets = shapes.from_model_config(shapes.BUILTIN_MODEL, contexts=contexts, num_draft=num_draft)
    default_families = None if args.shapes else shapes.model_families()
    families = args.families.split(",") if args.families else default_families
    for f in families or []:
        if f not in FAMILIES:
            raise MetalforgeError(f"unknown family '{f}' in --families; valid families: {', '.join(FAMILIES)}")
    targets = shapes.targets(shape_sets, families, dtype)
    if not targets:
        raise MetalforgeError("nothing to tune: no shapes for the chosen families")
    out_path = _results_path(args, device)
    open_study(targets[0], settings)   # a corrupt journal or unreachable server: an error before any progress bar
    timer_kind = settings.timer.kind
    print(f"tuning {len(targets)} studies for {device.display_name} ({dtype}); timer: {timer_kind}"
          + ("  [MODELLED: analytic estimates, not Metal measurements]" if timer_kind == "model" else ""))
    rows, new_entries = [], []
    for target in targets:
        prepared = prepare_study(target, settings)   # before the workers, which then only run trials
        with worker.Pool(target, settings, args.workers - 1):
            study = _run_with_progress(target, settings, prepared)
        e = entry(study, target, settings.device)
        rows.append((target, e))
        if e:
            new_entries.append((target.family.name, target.bucket, e))
        if args.plot:
            from metalforge.tuner.plots import plot_history
            name = re.sub(r"[^\w.=,-]+", "_", study_name(device, target))
            path = results.user_results_dir() / "plots" / f"{name}.png"
            plot_history(study, path, study_name(device, target) + f"  [{timer_kind}]")
            print(f"  plot: {path}")
    results.save_entries(out_path, device.name, new_entries)
    _summary(rows, timer_kind)
    print(f"results: {out_path}")
    return 0


def _run_with_progress(target, settings, study):
    from tqdm import tqdm
    label = f"{target.family.name} {target.bucket.split('|')[0]}"
    # the bar counts what --trials counts: configs evaluated (not repeats, not over a limit)
    with tqdm(total=settings.trials, desc=label[:60], unit="config", leave=True) as bar:
        def progress(study):
            bar.n = min(evaluated(study), settings.trials)
            bar.refresh()
            try:
                bar.set_postfix(best=f"{study.best_value * 1e6:.1f}us")
            except ValueError:
                pass
        return run_study(target, settings, progress, study)


def _summary(rows, timer_kind: str) -> None:
    print(f"\n{'family':18} {'shape':44} {'best config':52} {'time':>9} {'MLX':>9} {'speedup':>18} "
          f"{'ok':>3} {'inv':>3} {'dup':>3} {'fail':>4}")
    for target, e in rows:
        shape = target.bucket.split("|")[0]
        if e is None:
            print(f"{target.family.name:18} {shape:44} {'(no trial completed)':52}")
            continue
        config = " ".join(f"{k}={v}" for k, v in e["config"].items())
        c = e["trials"]
        speed = ("unpriced" if e.get("unpriced") else "MLX faster: ships MLX" if e.get("ships") == "mlx" else
                 gate.claim(e["speedup"], target.family.name).split(" (")[0] if e["timer"] == "model"
                 else f"{e['speedup']:.2f}x" if e.get("speedup") else "-")
        base = f"{e['baseline_s'] * 1e6:8.1f}u" if e.get("baseline_s") else "-"
        print(f"{target.family.name:18} {shape[:44]:44} {config[:52]:52} {e['time_s'] * 1e6:8.1f}u {base:>9} {speed:>18} "
              f"{c['complete']:3d} {c['invalid']:3d} {c['duplicate']:3d} {c['failed']:4d}")
    print(f"(times in microseconds per call, timer: {timer_kind}"
          + (": MODELLED for the target device, not measured" if timer_kind == "model" else ", measured on Metal") + ")")
    if timer_kind == "model":
        print("(modelled ratios are gated by each family's per-kernel error, leave-one-chip-out on published kernel "
              "timings: 'unvalidated' where a family has none, 'within model error' inside it; "
              "metalforge compare prices a job against MLX's real kernel)")
