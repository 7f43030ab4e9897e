"""`metalforge tune`: tune a model's (or a shapes file's) kernels for a device and save the results."""
from __future__ import annotations

import multiprocessing
import re

import optuna

from metalforge.errors import MetalforgeError
from metalforge.kernels import devices, dtypes
from metalforge.kernels.families import FAMILIES
from metalforge.tuner import results, shapes
from metalforge.tuner.study import Settings, entry, run_study, study_name


def add_arguments(p) -> None:
    p.add_argument("--device", default="auto", help="device profile name, or auto (detect)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="mlx-lm model folder (its config.json gives the shapes)")
    src.add_argument("--shapes", help="YAML file: {family: [{field: value}, ...]}")
    p.add_argument("--families", help="comma-separated subset of: " + ", ".join(FAMILIES))
    p.add_argument("--dtype", default="float16", help="activation dtype (float16, bfloat16, float32)")
    p.add_argument("--contexts", default=",".join(map(str, shapes.DEFAULT_CONTEXTS)),
                   help="decode context lengths, bucketed to powers of two")
    p.add_argument("--trials", type=int, default=24, help="finished trials per study (resumed studies count theirs)")
    p.add_argument("--timeout", type=float, help="seconds per study")
    p.add_argument("--storage", help="Optuna storage: SQLAlchemy URL or journal file (default: per-device SQLite)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing each study")
    p.add_argument("--sampler", default="auto", help="auto (grid for small spaces, else TPE), tpe, random, grid")
    p.add_argument("--seed", type=int)
    p.add_argument("--results", help="results YAML to merge into (default: the user's results folder)")
    p.add_argument("--plot", action="store_true", help="write a PNG of each study's history")


def _settings(args, device) -> Settings:
    if args.trials < 1:
        raise MetalforgeError("--trials must be at least 1")
    return Settings(device=device.name, trials=args.trials, timeout=args.timeout, storage=args.storage,
                    sampler=args.sampler, seed=args.seed)


def _worker(target, args_dict) -> None:
    """An extra process on the same study (spawned: nothing is shared but the storage)."""
    import argparse
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = argparse.Namespace(**args_dict)
    run_study(target, _settings(args, devices.get(args.device)))


def run(args) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = devices.resolve(args.device)
    dtype = dtypes.get(args.dtype).name
    try:
        contexts = [int(c) for c in str(args.contexts).split(",") if c]
    except ValueError:
        raise MetalforgeError(f"--contexts must be comma-separated integers, got '{args.contexts}'") from None
    if args.model:
        shape_sets = shapes.from_model_folder(args.model, contexts=contexts)
    elif args.shapes:
        shape_sets = shapes.from_yaml(args.shapes)
    else:
        shape_sets = shapes.from_model_config(shapes.BUILTIN_MODEL, contexts=contexts)
    default_families = None if args.shapes else shapes.MODEL_FAMILIES
    families = args.families.split(",") if args.families else default_families
    for f in families or []:
        if f not in FAMILIES:
            raise MetalforgeError(f"unknown family '{f}' in --families; valid families: {', '.join(FAMILIES)}")
    targets = shapes.targets(shape_sets, families, dtype)
    if not targets:
        raise MetalforgeError("nothing to tune: no shapes for the chosen families")
    settings = _settings(args, device)
    timer_kind = settings.timer.kind
    print(f"tuning {len(targets)} studies for {device.display_name} ({dtype}); timer: {timer_kind}"
          + ("  [MODELLED: analytic estimates, not Metal measurements]" if timer_kind == "model" else ""))
    rows, new_entries = [], []
    for target in targets:
        extra = []
        if args.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            extra = [ctx.Process(target=_worker, args=(target, dict(vars(args), fn=None, device=device.name)))
                     for _ in range(args.workers - 1)]
            for proc in extra:
                proc.start()
        study = _run_with_progress(target, settings)
        for proc in extra:
            proc.join()
        e = entry(study, target)
        rows.append((target, e))
        if e:
            new_entries.append((target.family, target.bucket, e))
        if args.plot:
            from metalforge.tuner.plots import plot_history
            name = re.sub(r"[^\w.=,-]+", "_", study_name(device, target))
            path = results.user_results_dir() / "plots" / f"{name}.png"
            plot_history(study, path, study_name(device, target) + f"  [{timer_kind}]")
            print(f"  plot: {path}")
    path = args.results or results.user_results_dir() / f"{device.name}.yaml"
    results.save_entries(path, device.name, new_entries)
    _summary(rows, timer_kind)
    print(f"results: {path}")
    return 0


def _run_with_progress(target, settings):
    from tqdm import tqdm
    label = f"{target.family} {target.bucket.split('|')[0]}"
    with tqdm(total=settings.trials, desc=label[:60], unit="trial", leave=True) as bar:
        def progress(study, trial):
            if "duplicate_of" not in trial.user_attrs:
                bar.update(1)
            try:
                bar.set_postfix(best=f"{study.best_value * 1e6:.1f}us")
            except ValueError:
                pass
        study = run_study(target, settings, progress)
    return study


def _summary(rows, timer_kind: str) -> None:
    print(f"\n{'family':18} {'shape':44} {'best config':52} {'time':>9} {'MLX':>9} {'speedup':>7} "
          f"{'ok':>3} {'inv':>3} {'dup':>3} {'fail':>4}")
    for target, e in rows:
        shape = target.bucket.split("|")[0]
        if e is None:
            print(f"{target.family:18} {shape:44} {'(no trial completed)':52}")
            continue
        config = " ".join(f"{k}={v}" for k, v in e["config"].items())
        c = e["trials"]
        speed = f"{e['speedup']:.2f}x" if e["speedup"] else "-"
        base = f"{e['baseline_s'] * 1e6:8.1f}u" if e["baseline_s"] else "-"
        print(f"{target.family:18} {shape[:44]:44} {config[:52]:52} {e['time_s'] * 1e6:8.1f}u {base:>9} {speed:>7} "
              f"{c['complete']:3d} {c['invalid']:3d} {c['duplicate']:3d} {c['failed']:4d}")
    print(f"(times in microseconds per call, timer: {timer_kind}"
          + (": MODELLED for the target device, not measured" if timer_kind == "model" else ", measured on Metal") + ")")
