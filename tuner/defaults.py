"""Regenerate the modelled defaults shipped in results/ for every device profile.

    python -m metalforge.tuner.defaults [--trials 100] [--out results/]

Each study searches the MODELLED objective (no Mac needed); each distinct winning config is then
verified in the emulator before it is written. Entries say `timer: model`: any measured result a
user produces on a Mac replaces them (results.merge).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import optuna

from metalforge import devices
from metalforge import results
from metalforge.tuner import shapes
from metalforge.tuner.study import Settings, entry, run_study
from metalforge.tuner.timers import ModelTimer
from metalforge.tuner.verify import Verifier

# The built-in small model and a Llama-3-8B-sized one: the shapes most users decode with.
MODELS = (
    shapes.BUILTIN_MODEL,
    {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
     "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "quantization": {"group_size": 64, "bits": 4}},
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--devices", help="comma-separated subset of profiles")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    targets = []
    for model in MODELS:
        targets += shapes.targets(shapes.from_model_config(model, contexts=(512, 4096)), shapes.MODEL_FAMILIES,
                                  "float16")
    verified: dict[tuple, bool] = {}
    names = args.devices.split(",") if args.devices else list(devices.profiles())
    for name in names:
        new = []
        for target in targets:
            settings = Settings(device=name, trials=args.trials, storage="memory", timer=ModelTimer(), seed=0,
                                verify=False)
            e = entry(run_study(target, settings), target, name)
            key = (target.family.name, target.bucket, tuple(sorted(e["config"].items())))
            if key not in verified:
                family = target.family
                Verifier(family, target.shape, target.dtype, backend="emulator")(e["config"])
                verified[key] = True
            new.append((target.family.name, target.bucket, e))
        path = Path(args.out) / f"{name}.yaml"
        if path.exists():
            path.unlink()   # regenerated from scratch: shipped defaults hold model entries only
        results.save_entries(path, name, new)
        print(f"{name}: {len(new)} entries -> {path}")


if __name__ == "__main__":
    main()
