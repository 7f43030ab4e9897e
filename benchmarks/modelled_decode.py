"""Modelled decode tokens/s on a Mac: the engine's kernel sequence against mlx-lm's, per device profile.

    python benchmarks/modelled_decode.py [--devices m1,m2-max,m3-max-40,m4-pro] [--contexts 512,4096]
                                         [--out docs/benchmarks.md] [--readme README.md]

The full table (tokens/s per device) goes to --out; the README gets its summary: per model and
context, the ratios to mlx-lm from the lowest device's to the highest's.

MODELLED, not measured. One decode step (one sequence, one token) of the built-in model and an
8B-class model, priced as the whole-model check prices mlx-lm's published runs
(kernels/timing/whole_model.py), so both sides answer to the same fit:

- the kernels of the model's op plan (engine/ops.py: every quantized linear, the LM head,
  attention per layer, and any op a fused family joins): per op, the kernel the engine's op layer
  picks (`Kernels.decide`) - our family's chosen config priced from its trace
  (`compare.ours_counted`: a family added to the op plan is priced through its own trace path, no
  edit here) or MLX's real kernel chosen by MLX's rules (`compare.mlx_counted`, the job
  `metalforge compare` prices against the first family serving the op; attention at the context's
  power-of-two bucket) - by the per-kernel model, each dispatch at the whole-model fit's
  per-dispatch cost instead of the kernel fit's launch (model.price_in_step); mlx-lm's side is MLX's real kernel for every
  op. "ours (auto)" is what `auto` runs on a Mac (our kernel only on a modelled gain beyond the
  family's error); "ours (metal)" runs our kernel wherever a family serves the op;
- every other dispatch of the step (norms, RoPE, bias and residual adds, SwiGLU, cache writes,
  casts, the embedding row): counted by engine/dispatches.py's counter on MLX's graph of a
  small folder of the same architecture built by mlx-lm's own classes (same model type, head dim
  and GQA ratio; counts per layer do not depend on the width), our side with each fused op and
  attention run by whichever side the priced step runs it (a fused op of MLX's brings its
  composition's norms, RoPE and adds; one of ours none), each priced at the fitted
  per-dispatch cost plus its bytes at the fitted DRAM rate. The bytes are an ANALYTIC count, not
  a trace (MLX's elementwise kernels are not run in the emulator yet): each dispatch reads two
  and writes one fp16 vector of the residual stream's width (the SwiGLU product, one a layer on
  both sides, moves intermediate / hidden times more: left out on both sides). Sampling is left
  out (the same on both sides).

The error shown is the whole-model check's held-out error of mlx-lm's modelled tokens/s; our
kernels' prices carry their family's per-kernel error besides (qmv's, or none: unvalidated).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from metalforge import devices
from metalforge.engine import dispatches, models
from metalforge.errors import MetalforgeError
from metalforge.files import write_section
from metalforge.kernels import dtypes
from metalforge.kernels.families import get as get_family
from metalforge.kernels.timing import compare, fit, model
from metalforge.tuner import defaults

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("m1", "m2-max", "m3-max-40", "m4-pro")
CONTEXTS = (512, 4096)
MODEL_NAMES = ("built-in (0.5B-class)", "8B-class")
DTYPE = "float16"
PRICED = ("QuantizedMatmul", "mx.fast.scaled_dot_product_attention")   # kinds priced as kernels, with ours


@dataclass(frozen=True)
class Glue:
    """Dispatches of a decode step that are not priced kernels, per layer and outside the layers."""
    per_layer: float
    outside: int


def _glue(counts) -> int:
    return sum(v for k, v in counts.items() if k not in PRICED and not k.startswith("metal_kernel:"))


def small_folder(config: dict, root: Path) -> Path:
    """A 2-layer folder of `config`'s model type, head dim and GQA ratio, built by mlx-lm's classes."""
    from mlx_lm.utils import quantize_model, save_config, save_model
    args = models.parse(config, "config")
    ratio = args.num_attention_heads // args.num_key_value_heads
    hidden = ratio * args.head_dim
    small = {**{k: v for k, v in config.items() if k != "quantization"}, "hidden_size": hidden,
             "intermediate_size": 2 * hidden, "num_attention_heads": ratio, "num_key_value_heads": 1,
             "head_dim": args.head_dim, "num_hidden_layers": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False}
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(0)
    m = module.Model(module.ModelArgs.from_dict(small))
    mx.eval(m.parameters())
    q = config["quantization"]
    m, small = quantize_model(m, small, group_size=q["group_size"], bits=q["bits"])
    folder = root / config["model_type"]
    save_model(folder, m)
    save_config(small, folder / "config.json")
    return folder


class GlueCounts:
    """The dispatches of a decode step after `context` tokens that are not priced kernels,
    counted on a small folder of `config`'s architecture (small_folder): mlx-lm's, and the
    engine's Metal path's with the ops `Roles` names run by MLX's op (each mix counted once)."""

    def __init__(self, config: dict, context: int):
        self.context = context
        self._tmp = tempfile.TemporaryDirectory()
        with contextlib.redirect_stderr(io.StringIO()):
            self.folder = small_folder(config, Path(self._tmp.name))
            # one token short of the context: mlx-lm's cache grows (Full, Concatenate) once every 256
            # tokens, at a multiple of 256; the counted step is a steady one
            layers, decode, _ = dispatches.mlx_lm_counts(self.folder, context - 1, 16)
        self.mlx_lm = _glue_of_step(layers, decode)
        self.roles = Roles(models.parse(json.loads((self.folder / "config.json").read_text()), "config"))
        self._ours: dict[frozenset, Glue] = {}

    def ours(self, mlx_roles=frozenset()) -> Glue:
        """The engine's Metal path, our kernels wherever they serve but for the ops whose roles
        (Roles.of) are in `mlx_roles`, which run MLX's op (its composition, for a fused one)."""
        mlx_roles = frozenset(mlx_roles)
        if mlx_roles not in self._ours:
            with contextlib.redirect_stderr(io.StringIO()):
                layers, decode, _ = dispatches.engine_counts(
                    self.folder, "metal", "m3-max-40", self.context - 1, 16,
                    mlx_for=lambda op, values: self.roles.of(op, values) in mlx_roles)
            self._ours[mlx_roles] = _glue_of_step(layers, decode)
        return self._ours[mlx_roles]


class Roles:
    """What each op of a decode step is for, alike in a model and a smaller one of its
    architecture: a fused op by the weights it runs (a layer's q/k/v, gate/up, o_proj or
    down_proj with the residual add), attention as itself; None for a plain linear (ours or
    MLX's, one priced kernel and no other dispatch)."""

    def __init__(self, args):
        cls = models.get(args.model_type)
        fused = cls.Layer.fused_ops(args, 0, 1, cls)
        self._fused = [(p.op, p.values, tuple(n.removeprefix("model.layers.0.") for n in names))
                       for names, p in fused.items()]

    def all(self) -> list:
        return [role for _, _, role in self._fused] + ["attention"]

    def of(self, op: str, values: dict):
        if op == "attention":
            return op
        return next((role for o, v, role in self._fused if o == op and v == values), None)


def _glue_of_step(layers: int, decode) -> Glue:
    return Glue(_glue(dispatches.per_layer(*decode, layers)), _glue(decode[1].kernels))


def step_ops(config: dict, context: int) -> list[tuple[str, dict, int]]:
    """(op, sizes, times per step) of the op plan's decode ops: each linear as often as the model
    holds it, every other op (a projection with its residual add included) once per layer."""
    args = models.parse(config, "config")
    cls = models.get(args.model_type)
    table = cls.linears(args)
    table.pop("model.embed_tokens")
    if args.tie_word_embeddings:
        table["lm_head"] = (args.vocab_size, args.hidden_size)
    times: dict = {}
    for name, shape in table.items():
        bits, group_size, _ = args.quant_of(name)
        key = tuple(dict(M=1, N=shape[-2], K=shape[-1], bits=bits, group_size=group_size).items())
        times[key] = times.get(key, 0) + 1
    out = []
    for p in cls.op_plan(args, contexts=[context], batch=1):
        plain = p.op == "linear" and not p.values.get("residual")   # a residual one: o_proj or down_proj, once a layer
        n = times.get(tuple(p.values.items()), 0) if plain else args.num_hidden_layers
        out.append((p.op, p.values, n))
    return out


def mlx_price(op: str, values: dict, device, constants) -> tuple[float, int]:
    """(seconds, dispatches) of MLX's real kernels for one op as mlx-lm runs it: the job
    `metalforge compare` prices against the first family serving the op (compare.mlx_counted)."""
    from metalforge.kernels.families import FAMILIES
    serving = [(f.name, f.op_shape(values)) for f in FAMILIES.values() if f.op == op]
    family, shape = next(((name, s) for name, s in serving if s is not None), (None, None))
    if shape is None:
        raise MetalforgeError(f"op '{op}' {values}: not a job of any family (Family.op): MLX's kernels for it are not priced")
    job = compare.mlx_counted(family, shape, dtypes.get(DTYPE), device)
    return model.price_in_step(job, device, constants, _dispatch_s()), len(job)


def ours_price(decision, device, constants) -> tuple[float, int]:
    fam = get_family(decision.family)
    counted = compare.ours_counted(fam, fam.config(decision.config), decision.shape, dtypes.get(DTYPE), device)
    return model.price_in_step(counted, device, constants, _dispatch_s()), len(counted)


@dataclass(frozen=True)
class Step:
    kernels_s: float    # the op plan's kernels
    glue_s: float       # every other dispatch
    dispatches: float   # per step

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / (self.kernels_s + self.glue_s)


def _dispatch_s() -> float:
    """What any dispatch of a step costs besides its work: the whole-model fit's `d`."""
    return fit.shipped()["whole_model"]["dispatch_s"]


def glue_seconds(config: dict, dispatches: float, device) -> float:
    whole = fit.shipped()["whole_model"]
    bytes_ = 3 * config["hidden_size"] * 2
    return dispatches * (whole["dispatch_s"] + whole["dram"] * bytes_ / (device.memory_bandwidth_gbs * 1e9))


def steps(config: dict, context: int, device, glue_counts: GlueCounts) -> dict[str, Step]:
    """Per side ("ours (auto)", "ours (metal)", "mlx-lm"): the modelled decode step, each op
    priced by whichever side runs it, and the other dispatches as that mix launches them."""
    from metalforge.engine.ops import Kernels
    constants = fit.shipped()["constants"]
    args = models.parse(config, "config")
    roles = Roles(args)
    auto = Kernels("emulator", device)
    auto.by_evidence = True            # what `auto` does on a Mac
    asked = Kernels("emulator", device)
    sums = {side: [0.0, 0] for side in ("ours (auto)", "ours (metal)", "mlx-lm")}
    mlx_roles = {side: set() for side in sums}   # per side: the roles of the ops MLX's op runs
    for op, values, times in step_ops(config, context):
        theirs = mlx_price(op, values, device, constants)
        for side, kernels in (("ours (auto)", auto), ("ours (metal)", asked), ("mlx-lm", None)):
            d = kernels.decide(op, values, DTYPE) if kernels else None
            seconds, n = ours_price(d, device, constants) if d is not None and d.family else theirs
            sums[side][0] += times * seconds
            sums[side][1] += times * n
            if not (d is not None and d.family) and roles.of(op, values) is not None:
                mlx_roles[side].add(roles.of(op, values))
    out = {}
    for side, (seconds, n) in sums.items():
        # a fused op the small folder has and the model not (no family of ours serves its size) runs MLX's
        unserved = set(glue_counts.roles.all()) - set(roles.all())
        g = glue_counts.mlx_lm if side == "mlx-lm" else glue_counts.ours(mlx_roles[side] | unserved)
        extra = g.per_layer * args.num_hidden_layers + g.outside
        out[side] = Step(seconds, glue_seconds(config, extra, device), n + extra)
    return out


def table(device_names, contexts) -> tuple[list[str], list[dict]]:
    rows = []
    for name, config in zip(MODEL_NAMES, defaults.MODELS):
        layers = models.parse(config, "config").num_hidden_layers
        for context in contexts:
            g = GlueCounts(config, context)
            for dev_name in device_names:
                dev = devices.get(dev_name)
                s = steps(config, context, dev, g)
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
