"""`metalforge compare`: our chosen config and MLX's real kernel for one job, both priced by the
per-kernel model (model.py) from their traces, with the family's per-kernel error - or
"unvalidated" and no ratio where no kernel-level data validates the family (gate.py).
"""
from __future__ import annotations

import dataclasses
import hashlib

from metalforge.errors import MetalforgeError
from metalforge.kernels import checks, dtypes
from metalforge.kernels.family import Family, parse_assignments
from metalforge.kernels.families import get as get_family
from metalforge.kernels.timing import fit, gate, mlx_jobs, model, traces


def ours_counted(fam, config, shape, dtype, device) -> list[traces.Counted]:
    """Our config's dispatches at `shape`, from traces at the config's proxy shapes (Family.trace_proxy)."""
    from metalforge.kernels import trace_report
    real = dataclasses.asdict(shape)
    small = fam.trace_proxy(real, config)
    problems = checks.check(fam, config, fam.shape(small), dtype, device)
    if problems:
        raise MetalforgeError(f"{fam.name}: {config} cannot be traced at the proxy shape {fam.describe(fam.shape(small))}: "
                              + "; ".join(map(str, problems)))

    def run(s: dict):
        sh = fam.shape(s)
        return trace_report.ours(fam, config, sh, dtype, fam.trace_inputs(sh, dtype))
    source = hashlib.sha256(fam.render(config, fam.shape(small), dtype).encode()).hexdigest()[:16]
    # traces run on other inputs than make_inputs' (decode's full sequences) are keyed apart from those that did
    inputs = " trace_inputs" if type(fam).trace_inputs is not Family.trace_inputs else ""
    return traces.scaled(f"ours{inputs} {fam.name} {config} {dtype.name} {source}", real, small, fam.trace_groups, run)


def mlx_counted(family: str, s: dict, dtype, device) -> list[traces.Counted]:
    """MLX's kernels for the job as mlx-lm calls MLX (the family's mlx_jobs: a contiguous cache,
    causal prefill, a fused family's products)."""
    return [c for op, sizes in get_family(family).mlx_jobs(s) for c in mlx_jobs.counted(op, sizes, dtype.name, device)]


def _priced(counted, device, constants) -> dict:
    """{seconds, terms}: the price and each term's seconds in it (model.TERMS), which say where a
    difference between two kernels comes from."""
    seconds = model.terms(counted, device) * constants.vector()
    return {"seconds": model.price(counted, device, constants),
            "terms": {t: float(s) for t, s in zip(model.TERMS, seconds)}}


def compare(family: str, device, shape_text: str, dtype_name: str = "float16", config=None) -> dict:
    """{family, device, shape, dtype, ours: {kernel, seconds, terms} | None, mlx: {...}, ratio, error,
    validated, claim, verdict}; ratio = MLX's seconds / ours (above 1: ours faster); terms: the
    seconds of each of the model's terms; verdict: which kernel the bucket ships and why (gate.verdict)."""
    from metalforge import results
    fam = get_family(family)
    dtype = dtypes.get(dtype_name)
    raw = {k: int(v) for k, v in parse_assignments(shape_text, "shape").items()} if isinstance(shape_text, str) \
        else dict(shape_text)
    constants = fit.shipped()["constants"]
    try:
        shape = fam.shape(raw)
    except MetalforgeError:
        shape = None          # not a shape our family serves: MLX priced alone
    counted = mlx_counted(fam.name, dataclasses.asdict(shape) if shape is not None else raw, dtype, device)
    mlx = {"kernel": " + ".join(c.kernel for c in counted), **_priced(counted, device, constants)}
    ours = None
    if shape is not None:
        config = config or results.lookup(device, fam.name, shape, dtype.name).config
        counted = ours_counted(fam, config, shape, dtype, device)
        ours = {"kernel": " + ".join(c.kernel for c in counted), "config": dict(config),
                **_priced(counted, device, constants)}
    error = fit.family_error(fam.name)
    ratio = mlx["seconds"] / ours["seconds"] if ours else None
    return {"family": fam.name, "device": device.name, "shape": fam.describe(shape) if shape else shape_text,
            "dtype": dtype.name, "ours": ours, "mlx": mlx, "ratio": ratio, "error": error,
            "validated": error is not None, "claim": gate.claim(ratio, fam.name) if ours else "MLX only",
            "verdict": gate.verdict(ratio, fam.name) if ours else "MLX only"}


def format_text(r: dict) -> str:
    lines = [f"{r['family']} {r['shape']} {r['dtype']} on {r['device']} (per-kernel model, timer: model)"]
    for side in ("ours", "mlx"):
        s = r[side]
        lines.append(f"  {side:4} {s['seconds'] * 1e6:10.1f} us  {s['kernel']}" if s else
                     f"  {side:4}          -     our family does not serve this shape")
    lines.append(f"  ours vs MLX: {r['claim']}")
    lines.append(f"  verdict:     {r['verdict']}")
    return "\n".join(lines)


def priced_entry(fam, shape, dtype_name: str, device, entry: dict) -> dict:
    """A modelled results entry priced by the per-kernel model: its config against MLX's real
    kernel (`baseline_kernel`), with the family's per-kernel error (none: unvalidated) and the
    kernel the bucket ships (`ships`: "mlx" where MLX's is priced faster). A job the
    model cannot trace yet keeps its config with no ratio and the reason (`unpriced`): no evidence."""
    from metalforge.results import Entry
    try:
        r = compare(fam.name, device, dataclasses.asdict(shape), dtype_name, config=fam.config(entry["config"]))
    except MetalforgeError as e:
        out = {k: v for k, v in entry.items() if k not in ("baseline_s", "speedup", "model_error", "ships")}
        return {**out, "unpriced": str(e).splitlines()[0][:300]}
    out = {**entry, "time_s": r["ours"]["seconds"], "baseline_s": r["mlx"]["seconds"], "speedup": r["ratio"],
           "baseline_kernel": r["mlx"]["kernel"], "timer": "model"}
    out.pop("model_error", None)
    # `ships` follows from the new ratio: "mlx" where MLX's real kernel is priced faster than the config
    return Entry.of({**out, **({"model_error": r["error"]} if r["error"] is not None else {})}).to_dict()
