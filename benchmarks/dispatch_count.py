"""What a Mac would launch per decoded token and per prefill chunk: the engine's Metal path (our
kernels), the engine's MLX path, and mlx-lm, on the same model folders.

    python benchmarks/dispatch_count.py FOLDER [FOLDER ...] [--context 256] [--chunk 128]
    python benchmarks/dispatch_count.py --demo      # mlx-lm-built 4-bit llama and qwen3 folders
    python benchmarks/dispatch_count.py --demo --out docs/benchmarks.md   # and its table there
    python benchmarks/dispatch_count.py --demo --verifying 2 --plain 2 --drafts 3   # a speculative batch's step

Counted on MLX's lazy graph (engine/dispatches.py): each primitive that launches a kernel on
Metal, each mx.fast op and each of our metal_kernel calls as one, views as none; host
synchronisations made while the pass is built are counted apart. Per layer = (the whole pass -
the pass without its decoder layers) / layers. Counts, not times: they say nothing of a kernel's
length. The last line reads
    dispatches per layer (decode): ours N, mlx-lm M; host syncs per forward: K
for the last folder (ours: the Metal path). With --verifying S: also one decode step of --plain
sequences of one token and S sequences verifying --drafts drafts each, counted as the loop ran
it before speculative requests joined the batch's pass (a pass for the plain ones and one per
verifying sequence) and as one ragged pass, both paths.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from metalforge.engine import dispatches
from metalforge.files import write_section
from metalforge.provenance import revision

SIDES = ("ours (metal)", "ours (mlx)", "mlx-lm")


def per_layer(pair, layers) -> collections.Counter:
    return dispatches.per_layer(*pair, layers)


def demo_folders(root: Path) -> list[Path]:
    """A 4-bit llama and qwen3 built and saved by mlx-lm's own model classes."""
    from mlx_lm.models import llama, qwen3
    from mlx_lm.utils import quantize_model, save_config, save_model
    out = []
    for name, module, extra in (("llama", llama, {}), ("qwen3", qwen3, {"head_dim": 64, "tie_word_embeddings": True})):
        config = dict(model_type=name, hidden_size=256, num_hidden_layers=4, intermediate_size=512,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
                      rope_theta=10000.0, max_position_embeddings=4096, **{"tie_word_embeddings": False, **extra})
        mx.random.seed(0)
        model = module.Model(module.ModelArgs.from_dict(config))
        mx.eval(model.parameters())
        model, config = quantize_model(model, config, group_size=64, bits=4)
        folder = root / f"{name}-4bit"
        save_model(folder, model)
        save_config(config, folder / "config.json")
        out.append(folder)
    return out


def report(folder, results) -> dict:
    """Print one folder's counts (per token, per layer, outside the layers, by kind); return its
    per-layer totals by side and pass, and ours's host syncs."""
    print(f"\n== {folder}")
    totals = {}
    for what in ("decode", "prefill"):
        print(f"  {what}: kernels per token / per layer / outside the layers; host syncs per forward")
        rows = {}
        for side in SIDES:
            layers, pair = results[side]["layers"], results[side][what]
            rows[side] = per_layer(pair, layers)
            totals[side, what] = sum(rows[side].values())
            full, outside = pair
            print(f"    {side:13} {full.total:6d} / {totals[side, what]:6.1f} / {outside.total:4d};"
                  f" host syncs {full.syncs}")
        kinds = sorted(set(rows["ours (metal)"]) | set(rows["mlx-lm"]))
        delta = {k: rows["ours (metal)"].get(k, 0) - rows["mlx-lm"].get(k, 0) for k in kinds}
        shown = ", ".join(f"{k} {v:+g}" for k, v in delta.items() if v)
        print(f"    per layer, ours (metal) - mlx-lm by kind: {shown or 'none'}")
    totals["syncs"] = max(results[side][what][0].syncs for side in SIDES[:2] for what in ("decode", "prefill"))
    return totals


def mixed_step(folder, args) -> None:
    """Print a mixed step's kernels and host syncs, separate passes against one ragged pass."""
    print(f"  one step of {args.plain} plain + {args.verifying} verifying {args.drafts} drafts each "
          f"(after {args.context} tokens): kernels, separate passes -> one ragged pass")
    for side, backend in (("ours (metal)", "metal"), ("ours (mlx)", "mlx")):
        apart, together = dispatches.step_counts(folder, backend, args.device, args.context, args.plain,
                                                 args.verifying, args.drafts)
        print(f"    {side:13} {apart.total:6d} -> {together.total:6d}; host syncs {apart.syncs} -> {together.syncs}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", type=Path)
    p.add_argument("--demo", action="store_true", help="count mlx-lm-built 4-bit llama and qwen3 folders")
    p.add_argument("--device", default="m3-max-40", help="the device profile whose tuned configs the Metal path uses")
    p.add_argument("--context", type=int, default=300, help="tokens in the cache before the counted passes")
    p.add_argument("--chunk", type=int, default=128, help="prompt tokens in the counted prefill pass")
    p.add_argument("--verifying", type=int, default=0, help="speculative sequences in the counted mixed step")
    p.add_argument("--plain", type=int, default=2, help="sequences of one new token in the mixed step")
    p.add_argument("--drafts", type=int, default=3, help="drafts each speculative sequence verifies")
    p.add_argument("--out", type=Path, help=f"also write the table into this Markdown file's '{HEADING}' section "
                                            "(docs/benchmarks.md)")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    folders = list(args.folders) + (demo_folders(Path(tmp.name)) if args.demo else [])
    if not folders:
        p.error("give model folders or --demo")
    table, line = [], ""
    for folder in folders:
        results = {}
        for side, backend in (("ours (metal)", "metal"), ("ours (mlx)", "mlx")):
            layers, decode, prefill = dispatches.engine_counts(folder, backend, args.device, args.context, args.chunk)
            results[side] = dict(layers=layers, decode=decode, prefill=prefill)
        layers, decode, prefill = dispatches.mlx_lm_counts(folder, args.context, args.chunk)
        results["mlx-lm"] = dict(layers=layers, decode=decode, prefill=prefill)
        name = folder.name if args.demo else str(folder)
        t = report(name, results)
        table.append(f"| {name} | {t['ours (metal)', 'decode']:g} | {t['ours (mlx)', 'decode']:g} | "
                     f"{t['mlx-lm', 'decode']:g} | {t['ours (metal)', 'prefill']:g} | {t['mlx-lm', 'prefill']:g} | "
                     f"{t['syncs']} |")
        if args.verifying:
            mixed_step(folder, args)
        line = (f"dispatches per layer (decode): ours {t['ours (metal)', 'decode']:g}, mlx-lm {t['mlx-lm', 'decode']:g}; "
                f"host syncs per forward: {t['syncs']}")
    print(line)
    if args.out:
        command = " ".join(["python benchmarks/dispatch_count.py"] + (argv if argv is not None else sys.argv[1:]))
        write_section(args.out, HEADING, SECTION.format(heading=HEADING, command=command, revision=revision(), chunk=args.chunk,
                                                        context=args.context, rows="\n".join(table), line=line))
    return 0


HEADING = "Dispatches per layer"
SECTION = """## {heading}

Metal kernels a Mac would launch per decoder layer, counted on MLX's graph (each kernel-launching
primitive, `mx.fast` op and `metal_kernel` call once; views none: `engine/dispatches.py`), for
one decode step after {context} tokens and one prefill chunk of {chunk}: the engine's Metal path
(our kernels), its MLX path, and mlx-lm on the same mlx-lm-built folders. Counts, not times.
Written by `{command}` at revision {revision}; the script also prints each pass's kernels per token and outside the
layers, and ours minus mlx-lm's by kind.

| model | decode: ours (Metal path) | decode: ours (MLX path) | decode: mlx-lm | prefill: ours (Metal path) | prefill: mlx-lm | host syncs per forward (ours) |
|---|---:|---:|---:|---:|---:|---:|
{rows}

`{line}`
"""

if __name__ == "__main__":
    sys.exit(main())
