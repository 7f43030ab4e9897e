"""End-to-end speed of the engine and, side by side, of mlx-lm on the same model folder: decode
tokens per second, time to first token cold and from a saved prompt cache, many sequences at
once, and peak memory. Used by `metalforge bench` and benchmarks/engine_decode.py; whatever
backend runs is reported with the figures (off a Mac that is MLX's CPU backend, not Metal)."""
from __future__ import annotations

import time

import mlx.core as mx

from metalforge import engine


def engine_figures(folder, prompt, decode_tokens, cache_path, backend=None):
    out = {}
    with engine.load(folder, backend=backend, kv_tokens=len(prompt) + decode_tokens + 64) as e:
        out["backend"] = e.kernels.backend
        cold = engine_generate(e, prompt, decode_tokens)
        out.update(decode_tokens_per_s=cold["decode_tokens_per_s"], ttft_cold_s=cold["ttft_s"],
                   peak_memory_bytes=cold["peak_memory_bytes"])
        sid = e.add_sequence()
        e.step([sid], [prompt])
        e.save_prompt_cache(cache_path, sid)
    with engine.load(folder, backend=backend, kv_tokens=len(prompt) + decode_tokens + 64) as e:
        e.load_prompt_cache(cache_path)
        gen = e.generate(prompt + [cold["first_token"]], max_tokens=4)
        list(gen)
        out["ttft_from_cache_s"] = gen.stats.time_to_first_token_s
        out["cached_tokens"] = gen.stats.cached_tokens
    return out


def mlx_lm_figures(folder, prompt, decode_tokens):
    try:   # optional dependency: the figures side by side when mlx-lm is installed
        from mlx_lm import load
    except ImportError:
        return None
    theirs = mlx_lm_generate(*load(str(folder)), prompt, decode_tokens)
    return {"decode_tokens_per_s": theirs["decode_tokens_per_s"], "ttft_cold_s": theirs["ttft_s"],
            "peak_memory_bytes": theirs["peak_memory_bytes"]}


def engine_generate(e, prompt, decode_tokens) -> dict:
    """One prompt through a loaded engine: time to first token, decode tokens/s, peak memory."""
    mx.reset_peak_memory()
    gen = e.generate(prompt, max_tokens=decode_tokens)
    ids = [t.id for t in gen]
    return {"ttft_s": gen.stats.time_to_first_token_s, "decode_tokens_per_s": gen.stats.decode_tokens_per_s,
            "tokens": len(ids), "first_token": ids[0], "peak_memory_bytes": mx.get_peak_memory()}


def mlx_lm_generate(model, tokenizer, prompt, decode_tokens) -> dict:
    from mlx_lm import stream_generate
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = last = None
    n = 0
    for _ in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=decode_tokens):
        last = time.perf_counter()
        first, n = first or last, n + 1
    return {"ttft_s": first - start, "decode_tokens_per_s": (n - 1) / (last - first) if n > 1 else 0.0,
            "tokens": n, "peak_memory_bytes": mx.get_peak_memory()}


def engine_batch(e, prompts, decode_tokens) -> dict:
    """All prompts at once (generate_batch): total generated tokens per second of wall time,
    prefill included."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    n = sum(1 for _ in e.generate_batch(prompts, max_tokens=decode_tokens))
    wall = time.perf_counter() - start
    return {"tokens": n, "seconds": wall, "tokens_per_s": n / wall, "peak_memory_bytes": mx.get_peak_memory()}


def mlx_lm_batch(model, tokenizer, prompts, decode_tokens) -> dict:
    from mlx_lm import batch_generate
    mx.reset_peak_memory()
    start = time.perf_counter()
    out = batch_generate(model, tokenizer, prompts, max_tokens=decode_tokens, return_token_ids=True)
    wall = time.perf_counter() - start
    n = sum(len(ids) for ids in out.token_ids)
    return {"tokens": n, "seconds": wall, "tokens_per_s": n / wall, "peak_memory_bytes": mx.get_peak_memory()}
