"""Run valid configs of every kernel family in the emulator on small shapes and compare each
output with the family's MLX reference; print per shape how many configs the space has, how many
are valid, how many ran, how many matched within the family's tolerance (and bit for bit), and
the largest error.

    python benchmarks/sweep_families.py [--dtype float32] [--families qmm,prefill_attention]
                                        [--whole-up-to 1000] [--strength 3] [--plan]
                                        [--out benchmarks/results/sweep] [--doc docs/benchmarks.md]

A shape whose valid configs number at most --whole-up-to runs every one of them. A larger space
(prefill's 153,600 configs, 9,000-12,000 valid at a shape, at about a second a compile on two
cores) runs a covering array of --strength (kernels/covering.py): valid configs that between them
take every combination of that many tunables' values any valid config takes. Prefill's edge
shapes (issue 22 item 1: one token, lengths on and one past every query-tile boundary, the largest
tails, a cached prefix on a tile boundary, B=1 and B>1) run an all-pairs array drawn from the
configs already compiled for their kernel (lengths are run-time values: no new compiles).
--plan prints the counts without running; --doc puts the summary into that Markdown file's
"Family sweep" section.

Bit for bit is reported, not required: a config's summation order differs from the reference's
(SIMD-group trees, split-K merges), so float results agree to rounding, not to the bit."""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from metalforge.files import write_atomic, write_section
from metalforge.kernels import check
from metalforge.kernels.covering import covering_array
from metalforge.kernels.families import get as get_family
from metalforge.provenance import command, revision


@dataclass(frozen=True)
class Row:
    shape: dict
    dtype: str | None = None      # None: --dtype
    strength: int | None = None   # None: every valid config up to --whole-up-to, else --strength
    edge: bool = False            # an edge shape: all pairs, from the configs compiled for its kernel


def _prefill(**shape) -> dict:
    """An 8-heads-a-KV-head prefill at D=128 (every heads and d_block value is valid) with `shape`'s changes."""
    return {"B": 2, "Hq": 8, "Hkv": 1, "D": 128, **shape}


SHAPES = {   # small, with tails (N, K, S, L not multiples of the tiles) and GQA
    "qmv": [Row(dict(M=2, N=40, K=256, bits=b, group_size=32 if b in (3, 6) else 64)) for b in (2, 3, 4, 5, 6, 8)]
    + [Row(dict(M=3, N=37, K=4096, bits=4, group_size=64))],   # long K: every k_split is valid
    "qmm": [Row(dict(M=20, N=40, K=96, bits=4, group_size=32)), Row(dict(M=12, N=24, K=128, bits=8, group_size=64)),
            Row(dict(M=33, N=24, K=256, bits=2, group_size=64))],
    "decode_attention": [Row(dict(B=1, Hq=4, Hkv=2, S=40, D=64)), Row(dict(B=2, Hq=4, Hkv=1, S=33, D=64, block_size=8)),
                         # the variants: 4 tokens with a window, sinks and a soft-cap; 4-bit K/V, paged
                         Row(dict(B=2, Hq=4, Hkv=2, S=37, D=64, L=4, window=16, sinks=1, softcap=1)),
                         Row(dict(B=2, Hq=4, Hkv=1, S=33, D=64, block_size=8, kv_bits=4, kv_group_size=32))],
    # the fused and expert families: their variants (GeGLU; biases, q/k norms, partial and traditional RoPE)
    "gather_qmv": [Row(dict(M=2, N=37, K=256, experts=4, top_k=2, bits=4, group_size=64))],
    "gate_up": [Row(dict(M=2, N=40, K=256, bits=4, group_size=64)),
                Row(dict(M=3, N=37, K=4096, bits=8, group_size=64, gelu=1))],
    "norm_qkv": [Row(dict(M=2, K=256, Hq=4, Hkv=2, D=64, bits=4, group_size=64, bias=1, traditional=1)),
                 Row(dict(M=3, K=384, Hq=4, Hkv=1, D=80, bits=4, group_size=64, qk_norm=1, rope_dims=40))],
    # float16: stage=input and score_type=half are valid only there
    "prefill_attention": [
        Row(_prefill(L=45, prefix=19), "float16"),                                   # tails, a prefix, B=2
        Row(dict(B=1, Hq=4, Hkv=2, L=70, D=64), "float16", strength=2),             # D=64: d_block 16, 32
        Row(dict(B=1, Hq=2, Hkv=1, L=65, D=64, prefix=3, window=16, sinks=1), "float16", strength=2),
        Row(dict(B=1, Hq=2, Hkv=1, L=33, D=96, prefix=5), "float32", strength=2),   # fp32 staging only
        Row(_prefill(B=1, L=1), "float16", edge=True),                               # one token
        Row(_prefill(L=1, prefix=40), "float16", edge=True),                         # one token after a cache
        Row(_prefill(L=128), "float16", edge=True),                                  # on every BQ boundary
        Row(_prefill(B=1, L=129), "float16", edge=True),                             # one past
        Row(_prefill(L=127, prefix=1), "float16", edge=True),                        # BQ=128's largest tail
        Row(_prefill(L=64, prefix=64), "float16", edge=True),                        # prefix on a tile boundary
    ],
}
DEVICE = "m3-max-40"


def plan(name: str, row: Row, dtype: str, whole_up_to: int, strength: int, compiled: dict) -> dict:
    """The configs a row runs, and how many the space has and how many are valid. `compiled`:
    the configs of each family's first row (an edge shape's kernel is that row's: its lengths and
    B are run-time values)."""
    fam = get_family(name)
    shape = fam.shape(row.shape)
    valid = [c for c in fam.space() if not check(fam, c, shape, dtype, DEVICE)]
    if row.edge:
        pool = [c for c in compiled[name] if c in valid]
        configs, how = covering_array(fam.params, pool, 2), "all pairs"
    elif row.strength is None and len(valid) <= whole_up_to:
        configs, how = valid, "every valid config"
    else:
        t = row.strength or strength
        configs, how = covering_array(fam.params, valid, t), "all pairs" if t == 2 else f"strength {t}"
    compiled.setdefault(name, configs)
    return {"family": name, "shape": row.shape, "dtype": dtype, "space": fam.space_size(), "valid": len(valid),
            "how": how, "configs": configs}


def sweep(p: dict) -> dict:
    fam = get_family(p["family"])
    shape, dtype, configs = fam.shape(p["shape"]), p["dtype"], p["configs"]
    inputs = fam.make_inputs(shape, dtype)
    expected = np.array(fam.reference(shape, dtype, inputs).astype(mx.float32))
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:   # compile in parallel, run one at a time
        list(pool.map(lambda c: fam.prepare(c, shape, dtype, inputs, backend="emulator", device=DEVICE), configs))
    matched = exact = 0
    worst = 0.0
    failed = []
    for config in configs:
        got = np.array(fam.run(config, shape, dtype, inputs, backend="emulator", device=DEVICE).astype(mx.float32))
        atol, rtol = fam.tolerance(config, dtype)
        ok = bool(np.allclose(got, expected, atol=atol, rtol=rtol))
        matched += ok
        exact += bool(np.array_equal(got, expected))
        worst = max(worst, float(np.abs(got - expected).max()))
        if not ok:
            failed.append(config)
    return {**{k: v for k, v in p.items() if k != "configs"}, "run": len(configs), "matched": matched,
            "bit_exact": exact, "max_abs_error": worst, "failed": failed}


def line(r: dict) -> str:
    shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
    ran = f"{r['matched']}/{r['run']} match" if "run" in r else f"{len(r['configs'])} to run"
    exact = f"  {r['bit_exact']} bit-exact  max |err| {r['max_abs_error']:.1e}" if "run" in r else ""
    return (f"{r['family']:17} {shape:44} {r['dtype']:8} {r['space']:6} configs, {r['valid']:5} valid, "
            f"{r['how']}: {ran}{exact}")


def summary(rows: list[dict], args, seconds: float) -> str:
    ran = sum(r["run"] for r in rows)
    ok = sum(r["matched"] for r in rows)
    return "\n".join([
        "## Family sweep", "",
        f"Written by `{command()}` at revision {revision()} ({DEVICE}'s limits, emulator, {seconds / 60:.0f} minutes on two shared cores, kernels an earlier "
        "run compiled taken from the emulator's cache). Per shape: the "
        "configs of the space, the valid ones, which of them ran (every valid one, or a covering array: "
        "every combination of 2 or 3 tunables' values some valid config takes) and how many matched the "
        "family's MLX reference within its tolerance. Edge shapes run all pairs of the configs compiled "
        f"for their kernel. A shape with at most {args.whole_up_to} valid configs runs them all, a larger one "
        f"a covering array of strength {args.strength} (`kernels/covering.py`). CI runs, per family, configs "
        "that between them take every value of every tunable, unchecked and in checked mode, at the covering "
        "shapes and at edge shapes (`tests/test_families_emulated.py`).", "", "```", *(line(r) for r in rows), "```", "",
        f"**{ok} of {ran} configs run match their reference.**", ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", help="for shapes that name none")
    ap.add_argument("--families", help="comma-separated subset of: " + ", ".join(SHAPES))
    ap.add_argument("--whole-up-to", type=int, default=1000, help="run every valid config up to this many")
    ap.add_argument("--strength", type=int, default=3, help="covering array strength above that")
    ap.add_argument("--plan", action="store_true", help="print the counts, run nothing")
    ap.add_argument("--out", default="benchmarks/results/sweep", help="OUT.json")
    ap.add_argument("--doc", help="also put the summary into this Markdown file's 'Family sweep' section "
                                  "(docs/benchmarks.md)")
    args = ap.parse_args()
    names = args.families.split(",") if args.families else list(SHAPES)
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown families {', '.join(unknown)}; valid: {', '.join(SHAPES)}")
    start, compiled, rows = time.time(), {}, []
    for name in names:
        for row in SHAPES[name]:
            p = plan(name, row, row.dtype or args.dtype, args.whole_up_to, args.strength, compiled)
            rows.append(p if args.plan else sweep(p))
            print(line(rows[-1]), flush=True)
    if args.plan:
        print(f"{sum(len(r['configs']) for r in rows)} configs to run")
        return
    seconds = time.time() - start
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({"device_limits": DEVICE, "seconds": seconds, "rows": rows}, indent=2))
    text = summary(rows, args, seconds)
    print(text)
    if args.doc:
        write_section(args.doc, "Family sweep", text)
    raise SystemExit(0 if all(r["matched"] == r["run"] for r in rows) else 1)


if __name__ == "__main__":
    main()
