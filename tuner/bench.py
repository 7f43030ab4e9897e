"""`metalforge bench`: on a Mac, measure what the engine would run against MLX's built-ins and
write what was measured where it can be shared.

For every shape of a model (or a shapes file, or the built-in model) it takes the config the
engine would choose for this device, checks its output against the family's reference, and
times it and MLX's built-in for the same job side by side with the same timer. With a model
folder it also times the engine end to end against mlx-lm (when installed). It writes a results
file of measured entries (merge several machines' with `metalforge results merge`), a Markdown
report and a PNG; with a model, also the engine's end-to-end figures as calibration points
(OUT.points.yaml, in the format of benchmarks/data/apple_measurements.yaml, to be appended there
once the report is published at a URL).
"""
from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import yaml

import metalforge
from metalforge import devices, files, results
from metalforge.engine import models
from metalforge.engine.config import read
from metalforge.engine.dispatches import decode_dispatches
from metalforge.engine.speed import engine_figures, mlx_lm_figures
from metalforge.errors import MetalforgeError
from metalforge.plotting import figure, save
from metalforge.results import Entry
from metalforge.tuner import shapes as shape_sources
from metalforge.tuner.shapes import Target
from metalforge.tuner.timers import MetalTimer
from metalforge.tuner.verify import Verifier

NEEDS_METAL = ("metalforge bench measures kernels on the GPU through Metal, and this machine has no Metal "
               "device (an Apple silicon Mac is needed). Off a Mac, `metalforge tune` gives modelled "
               "figures and says so.")


@dataclass
class Row:
    target: Target
    config: dict
    source: str         # where the config came from (results lookup)
    ours_s: float
    mlx_s: float
    spread: float       # the noisier of the two timings, (p90 - p10) / median
    mlx_kernel: str = ""   # the Metal kernels MLX ran for the job (its dispatch rules)

    @property
    def speedup(self) -> float:
        return self.mlx_s / self.ours_s


def require_metal() -> None:
    if not mx.metal.is_available():
        raise MetalforgeError(NEEDS_METAL)


def kernel_rows(targets: list[Target], device, backend: str = "metal", timer=None, progress=print) -> list[Row]:
    """Each target's chosen config, verified, then timed against MLX's built-in by one timer."""
    timer = timer or MetalTimer()
    rows = []
    for i, t in enumerate(targets, 1):
        choice = results.lookup(device, t.family.name, t.shape, t.dtype)
        verify = Verifier(t.family, t.shape, t.dtype, backend=backend, device=device)
        verify(choice.config)
        # on Metal the check ran at this very shape; elsewhere at a cut proxy, so time fresh inputs
        inputs = verify.inputs if verify.shape == t.shape else t.family.make_inputs(t.shape, t.dtype)
        ours = timer.time(lambda: t.family.run(choice.config, t.shape, t.dtype, inputs, backend=backend, device=device),
                          family=t.family, config=choice.config, shape=t.shape, dtype=t.dtype, device=device)
        theirs_inputs = t.family.baseline_inputs(t.shape, t.dtype, inputs)
        theirs = timer.baseline(lambda: t.family.baseline(t.shape, t.dtype, theirs_inputs),
                                family=t.family, shape=t.shape, dtype=t.dtype, device=device)
        rows.append(Row(t, dict(choice.config), choice.describe(), ours.seconds, theirs.seconds,
                        max(ours.spread, theirs.spread), t.family.mlx_kernels(t.shape, t.dtype, device)))
        progress(f"[{i}/{len(targets)}] {t.family.name} {t.bucket.split('|')[0]}: ours {ours.seconds * 1e6:.1f} us, "
                 f"MLX {theirs.seconds * 1e6:.1f} us ({rows[-1].speedup:.2f}x)")
    return rows


def measured_entries(rows: list[Row]) -> list[tuple[str, str, Entry]]:
    return [(r.target.family.name, r.target.bucket,
             Entry(shape=dict(r.target.shape.__dict__), dtype=r.target.dtype, config=r.config, time_s=r.ours_s,
                   timer="metal", baseline_s=r.mlx_s, speedup=r.speedup, trials={},
                   extra={"spread": round(r.spread, 4), "source": "metalforge bench", "baseline_kernel": r.mlx_kernel}))
            for r in rows]


def end_to_end(folder, prompt_tokens: int, decode_tokens: int, workdir: Path, backend: str = "metal",
               device=None) -> dict:
    """Tokens/s and time to first token, the engine's and mlx-lm's, and beside them the kernels
    a decode step launches per token, both sides (counted on MLX's graph: engine/dispatches.py)."""
    prompt = [(7 * i) % 1000 + 2 for i in range(prompt_tokens)]
    return {"metalforge": engine_figures(folder, prompt, decode_tokens, workdir / "prompt.safetensors", backend),
            "mlx-lm": mlx_lm_figures(folder, prompt, decode_tokens),
            "dispatches": decode_dispatches(folder, backend, device, context=prompt_tokens)}


def calibration_points(folder, device, e2e: dict, prompt_tokens: int, decode_tokens: int) -> dict:
    """The engine's end-to-end figures as points in the format of benchmarks/data/
    apple_measurements.yaml, so that a published report can join the cost model's calibration.
    The source is left for the user to fill in: the loader takes only a URL."""
    folder = Path(folder)
    config = read(folder)
    a = models.parse(config, str(folder / "config.json"))
    params = models.get(a.model_type).parameter_count(a)
    model = dict(source="FILL IN: the URL of the model's config.json", params_b=round(params / 1e9, 4), config=config)
    ours = e2e["metalforge"]
    common = dict(chip=device.name, gpu_cores=device.gpu_cores, model=folder.name,
                  weights=str(a.quantization or "unquantized"),
                  weight_gib=round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30, 4),
                  software=f"metalforge {metalforge.__version__} (MLX {mx.__version__})",
                  date=datetime.date.today().isoformat(), source="FILL IN: the URL where this report is published")
    return {"models": {folder.name: model}, "points": [
        {**common, "kind": "decode", "context": prompt_tokens + decode_tokens // 2,
         "tokens_per_s": round(ours["decode_tokens_per_s"], 3)},
        {**common, "kind": "prefill", "tokens": prompt_tokens, "chunk": prompt_tokens,
         "tokens_per_s": round(prompt_tokens / ours["ttft_cold_s"], 3)}]}


def markdown(device, backend: str, rows: list[Row], e2e: dict | None, what: str) -> str:
    lines = [f"# metalforge bench: {device.display_name}", "",
             f"- measured with `{backend}` timing (wall clock over synchronised repeats, median); {what}",
             f"- metalforge {metalforge.__version__}, MLX {mx.__version__}, {platform.platform()}", "",
             "| family | shape | config (source) | ours (us) | MLX built-in (us) | MLX / ours | spread |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        config = " ".join(f"{k}={v}" for k, v in r.config.items())
        lines.append(f"| {r.target.family.name} | {r.target.bucket.split('|')[0]} | {config} ({r.source}) | "
                     f"{r.ours_s * 1e6:.1f} | {r.mlx_s * 1e6:.1f} | {r.speedup:.2f}x | {r.spread:.0%} |")
    if e2e:
        ours, theirs = e2e["metalforge"], e2e["mlx-lm"]
        lines += ["", "| end to end | metalforge | mlx-lm | metalforge / mlx-lm |", "|---|---:|---:|---:|"]
        for label, key, better_high in (("decode tokens/s", "decode_tokens_per_s", True),
                                        ("time to first token (ms)", "ttft_cold_s", False)):
            scale = 1e3 if key.startswith("ttft") else 1
            other = f"{theirs[key] * scale:.1f}" if theirs else "not installed"
            ratio = "-" if not theirs else f"{(ours[key] / theirs[key]) ** (1 if better_high else -1):.2f}x"
            lines.append(f"| {label} | {ours[key] * scale:.1f} | {other} | {ratio} |")
        counts = e2e.get("dispatches")
        if counts:   # lower is better, so the ratio is mlx-lm's over ours, as for the time to first token
            ours_n, theirs_n = counts["metalforge"], counts["mlx-lm"]
            for label, key in (("kernels per decode token (counted)", "per_token"),
                               ("kernels per decode layer (counted)", "per_layer")):
                other = f"{theirs_n[key]:g}" if theirs_n else "not installed"
                ratio = f"{theirs_n[key] / ours_n[key]:.2f}x" if theirs_n else "-"
                lines.append(f"| {label} | {ours_n[key]:g} | {other} | {ratio} |")
            lines.append(f"| host syncs per forward pass | {ours_n['host_syncs']} | "
                         f"{theirs_n['host_syncs'] if theirs_n else 'not installed'} | - |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], title: str):
    fig, ax = figure(1, 1, figsize=(8, 0.45 * len(rows) + 1.5))
    labels = [f"{r.target.family.name} {r.target.bucket.split('|')[0]}"[:48] for r in rows]
    ax.barh(labels, [r.speedup for r in rows], color=["#55a868" if r.speedup > 1 else "#c44e52" for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xlabel="MLX built-in time / ours (measured; > 1: ours faster)", title=title)
    return fig


def run(args) -> int:
    """The command: measure, then write OUT.yaml (results), OUT.md (report) and OUT.png."""
    require_metal()
    device = devices.resolve(args.device)
    if args.model:
        source, what = shape_sources.from_model_folder(args.model), f"shapes of {args.model}"
    elif args.shapes:
        source, what = shape_sources.from_yaml(args.shapes), f"shapes from {args.shapes}"
    else:
        source, what = shape_sources.from_model_config(shape_sources.BUILTIN_MODEL), "built-in model's shapes"
    targets = shape_sources.targets(source, dtype=args.dtype)
    rows = kernel_rows(targets, device)
    out = Path(args.out)
    e2e = end_to_end(args.model, args.prompt_tokens, args.decode_tokens, out.parent, device=device) if args.model \
        else None
    if e2e:
        points = calibration_points(args.model, device, e2e, args.prompt_tokens, args.decode_tokens)
        files.write_atomic(out.with_suffix(".points.yaml"), yaml.safe_dump(points, sort_keys=False))
        print(f"wrote {out.with_suffix('.points.yaml')}: calibration points for benchmarks/data once published")
    results.save_entries(out.with_suffix(".yaml"), device, measured_entries(rows))
    files.write_atomic(out.with_suffix(".md"), markdown(device, "metal", rows, e2e, what))
    save(plot(rows, f"{device.display_name}: measured"), out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.yaml')} (measured results), {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0

