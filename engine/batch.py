"""Many sequences at once: continuous batching over the engine's block pool, the same loop
`Engine.generate` runs for one (engine/scheduler.py).

    batch = engine.batch()
    a = batch.add("Once upon", max_tokens=32)
    for rid, token in batch:            # (request id, Token) as they are produced
        if rid == a and token.id == 13:
            batch.add("Another prompt", temperature=0.7, seed=1)   # joins at the next step
"""
from __future__ import annotations

from metalforge.engine.scheduler import Scheduler


class Batch(Scheduler):
    def add(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
            seed: int | None = None, stop=None) -> int:
        """Queue a prompt (text or ids) with its own settings; it joins at the next step with room
        for it. Returns its request id. A full queue or a prompt over max_seq_len is refused."""
        return self.request(prompt, max_tokens, temperature, top_p, top_k, seed, stop)

    def __iter__(self):
        try:
            while self.requests:
                yield from self.step()
        finally:
            self.close()
