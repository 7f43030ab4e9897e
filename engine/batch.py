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
from metalforge.engine.speculative import NUM_DRAFT


class Batch(Scheduler):
    def add(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
            seed: int | None = None, stop=None, logprobs: int | None = None, keep: bool = False, draft=None,
            num_draft: int = NUM_DRAFT, prompt_lookup: int = 0, max_kv_size: int | None = None) -> int:
        """Queue a prompt (text or ids) with its own settings; it joins at the next step with room
        for it. Returns its request id. A full queue or a prompt over max_seq_len is refused.
        logprobs=k fills each Token's `logprob` and its k `top_logprobs`. With keep=True the
        sequence stays in the pool once the request ends, as Engine.generate's does (its id is
        `sequence(rid)`; Engine.keep_prefix offers it to later prompts). `draft` /
        `prompt_lookup`: this request is decoded speculatively (as Engine.generate), its verify pass
        in each step's one forward pass beside the other requests' tokens. `max_kv_size`: its own sliding
        window."""
        return self.request(prompt, max_tokens, temperature, top_p, top_k, seed, stop, keep, logprobs, draft=draft,
                            num_draft=num_draft, prompt_lookup=prompt_lookup, max_kv_size=max_kv_size)

    def __iter__(self):
        try:
            while self.requests:
                yield from self.step()
        finally:
            self.close()
