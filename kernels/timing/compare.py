"""`metalforge compare`: our chosen config and MLX's real kernel for one job, both priced by the
per-kernel model (model.py) from their traces, with the family's per-kernel error - or
"unvalidated" and no ratio where no kernel-level data validates the family (gate.py).
"""
from __future__ import annotations

import dataclasses
import hashlib

from metalforge.errors import MetalforgeError
from metalforge.kernels import checks, dtypes
from metalforge.kernels.family import parse_assignments
from metalforge.kernels.families import get as get_family
from metalforge.kernels.timing import fit, gate, mlx_jobs, model, traces

# our families: the axes scaled from a proxy (groups scaled together) and each one's proxy
GROUPS = {"qmv": (("N",), ("K",)), "gate_up": (("N",), ("K",)), "norm_qkv": (("Hq", "Hkv"), ("K",)),
          "qmm": (("M",), ("N",), ("K",)),
          "decode_attention": (("B",), ("Hq", "Hkv"), ("S",)),
          "prefill_attention": (("B",), ("Hq", "Hkv"), ("L", "prefix"))}
MLX_OP = {"qmv": "matmul", "qmm": "matmul", "decode_attention": "decode", "prefill_attention": "prefill"}
# a fused family's job as the quantized products mlx-lm runs for it (the norms, RoPE and
# activation kernels around them are counted as dispatches by benchmarks/modelled_decode.py, not
# here: `compare` prices MLX's side low, never high)
MLX_PRODUCTS = {
    "gate_up": lambda s: [s["N"], s["N"]],                                            # gate, up
    "norm_qkv": lambda s: [s["Hq"] * s["D"], s["Hkv"] * s["D"], s["Hkv"] * s["D"]],   # q, k, v
}


def _k_proxy(K: int) -> int:
    return min(K, 512 + K % 512 if K % 512 else 512)


def proxy(family: str, s: dict) -> dict:
    """A small shape of the same structure (GQA ratio, K's tail past whole 512-value blocks)."""
    if family in ("qmv", "gate_up"):
        return {**s, "N": min(s["N"], 64), "K": _k_proxy(s["K"])}
    if family == "norm_qkv":
        return {**s, "Hkv": 1, "Hq": s["Hq"] // s["Hkv"], "K": _k_proxy(s["K"])}
    if family == "qmm":     # every counter grows with M x N x K: the smallest tiles keep 4x traces small
        return {**s, "M": min(s["M"], 32), "N": min(s["N"], 32), "K": min(s["K"], 256 + s["K"] % 256)}
    heads = {"B": 1, "Hkv": 1, "Hq": s["Hq"] // s["Hkv"]}
    if family == "decode_attention":
        return {**s, **heads, "S": min(s["S"], 128)}
    L = min(s["L"], 64)
    return {**s, **heads, "L": L, "prefix": s.get("prefix", 0) * L // s["L"]}


def _grown(small: dict, real: dict, group: tuple) -> dict:
    """The proxy with one group of axes doubled (K by whole 512-value blocks, keeping its tail), up to the real shape."""
    out = dict(small)
    for a in group:
        tail = real[a] % 512 if a == "K" else 0
        out[a] = min(real[a], 2 * (small[a] - tail) + tail) if small[a] else 0
    return out


def ours_counted(fam, config, shape, dtype, device) -> list[traces.Counted]:
    """Our config's dispatches at `shape`, from traces at the family's proxy shapes."""
    from metalforge.kernels import trace_report
    if fam.name not in GROUPS:
        raise MetalforgeError(f"{fam.name}: no proxy shapes for its traces (kernels/timing/compare.py GROUPS, proxy): "
                              "not priced yet")
    real = dataclasses.asdict(shape)
    small = proxy(fam.name, real)
    problems = checks.check(fam, config, fam.shape(small), dtype, device)
    for group in reversed(GROUPS[fam.name]):   # a config wider than the proxy (K split 4 ways): grow that axis
        while problems and any(small[a] < real[a] for a in group):
            small = _grown(small, real, group)
            problems = checks.check(fam, config, fam.shape(small), dtype, device)
    if problems:
        raise MetalforgeError(f"{fam.name}: {config} cannot be traced at the proxy shape {fam.describe(fam.shape(small))}: "
                              + "; ".join(map(str, problems)))

    def run(s: dict):
        sh = fam.shape(s)
        return trace_report.ours(fam, config, sh, dtype, fam.make_inputs(sh, dtype, 0))
    source = hashlib.sha256(fam.render(config, fam.shape(small), dtype).encode()).hexdigest()[:16]
    return traces.scaled(f"ours {fam.name} {config} {dtype.name} {source}", real, small, GROUPS[fam.name], run)


def _ported(family: str) -> None:
    if family not in MLX_OP and family not in MLX_PRODUCTS:
        raise MetalforgeError(f"no MLX kernel sequence is ported for family '{family}'; valid families: "
                              f"{', '.join([*MLX_OP, *MLX_PRODUCTS])}")


def mlx_counted(family: str, s: dict, dtype, device) -> list[traces.Counted]:
    """MLX's kernels for the job, as mlx-lm calls MLX (contiguous cache, causal prefill; a fused
    family's products, MLX_PRODUCTS). A residual variant's add (one elementwise kernel) is not
    counted: MLX's side is priced low, never high."""
    _ported(family)
    if family in MLX_PRODUCTS:
        return [c for rows in MLX_PRODUCTS[family](s) for c in mlx_counted(
            "qmv", dict(M=s["M"], N=rows, K=s["K"], bits=s["bits"], group_size=s["group_size"]), dtype, device)]
    s = {k: v for k, v in s.items() if k not in ("block_size", "num_blocks", "residual")}
    if MLX_OP[family] == "prefill":
        s = {"prefix": 0, **s, "causal": True}
    if MLX_OP[family] == "matmul":
        s = {"bits": 4, "group_size": 64, **s}
    return mlx_jobs.counted(MLX_OP[family], s, dtype.name, device)


def compare(family: str, device, shape_text: str, dtype_name: str = "float16", config=None) -> dict:
    """{family, device, shape, dtype, ours: {kernel, seconds} | None, mlx: {...}, ratio, error, validated,
    claim, verdict}; ratio = MLX's seconds / ours (above 1: ours faster); verdict: which kernel the
    bucket ships and why (gate.verdict)."""
    from metalforge import results
    fam = get_family(family)
    _ported(fam.name)
    dtype = dtypes.get(dtype_name)
    raw = {k: int(v) for k, v in parse_assignments(shape_text, "shape").items()} if isinstance(shape_text, str) \
        else dict(shape_text)
    constants = fit.shipped()["constants"]
    try:
        shape = fam.shape(raw)
    except MetalforgeError:
        shape = None          # not a shape our family serves: MLX priced alone
    ours = None
    if shape is not None:
        config = config or results.lookup(device, fam.name, shape, dtype.name).config
        counted = ours_counted(fam, config, shape, dtype, device)
        ours = {"kernel": " + ".join(c.kernel for c in counted), "config": dict(config),
                "seconds": model.price(counted, device, constants)}
    full = dataclasses.asdict(shape) if shape is not None else raw
    counted = mlx_counted(fam.name, full, dtype, device)
    mlx = {"kernel": " + ".join(c.kernel for c in counted), "seconds": model.price(counted, device, constants)}
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
