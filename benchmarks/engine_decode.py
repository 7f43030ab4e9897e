"""Engine figures side by side in one run on one model folder: decode tokens/s, time to first
token for a long prompt cold and from its saved prompt cache, and peak memory; and the same for
mlx-lm on the same folder when it is installed. Writes JSON and a PNG.

    python benchmarks/engine_decode.py [--model FOLDER] [--prompt-tokens 1024] [--decode-tokens 64]

Without --model a random-weight 4-bit model (about 70M parameters) is written to a temporary
folder in the exact mlx-lm format. Off a Mac the engine runs MLX's CPU backend: these are CPU
numbers, not Metal ones.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mlx.core as mx

from metalforge.engine.speed import engine_figures, mlx_lm_figures
from metalforge.engine.random_model import write_model
from metalforge.plotting import figure, write_report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/engine_decode")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    folder = args.model
    if folder is None:
        folder = write_model(Path(tmp.name) / "model", arch="llama", quantized=(4, 64), dtype=mx.float16,
                             layers=6, hidden=768, heads=12, kv_heads=4, inter=2048, vocab=32000, shards=2,
                             tokenizer=True)
    prompt = [(7 * i) % 1000 + 2 for i in range(args.prompt_tokens)]
    ours = engine_figures(folder, prompt, args.decode_tokens, Path(tmp.name) / "prompt.safetensors")
    theirs = mlx_lm_figures(folder, prompt, args.decode_tokens)
    print(f"model {folder}, prompt {args.prompt_tokens} tokens, {args.decode_tokens} decoded, device {mx.default_device()}")
    print(f"{'':22} {'metalforge (' + ours['backend'] + ')':>22} {'mlx-lm':>12}")
    rows = [("decode tokens/s", "decode_tokens_per_s", "{:.1f}"), ("TTFT cold (ms)", "ttft_cold_s", "{:.1f}"),
            ("peak memory (MiB)", "peak_memory_bytes", "{:.1f}")]
    for label, key, fmt in rows:
        scale = 1e3 if key.startswith("ttft") else (2**-20 if "bytes" in key else 1)
        mine = fmt.format(ours[key] * scale)
        other = fmt.format(theirs[key] * scale) if theirs else "not installed"
        print(f"{label:22} {mine:>22} {other:>12}")
    print(f"{'TTFT from cache (ms)':22} {ours['ttft_from_cache_s'] * 1e3:>22.1f}   "
          f"({ours['cached_tokens']} cached tokens: {ours['ttft_cold_s'] / ours['ttft_from_cache_s']:.1f}x faster than cold)")
    fig, axes = figure(1, 3, figsize=(10, 3))
    axes[0].bar(["metalforge"] + (["mlx-lm"] if theirs else []),
                [ours["decode_tokens_per_s"]] + ([theirs["decode_tokens_per_s"]] if theirs else []), color="#4c72b0")
    axes[0].set_title("decode tokens/s")
    axes[1].bar(["cold", "from cache"], [ours["ttft_cold_s"] * 1e3, ours["ttft_from_cache_s"] * 1e3], color="#55a868")
    axes[1].set_title(f"time to first token (ms), {args.prompt_tokens}-token prompt")
    axes[2].bar(["metalforge"] + (["mlx-lm"] if theirs else []),
                [ours["peak_memory_bytes"] / 2**20] + ([theirs["peak_memory_bytes"] / 2**20] if theirs else []),
                color="#dd8452")
    axes[2].set_title("peak memory (MiB)")
    fig.suptitle(f"engine on {mx.default_device()} (measured here; not Metal unless run on a Mac)", fontsize=9)
    write_report(args.out, {"metalforge": ours, "mlx_lm": theirs, "device": str(mx.default_device()),
                                                   "prompt_tokens": args.prompt_tokens,
                                                   "decode_tokens": args.decode_tokens}, fig)


if __name__ == "__main__":
    main()
