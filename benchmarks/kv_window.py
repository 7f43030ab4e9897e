"""Sliding KV at full size: one sequence decodes 20,000 tokens through a pool of 2,048 with
max_kv_size=1024, printing MLX's active memory and the pool's used blocks every 1,000 tokens
(both flat), and the decode rate per stretch (flat too: attention reads at most the window).

    python benchmarks/kv_window.py [--tokens 20000] [--window 1024] [--every 1000] [--out docs/benchmarks.md]

A random-weight llama (2 layers, hidden 128) written in mlx-lm's format, float32, its
end-of-sequence id moved out of the vocabulary so nothing stops the run early. Off a Mac this is
MLX's CPU backend. `--out` writes the figures, with the words that explain them (SECTION), into
that Markdown file's "Sliding KV over a long decode" section.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from metalforge import engine
from metalforge.files import write_section
from metalforge.provenance import command, revision
from metalforge.testing import write_model

HEADING = "Sliding KV over a long decode"
SECTION = """## {heading}

Written by `{command}` at revision {revision} ({machine}, MLX's {device} backend). One sequence
decodes {tokens:,} tokens with `max_kv_size={window}` (a window of the first 4 positions and the
latest {window} - 4) through a pool of {pool:,} tokens, a random-weight llama (2 layers, hidden
128, float32). Every {every:,} tokens: MLX's active memory, the pool's blocks in use and the decode
rate over the stretch. Blocks wholly out of the window go back to the pool and attention reads at
most the window, so neither memory, blocks in use nor time per token should grow with the tokens
decoded (docs/engine.md, "Sliding KV").

| tokens | active MiB | blocks in use | tokens/s |
|---:|---:|---:|---:|
{rows}

Active memory over the run: {low:.3f} to {high:.3f} MiB (spread {spread:.1f} KiB); blocks in use
{blocks_low} to {blocks_high}.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--out", type=Path, help=f"also write the figures into this Markdown file's '{HEADING}' section "
                                             "(docs/benchmarks.md)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp) / "llama", arch="llama", shards=1, max_positions=a.tokens + 64)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": []}))
        with engine.load(folder, kv_tokens=2 * a.window, max_kv_size=a.window) as e:
            print(f"max_kv_size={a.window}, pool of {e.pool.capacity_tokens} tokens "
                  f"({e.pool.reserved_bytes / 2**20:.2f} MiB), backend {e.kernels.backend}")
            print(f"{'tokens':>7} {'active MiB':>11} {'used blocks':>12} {'tok/s':>7}")
            pool, device = e.pool.capacity_tokens, e.kernels.backend
            start = time.perf_counter()
            active, rows = [], []
            for i, _ in enumerate(e.generate([5, 17, 42], max_tokens=a.tokens + 1), 1):
                if i % a.every == 0 and i <= a.tokens:
                    mx.eval(e.pool.storage.arrays())
                    now = time.perf_counter()
                    active.append(mx.get_active_memory())
                    rows.append((i, active[-1] / 2**20, e.pool.used_blocks, a.every / (now - start)))
                    print(f"{i:7d} {rows[-1][1]:11.3f} {rows[-1][2]:12d} {rows[-1][3]:7.1f}")
                    start = now
            print(f"active memory spread over the run: {(max(active) - min(active)) / 2**10:.1f} KiB")
    if a.out:
        write_section(a.out, HEADING, SECTION.format(
            heading=HEADING, command=command(), revision=revision(), machine=f"{platform.system()} {platform.machine()}",
            device="CPU" if device == "mlx" and not mx.metal.is_available() else device, tokens=a.tokens,
            window=a.window, pool=pool, every=a.every,
            rows="\n".join(f"| {n:,} | {mib:.3f} | {blocks} | {rate:.0f} |" for n, mib, blocks, rate in rows),
            low=min(active) / 2**20, high=max(active) / 2**20, spread=(max(active) - min(active)) / 2**10,
            blocks_low=min(r[2] for r in rows), blocks_high=max(r[2] for r in rows)))
        print(f"wrote {a.out}: {HEADING}")


if __name__ == "__main__":
    main()
