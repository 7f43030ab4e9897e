"""`metalforge serve` and `mlx_lm.server` side by side under load, on the same model folder and
machine, one server at a time: requests/s, time to first token (p50, p95) and generated tokens/s
with 1, 8 and 32 concurrent clients, each sending streaming completions (greedy) one after another.
Prints a table with ratios (ours / mlx-lm: above 1 is better, for time to first token too) and
writes it as Markdown.

    python benchmarks/serve_load.py [--model FOLDER] [--clients 1,8,32] [--requests 64]
                                    [--prompt-tokens 64] [--max-tokens 32] [--out docs/serve.md]

Without --model the folder is a small random-weight llama in the exact mlx-lm format (4 layers,
hidden 256, 4 heads of 64, 2 KV heads, MLP 704, vocabulary 8192, float32, word-level tokenizer). Off a
Mac both servers run MLX's CPU backend: these are CPU numbers, not Metal ones. Both decode up to
32 requests together (mlx_lm.server's --decode-concurrency 32, our --max-concurrency 32); ours runs
with its default prefix cache and the --backend given (default mlx off a Mac, auto on one).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from metalforge.engine.server.process import free_port, running
from metalforge.files import write_atomic


def prompt(n: int, salt: int) -> str:
    return " ".join(f"w{(7 * i + 131 * salt) % 8000 + 2}" for i in range(n))


async def one_request(client: httpx.AsyncClient, url: str, model: str, text: str, max_tokens: int) -> dict:
    """One streaming completion: time to its first text and the tokens it generated, or the
    connection error that ended it (counted, not hidden)."""
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, pieces, usage = None, 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    pieces += 1
                    first = first or time.perf_counter()
    except httpx.TransportError as e:
        return {"error": type(e).__name__}
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else pieces
    return {"ttft_s": (first or end) - start, "tokens": tokens}


async def load(url: str, model: str, clients: int, requests: int, prompt_tokens: int, max_tokens: int) -> dict:
    """`clients` concurrent clients share `requests` requests, each client one after another."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        await one_request(client, url, model, prompt(prompt_tokens, -1), 4)           # warm up
        todo = list(range(requests))
        results = []

        async def worker():
            while todo:
                i = todo.pop()
                results.append(await one_request(client, url, model, prompt(prompt_tokens, i), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    errors = [r["error"] for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft_s"] for r in results) or [float("nan")]
    return {"errors": len(errors), "error_kinds": sorted(set(errors)), "requests_per_s": len(results) / wall,
            "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": ttft[min(len(ttft) - 1, int(round(0.95 * (len(ttft) - 1))))],
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "wall_s": wall}


DEFAULT_MODEL = ("a random-weight llama in mlx-lm format (4 layers, hidden 256, 4 heads, 2 KV heads, vocabulary 8192, "
                 "float32)")


def default_model(root: Path) -> Path:
    from metalforge.testing import write_model
    return write_model(root / "llama-random", arch="llama", layers=4, hidden=256, heads=4, kv_heads=2, inter=704,
                       vocab=8192, shards=1, tokenizer=True)


def table(rows: dict, clients: list[int]) -> str:
    def fmt(x, unit):
        return f"{x * 1e3:.0f} ms" if unit == "ms" else f"{x:.1f}"
    out = ["| clients | server | requests/s | TTFT p50 | TTFT p95 | tokens/s | failed |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for c in clients:
        ours, theirs = rows["metalforge"][c], rows["mlx_lm.server"][c]
        for name, r in (("metalforge serve", ours), ("mlx_lm.server", theirs)):
            out.append(f"| {c} | {name} | {fmt(r['requests_per_s'], '')} | {fmt(r['ttft_p50_s'], 'ms')} | "
                       f"{fmt(r['ttft_p95_s'], 'ms')} | {fmt(r['tokens_per_s'], '')} | "
                       f"{r['errors']}{' (' + ', '.join(r['error_kinds']) + ')' if r['errors'] else ''} |")
        out.append(f"| {c} | **ratio** | {ours['requests_per_s'] / theirs['requests_per_s']:.2f}x | "
                   f"{theirs['ttft_p50_s'] / ours['ttft_p50_s']:.2f}x | "
                   f"{theirs['ttft_p95_s'] / ours['ttft_p95_s']:.2f}x | "
                   f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="mlx-lm model folder (default: a random-weight llama written to a temp folder)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=32, help="requests per client count (at least the clients)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--backend", default="auto" if platform.system() == "Darwin" else "mlx")
    ap.add_argument("--out", default="docs/serve.md", help="Markdown file to write the table to")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else default_model(Path(tmp))
        kv = max(clients) * (args.prompt_tokens + args.max_tokens + 16) * 2
        servers = {
            "metalforge": [sys.executable, "-m", "metalforge.cli", "serve", "--model", str(folder), "--backend",
                           args.backend, "--kv-tokens", str(kv), "--max-concurrency", "32", "--max-queue", "1024"],
            "mlx_lm.server": [sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--temp", "0",
                              "--decode-concurrency", "32", "--log-level", "WARNING"],
        }
        rows = {}
        for name, cmd in servers.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with running(cmd + ["--port", str(port)], url, Path(tmp) / f"{name}.log"):
                model = str(folder)       # both take the --model string as the model's name
                rows[name] = {}
                for c in clients:
                    r = asyncio.run(load(url, model, c, max(args.requests, c), args.prompt_tokens, args.max_tokens))
                    rows[name][c] = r
                    print(f"{name:14s} {c:3d} clients: {r['requests_per_s']:.2f} req/s, TTFT p50 "
                          f"{r['ttft_p50_s'] * 1e3:.0f} ms p95 {r['ttft_p95_s'] * 1e3:.0f} ms, "
                          f"{r['tokens_per_s']:.1f} tok/s, {r['errors']} failed", flush=True)
    text = table(rows, clients)
    print(text)
    where = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    write_atomic(args.out, f"""# Serving: `metalforge serve` and `mlx_lm.server` under load

Written by `python benchmarks/serve_load.py {' '.join(sys.argv[1:])}` ({where}; backend
{args.backend}). Each client sends streaming completions of {args.prompt_tokens} prompt tokens and up
to {args.max_tokens} generated tokens (greedy) one after another; {max(args.requests, max(clients))}
requests per row; both servers decode up to 32 requests together; failed requests (a refused or
reset connection) are counted apart and left out of the other columns. Ratios are ours over mlx-lm's
(above 1 is better; for time to first token, theirs over ours). Off a Mac both run MLX's CPU backend:
CPU numbers, not Metal ones, on a machine other work shares.

{text}

Model: {'`' + args.model + '`' if args.model else DEFAULT_MODEL}.

Raw figures:

```json
{json.dumps(rows, indent=1)}
```
""")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
