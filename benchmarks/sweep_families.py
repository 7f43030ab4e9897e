"""Run every valid config of every kernel family in the emulator on small shapes and compare each
output with the family's MLX reference; print per family how many configs ran, how many matched
within the family's tolerance, how many matched bit for bit, and the largest error.

    python benchmarks/sweep_families.py [--dtype float32] [--families qmm,decode_attention]
                                        [--sample 300] [--out benchmarks/results/sweep]

--sample runs, per shape, a random sample of that many valid configs (seeded) instead of all of
them: qmm's 27,648-config space takes hours whole on two cores.

Bit for bit is reported, not required: a config's summation order differs from the reference's
(SIMD-group trees, split-K merges), so float results agree to rounding, not to the bit."""
from __future__ import annotations

import argparse
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from metalforge.kernels import check
from metalforge.kernels.families import get as get_family

SHAPES = {   # small, with tails (N, K, S, L not multiples of the tiles) and GQA
    "qmv": [dict(M=2, N=40, K=256, bits=b, group_size=32 if b in (3, 6) else 64) for b in (2, 3, 4, 5, 6, 8)]
    + [dict(M=3, N=37, K=4096, bits=4, group_size=64)],   # long K: every k_split is valid
    "qmm": [dict(M=20, N=40, K=96, bits=4, group_size=32), dict(M=12, N=24, K=128, bits=8, group_size=64),
            dict(M=33, N=24, K=256, bits=2, group_size=64)],
    "decode_attention": [dict(B=1, Hq=4, Hkv=2, S=40, D=64), dict(B=2, Hq=4, Hkv=1, S=33, D=64, block_size=8),
                         # the variants: 4 tokens with a window, sinks and a soft-cap; 4-bit K/V, paged
                         dict(B=2, Hq=4, Hkv=2, S=37, D=64, L=4, window=16, sinks=1, softcap=1),
                         dict(B=2, Hq=4, Hkv=1, S=33, D=64, block_size=8, kv_bits=4, kv_group_size=32)],
    "prefill_attention": [dict(B=1, Hq=2, Hkv=1, L=24, D=64), dict(B=1, Hq=2, Hkv=1, L=10, D=64, prefix=7)],
}
DEVICE = "m3-max-40"


def sweep(name: str, values: dict, dtype: str, sample: int | None = None) -> dict:
    fam = get_family(name)
    shape = fam.shape(values)
    inputs = fam.make_inputs(shape, dtype)
    expected = np.array(fam.reference(shape, dtype, inputs).astype(mx.float32))
    configs = [c for c in fam.space() if not check(fam, c, shape, dtype, DEVICE)]
    valid = len(configs)
    if sample and sample < valid:
        configs = random.Random(0).sample(configs, sample)
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:   # compile in parallel, run one at a time
        list(pool.map(lambda c: fam.prepare(c, shape, dtype, inputs, backend="emulator", device=DEVICE), configs))
    matched = exact = 0
    worst = 0.0
    for config in configs:
        got = np.array(fam.run(config, shape, dtype, inputs, backend="emulator", device=DEVICE).astype(mx.float32))
        atol, rtol = fam.tolerance(config, dtype)
        matched += bool(np.allclose(got, expected, atol=atol, rtol=rtol))
        exact += bool(np.array_equal(got, expected))
        worst = max(worst, float(np.abs(got - expected).max()))
    return {"shape": values, "valid": valid, "configs": len(configs), "matched": matched, "bit_exact": exact,
            "max_abs_error": worst}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--families", help="comma-separated subset of: " + ", ".join(SHAPES))
    ap.add_argument("--sample", type=int, help="valid configs per shape, a seeded random sample (default: all)")
    ap.add_argument("--out", default="benchmarks/results/sweep")
    args = ap.parse_args()
    names = args.families.split(",") if args.families else list(SHAPES)
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown families {', '.join(unknown)}; valid: {', '.join(SHAPES)}")
    report = {}
    for name in names:
        report[name] = [sweep(name, values, args.dtype, args.sample) for values in SHAPES[name]]
        for row in report[name]:
            print(f"{name:18} {','.join(f'{k}={v}' for k, v in row['shape'].items()):52} "
                  f"{row['matched']:4}/{row['configs']:<4} match (of {row['valid']} valid)  {row['bit_exact']:4} bit-exact  "
                  f"max |err| {row['max_abs_error']:.2e}", flush=True)
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dtype": args.dtype, "device_limits": DEVICE, "families": report}, indent=2))
    total = sum(r["configs"] for rows in report.values() for r in rows)
    ok = sum(r["matched"] for rows in report.values() for r in rows)
    print(f"{ok} of {total} configs match their reference ({args.dtype}, emulator); wrote {out}")
    raise SystemExit(0 if ok == total else 1)


if __name__ == "__main__":
    main()
