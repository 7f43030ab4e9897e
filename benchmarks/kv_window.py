"""Sliding KV at full size: one sequence decodes 20,000 tokens through a pool of 2,048 with
max_kv_size=1024, printing MLX's active memory and the pool's used blocks every 1,000 tokens
(both flat), and the decode rate per stretch (flat too: attention reads at most the window).

    python benchmarks/kv_window.py [--tokens 20000] [--window 1024] [--every 1000]

A random-weight llama (2 layers, hidden 128) written in mlx-lm's format, float32, its
end-of-sequence id moved out of the vocabulary so nothing stops the run early. Off a Mac this is
MLX's CPU backend.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from metalforge import engine
from metalforge.testing import write_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--every", type=int, default=1000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp) / "llama", arch="llama", shards=1, max_positions=a.tokens + 64)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": []}))
        with engine.load(folder, kv_tokens=2 * a.window, max_kv_size=a.window) as e:
            print(f"max_kv_size={a.window}, pool of {e.pool.capacity_tokens} tokens "
                  f"({e.pool.reserved_bytes / 2**20:.2f} MiB), backend {e.kernels.backend}")
            print(f"{'tokens':>7} {'active MiB':>11} {'used blocks':>12} {'tok/s':>7}")
            start = time.perf_counter()
            active = []
            for i, _ in enumerate(e.generate([5, 17, 42], max_tokens=a.tokens + 1), 1):
                if i % a.every == 0 and i <= a.tokens:
                    mx.eval(e.pool.storage.arrays())
                    now = time.perf_counter()
                    active.append(mx.get_active_memory())
                    print(f"{i:7d} {active[-1] / 2**20:11.3f} {e.pool.used_blocks:12d} {a.every / (now - start):7.1f}")
                    start = now
            print(f"active memory spread over the run: {(max(active) - min(active)) / 2**10:.1f} KiB")


if __name__ == "__main__":
    main()
