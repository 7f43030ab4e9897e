"""The metalforge decoding engine: mlx-lm model folders, tuned kernels, a block KV pool,
prompt caches on disk and memory limits.

    from metalforge import engine
    with engine.load("path/to/model", backend="auto", kv_tokens=8192) as e:
        gen = e.generate("Hello", max_tokens=32)
        for token in gen:
            print(token.text, end="")
        print(gen.stats)
        for i, token in e.generate_batch(["Hi", "Bonjour"], max_tokens=16):   # decoded together
            print(i, token.text)
"""
from metalforge.engine.batch import Batch
from metalforge.engine.engine import Engine, load
from metalforge.engine.generation import Generation, Stats, Token
from metalforge.engine.kv import PoolExhausted
from metalforge.engine.prompt_cache import PromptCacheError

__all__ = ["load", "Engine", "Batch", "Generation", "Stats", "Token", "PoolExhausted", "PromptCacheError"]
