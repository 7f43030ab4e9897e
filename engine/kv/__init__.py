"""The KV cache: block bookkeeping (blocks.py), tensor storage (storage.py), per-layer specs
(spec.py), the pool of sequences (pool.py) and a forward pass's view of it (step.py)."""
from metalforge.engine.kv.pool import BLOCK_SIZE, KVPool, PoolExhausted, Sequence
from metalforge.engine.kv.step import LayerKV, Step

__all__ = ["BLOCK_SIZE", "KVPool", "PoolExhausted", "Sequence", "Step", "LayerKV"]
