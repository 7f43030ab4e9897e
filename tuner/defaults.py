"""Regenerate the modelled defaults shipped in results/ for every device profile.

    python -m metalforge.tuner.defaults [--trials 100] [--out results/] [--devices a,b] [--reprice]
                                        [--families a,b]

Each study searches the MODELLED objective (no Mac needed); each distinct winning config is then
verified in the emulator before it is written. Entries say `timer: model`: any measured result a
user produces on a Mac replaces them (results.merge). `--reprice` keeps each shipped entry's
config and prices it again with the per-kernel model against MLX's real kernel (no search: minutes
where the search takes hours on two cores). A regeneration searches the models' buckets and
those the file already holds besides (older shapes: contiguous decode caches, unfused
projections), so none is dropped. `--families` searches only those families again, each winner
merged in where it is priced faster than the bucket's entry (after a change to one family's
kernel, reprice first).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import optuna

from metalforge import devices
from metalforge import results
from metalforge.errors import choices
from metalforge.kernels.families import FAMILIES
from metalforge.tuner import shapes
from metalforge.tuner.settings import Settings
from metalforge.tuner.study import entry, run_study
from metalforge.tuner.timers import ModelTimer
from metalforge.tuner.verify import Verifier

# The built-in small model and a Llama-3-8B-sized one: the shapes most users decode with.
MODELS = (
    shapes.BUILTIN_MODEL,
    {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
     "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "quantization": {"group_size": 64, "bits": 4}},
)

# The range issue 22 is judged over, in every power-of-two bucket the lookup tells apart:
# contexts 512 to 32k, prompts 128 to 4,096, and speculative decoding's verify passes (3 drafts:
# decode attention at 4 query tokens).
CONTEXTS = tuple(2 ** i for i in range(9, 16))
PROMPTS = tuple(2 ** i for i in range(7, 13))
NUM_DRAFT = 3


def model_targets(families: list[str]) -> list[shapes.Target]:
    """Every bucket the shipped files tune: each of MODELS over CONTEXTS, PROMPTS and NUM_DRAFT."""
    out = []
    for model in MODELS:
        out += shapes.targets(shapes.from_model_config(model, contexts=CONTEXTS, prefill=PROMPTS, num_draft=NUM_DRAFT),
                              families, "float16")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--devices", help="comma-separated subset of profiles")
    ap.add_argument("--reprice", action="store_true", help="price the shipped entries' configs again, no search")
    ap.add_argument("--table", metavar="DEVICE", help="print the tune table (markdown) of DEVICE's shipped file")
    ap.add_argument("--families", help="comma-separated families to search again, merged into the shipped files "
                                       "(default: every family the models run, the files regenerated)")
    args = ap.parse_args()
    families = args.families.split(",") if args.families else shapes.model_families()
    if unknown := [f for f in families if f not in FAMILIES]:
        ap.error(f"unknown family '{unknown[0]}'; valid families: {choices(FAMILIES)}")
    if args.table:
        print(tune_table(Path(args.out) / f"{args.table}.yaml"))
        return
    if args.reprice:
        for name in args.devices.split(",") if args.devices else list(devices.profiles()):
            reprice(Path(args.out) / f"{name}.yaml", name)
        return
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    targets = model_targets(families)
    verified: dict[tuple, bool] = {}
    names = args.devices.split(",") if args.devices else list(devices.profiles())
    for name in names:
        path = Path(args.out) / f"{name}.yaml"
        new = search(targets + held(path, families, {(t.family.name, t.bucket) for t in targets}), name,
                     args.trials, verified)
        if path.exists() and not args.families:
            path.unlink()   # regenerated: every bucket it held searched again, none dropped
        results.save_entries(path, name, new)
        print(f"{name}: {len(new)} entries -> {path}")


def search(targets: list[shapes.Target], device: str, trials: int, verified: dict) -> list[tuple[str, str, dict]]:
    """(family, bucket, entry) of each target's study on `device`, each distinct winner verified in
    the emulator once (`verified` remembers them across devices)."""
    new = []
    for target in targets:
        settings = Settings(device=device, trials=trials, storage="memory", timer=ModelTimer(), seed=0, verify=False)
        e = entry(run_study(target, settings), target, device)
        key = (target.family.name, target.bucket, tuple(sorted(e["config"].items())))
        if key not in verified:
            Verifier(target.family, target.shape, target.dtype, backend="emulator")(e["config"])
            verified[key] = True
        new.append((target.family.name, target.bucket, e))
    return new


def held(path: Path, families: list[str], taken: set) -> list[shapes.Target]:
    """The targets of the buckets a shipped file holds for these families, less those `taken`."""
    out = []
    for family, buckets in (results.load(path)["entries"] if path.exists() else {}).items():
        if family in families:
            out += [shapes.Target(family, e["shape"], e["dtype"]) for key, e in buckets.items()
                    if (family, key) not in taken]
    return out


def tune_table(path: Path) -> str:
    """The shipped entries of one device as docs/tuning.md's table, each ratio gated by its
    family's per-kernel error (kernels/timing/gate.py), and the kernel each bucket ships ("mlx"
    where MLX's real kernel is priced faster than our config)."""
    from metalforge.kernels.timing import gate
    lines = ["| family | shape | ours | MLX's real kernel | MLX's time | ours vs MLX | ships |",
             "|---|---|---|---|---|---|---|"]
    for family, buckets in results.load(path)["entries"].items():
        for e in buckets.values():
            shape = ", ".join(f"{k}={v}" for k, v in e["shape"].items() if v or k not in ("block_size", "num_blocks"))
            if e.get("unpriced"):     # its time_s is the search's analytic cost: not comparable, not shown
                lines.append(f"| {family} | {shape} | - | - | - | not priced ({e['unpriced'].split(': trace')[0]}) | - |")
                continue
            mlx = f"{e['baseline_s'] * 1e6:.1f} us" if e.get("baseline_s") else "-"
            lines.append(f"| {family} | {shape} | {e['time_s'] * 1e6:.1f} us | `{e.get('baseline_kernel', '-')}` | {mlx} | "
                         f"{gate.claim(e.get('speedup'), family)} | {e.get('ships', '-')} |")
    return "\n".join(lines)


def reprice(path: Path, device: str) -> None:
    """Each entry of a shipped file priced again by the per-kernel model, its config kept."""
    from metalforge.kernels import get_family
    from metalforge.kernels.timing.compare import priced_entry
    dev = devices.get(device)
    new = []
    for family, buckets in results.load(path)["entries"].items():
        fam = get_family(family)
        for bucket, e in buckets.items():
            priced = priced_entry(fam, fam.shape(e["shape"]), e["dtype"], dev, e)
            new.append((family, bucket, priced))
            print(f"{device} {family} {bucket}: MLX / ours {priced.get('speedup') or 0:.2f}", flush=True)
    path.unlink()
    results.save_entries(path, device, new)


if __name__ == "__main__":
    main()
