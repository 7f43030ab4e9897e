"""KV cache bytes per token, float16 vs 8-bit vs 4-bit K/V (engine.load(kv_bits=, kv_group_size=)),
for the model shapes of an 8B Llama (32 layers, 8 KV heads of 128) and a small one, measured
on real pools: the bytes MLX holds for the pool's arrays over its tokens, beside the layout's
formula, and what a 4 GiB KV budget holds.

    python benchmarks/kv_memory.py
"""
from __future__ import annotations

import mlx.core as mx

from metalforge.engine.kv.quantized import QuantizedStorage
from metalforge.engine.kv.storage import DenseStorage

SHAPES = {"8B llama (32 x 8 x 128)": (32, 8, 128), "small (2 x 2 x 64)": (2, 2, 64)}
BLOCKS, BLOCK = 4, 16


def measured(storage) -> float:
    return sum(a.nbytes for a in storage.arrays()) / (BLOCKS * BLOCK)


def main() -> None:
    print(f"{'model':26} {'K/V':>14} {'bytes/token':>12} {'vs float16':>10} {'tokens in 4 GiB':>16}")
    for name, (layers, heads, dim) in SHAPES.items():
        rows = [("float16", DenseStorage(layers, heads, dim, BLOCK, BLOCKS, mx.float16))]
        rows += [(f"{bits}-bit, group {g}", QuantizedStorage(layers, heads, dim, BLOCK, BLOCKS, mx.float16, bits, g))
                 for bits in (8, 4) for g in (64, 32)]
        base = measured(rows[0][1])
        for label, storage in rows:
            per = measured(storage)
            assert per * BLOCK == storage.block_bytes, "the formula the fit check uses is what MLX holds"
            print(f"{name:26} {label:>14} {per:12.0f} {per / base:10.1%} {int(4 * 2**30 // per):16d}")


if __name__ == "__main__":
    main()
