"""Modelled decode tokens/s on a Mac: the engine's kernel sequence against mlx-lm's, per device profile.

    python benchmarks/modelled_decode.py [--devices m1,m2-max,m3-max-40,m4-pro] [--contexts 512,4096]
                                         [--out docs/benchmarks.md] [--readme README.md]

The full table (tokens/s per device) goes to --out; the README gets its summary: per model and
context, the ratios to mlx-lm from the lowest device's to the highest's.

MODELLED, not measured. One decode step (one sequence, one token) of the built-in model and an
8B-class model, priced by engine/step_price.py, the module the whole-model check prices mlx-lm's
published runs with (engine/whole_model.py), so both sides answer to the same fit:

- the kernels of the model's op plan (every quantized linear, the LM head, attention per layer,
  and any op a fused family joins): per op, the kernel the engine's op layer picks
  (`Kernels.decide`) - our family's chosen config priced from its trace or MLX's real kernel
  chosen by MLX's rules (attention at the context's power-of-two bucket) - by the per-kernel
  model, each dispatch at the whole-model fit's per-dispatch cost instead of the kernel fit's
  launch; mlx-lm's side is MLX's real kernel for every op. "ours (auto)" is what `auto` runs on a
  Mac (our kernel only on a modelled gain beyond the family's error); "ours (metal)" runs our
  kernel wherever a family serves the op;
- every other dispatch of the step, counted on MLX's graph of a small folder of the same
  architecture (engine/step_glue.py), our side with each fused op and attention run by whichever
  side the priced step runs it, each priced at the fitted per-dispatch cost plus its bytes (an
  analytic count: engine/step_price.py) at the fitted DRAM rate.

The error shown is the whole-model check's held-out error of mlx-lm's modelled tokens/s; our
kernels' prices carry their family's per-kernel error besides (qmv's, or none: unvalidated).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from metalforge import devices
from metalforge.engine import models, step_glue, step_price
from metalforge.errors import MetalforgeError
from metalforge.files import write_section
from metalforge.kernels.timing import fit
from metalforge.tuner import defaults

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("m1", "m2-max", "m3-max-40", "m4-pro")
CONTEXTS = (512, 4096)
MODEL_NAMES = ("built-in (0.5B-class)", "8B-class")


def table(device_names, contexts) -> tuple[list[str], list[dict]]:
    rows = []
    for name, config in zip(MODEL_NAMES, defaults.MODELS):
        layers = models.parse(config, "config").num_hidden_layers
        for context in contexts:
            g = step_glue.counts_for(config, context)
            for dev_name in device_names:
                dev = devices.get(dev_name)
                s = step_price.steps(config, context, dev, g)
                rows.append(dict(model=name, context=context, device=dev.name, layers=layers, **s))
    error = fit.shipped()["whole_model"]["held_out_error"]
    lines = ["| model | context | device | ours (auto) tok/s | ours (metal) tok/s | mlx-lm tok/s | auto / mlx-lm "
             "| metal / mlx-lm | dispatches per layer: ours, mlx-lm |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, m, t = r["ours (auto)"], r["ours (metal)"], r["mlx-lm"]
        lines.append(f"| {r['model']} | {r['context']} | {r['device']} | {a.tokens_per_s:.0f} | {m.tokens_per_s:.0f} "
                     f"| {t.tokens_per_s:.0f} (±{error:.0%}) | {a.tokens_per_s / t.tokens_per_s:.2f}x "
                     f"| {m.tokens_per_s / t.tokens_per_s:.2f}x "
                     f"| {m.dispatches / r['layers']:.0f}, {t.dispatches / r['layers']:.0f} |")
    return lines, rows


def summary(rows: list[dict]) -> list[str]:
    """The README's table: per model and context, ours over mlx-lm from the lowest device's ratio
    to the highest's, and the dispatches per layer (the same on every device)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["context"]), []).append(r)
    lines = ["| model | context | auto / mlx-lm | metal / mlx-lm | dispatches per layer: ours, mlx-lm |",
             "|---|---|---|---|---|"]
    for (name, context), rs in groups.items():
        spans = []
        for side in ("ours (auto)", "ours (metal)"):
            ratios = sorted(r[side].tokens_per_s / r["mlx-lm"].tokens_per_s for r in rs)
            spans.append(f"{ratios[0]:.2f}x" + (f" to {ratios[-1]:.2f}x" if len(ratios) > 1 else ""))
        r = rs[0]
        ours, theirs = (r[side].dispatches / r["layers"] for side in ("ours (metal)", "mlx-lm"))
        lines.append(f"| {name} | {context} | {spans[0]} | {spans[1]} | {ours:.0f}, {theirs:.0f} |")
    return lines


README_SECTION = """## Modelled decode tokens/s (MODELLED)

One decode step (one sequence) of the built-in model and an 8B-class model on {devices}, MODELLED
as the whole-model check prices mlx-lm's published runs (held-out error {error:.1%}; our kernels
carry their family's per-kernel error besides). "auto" runs our kernel only where its modelled
gain exceeds that error, "metal" wherever a family serves the op; each ratio to mlx-lm runs from
the lowest device's to the highest's. Tokens/s per device, and what is traced and what counted:
[docs/benchmarks.md](docs/benchmarks.md#modelled-decode-tokenss-modelled). Written by `{command}`.

{table}
"""


SECTION = """## Modelled decode tokens/s (MODELLED)

Written by `{command}`. MODELLED, not measured: one decode step (one sequence) priced as the
whole-model check prices mlx-lm's published runs (per-kernel prices of the op plan's kernels, and
the fitted per-dispatch cost for every dispatch, theirs and ours alike; see the script's docstring
for what is traced and what is an analytic count). mlx-lm's side is MLX's real kernels; "ours (auto)" runs our
kernel only where its modelled gain exceeds the family's per-kernel error (elsewhere MLX's);
"ours (metal)" runs ours wherever a family serves the op. The error beside mlx-lm is the
whole-model check's held-out error ({error:.1%}); our kernels' prices carry their family's
per-kernel error besides (qmv {qmv}; decode attention {decode}). The fitted per-dispatch cost is
{dispatch_us:.1f} us a dispatch inside a step (a kernel timed alone carries a host round trip
instead, {launch_us:.1f} us in the kernel fit), so the dispatch counts (ours on the Metal path,
mlx-lm; per layer, the step's total over its layers) weigh on both sides alike.

{table}
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default=",".join(DEVICES))
    p.add_argument("--contexts", default=list(CONTEXTS), type=lambda t: [int(c) for c in t.split(",")],
                   help="comma-separated context lengths (tokens)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    # the shipped configs and entries, not this machine's own tuning results
    os.environ["METALFORGE_RESULTS"] = tempfile.mkdtemp(prefix="metalforge-none-")
    try:
        lines, rows = table(args.devices.split(","), args.contexts)
    except MetalforgeError as e:
        print(f"modelled_decode: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    command = " ".join(["python benchmarks/modelled_decode.py"] + (argv if argv is not None else sys.argv[1:]))

    def err(family):
        e = fit.family_error(family)
        return f"{e:.0%}" if e is not None else "unvalidated"
    shipped = fit.shipped()
    section = SECTION.format(command=command, error=shipped["whole_model"]["held_out_error"], qmv=err("qmv"),
                             decode=err("decode_attention"), dispatch_us=shipped["whole_model"]["dispatch_s"] * 1e6,
                             launch_us=shipped["constants"].launch * 1e6, table="\n".join(lines))
    write_section(args.out, "Modelled decode tokens/s (MODELLED)", section)
    write_section(args.readme, "Modelled decode tokens/s (MODELLED)", README_SECTION.format(
        devices=", ".join(dict.fromkeys(r["device"] for r in rows)), error=shipped["whole_model"]["held_out_error"],
        command=command, table="\n".join(summary(rows))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
