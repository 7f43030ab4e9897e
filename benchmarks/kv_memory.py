"""KV cache bytes per token, float16 vs 8-bit vs 4-bit K/V (engine.load(kv_bits=, kv_group_size=)),
for the model shapes of an 8B Llama (32 layers, 8 KV heads of 128) and a small one, measured
on real pools: the bytes MLX holds for the pool's arrays over its tokens, beside the layout's
formula, and what a 4 GiB KV budget holds.

    python benchmarks/kv_memory.py [--out docs/benchmarks.md]

`--out` writes the table, with the words that explain it (SECTION), into that Markdown file's
"KV cache memory" section.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx

from metalforge.engine.kv.quantized import QuantizedStorage
from metalforge.engine.kv.storage import DenseStorage
from metalforge.files import write_section
from metalforge.provenance import command, revision

SHAPES = {"8B llama (32 x 8 x 128)": (32, 8, 128), "small (2 x 2 x 64)": (2, 2, 64)}
BLOCKS, BLOCK = 4, 16
BUDGET = 4 * 2**30
HEADING = "KV cache memory"
SECTION = """## {heading}

Written by `{command}` at revision {revision}. Bytes per token of K/V measured on real pools
(`engine.load(kv_bits=, kv_group_size=)`): what MLX holds for the pool's arrays over its tokens,
checked against the layout's formula the memory fit check uses, and how many tokens a 4 GiB KV
budget holds. Quantized K/V keeps `mx.quantize` codes with a scale and a bias per group along
head_dim, in the model's dtype (float16 here); docs/engine.md, "Quantized KV", says what that
costs in accuracy against mlx-lm.

| model (layers x KV heads x head_dim) | K/V | bytes/token | vs float16 | tokens in 4 GiB |
|---|---|---:|---:|---:|
{rows}
"""


def measured(storage) -> float:
    return sum(a.nbytes for a in storage.arrays()) / (BLOCKS * BLOCK)


def rows() -> list[tuple]:
    """(model, K/V, bytes per token, fraction of float16's, tokens in the budget) per layout."""
    out = []
    for name, (layers, heads, dim) in SHAPES.items():
        layouts = [("float16", DenseStorage(layers, heads, dim, BLOCK, BLOCKS, mx.float16))]
        layouts += [(f"{bits}-bit, group {g}", QuantizedStorage(layers, heads, dim, BLOCK, BLOCKS, mx.float16, bits, g))
                    for bits in (8, 4) for g in (64, 32)]
        base = measured(layouts[0][1])
        for label, storage in layouts:
            per = measured(storage)
            assert per * BLOCK == storage.block_bytes, "the formula the fit check uses is what MLX holds"
            out.append((name, label, per, per / base, int(BUDGET // per)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help=f"also write the table into this Markdown file's '{HEADING}' section "
                                             "(docs/benchmarks.md)")
    args = ap.parse_args()
    table = rows()
    print(f"{'model':26} {'K/V':>14} {'bytes/token':>12} {'vs float16':>10} {'tokens in 4 GiB':>16}")
    for name, label, per, share, tokens in table:
        print(f"{name:26} {label:>14} {per:12.0f} {share:10.1%} {tokens:16d}")
    if args.out:
        lines = [f"| {name} | {label} | {per:,.0f} | {share:.1%} | {tokens:,} |" for name, label, per, share, tokens in table]
        write_section(args.out, HEADING, SECTION.format(heading=HEADING, command=command(), revision=revision(),
                                                        rows="\n".join(lines)))
        print(f"wrote {args.out}: {HEADING}")


if __name__ == "__main__":
    main()
