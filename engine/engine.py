"""The decoding engine users import: load a model folder, generate, manage sequences and caches."""
from __future__ import annotations

import operator
from pathlib import Path

import mlx.core as mx

from metalforge import arguments
from metalforge.engine import models
from metalforge.engine.config import read
from metalforge.engine import prompt_cache, tokenizer as tokenizers
from metalforge.engine.batch import Batch
from metalforge.engine.generation import Generation
from metalforge.engine.kv import BLOCK_SIZE, KVPool
from metalforge.engine.kv import quantized
from metalforge.engine.kv.quantized import QuantizedStorage
from metalforge.engine.kv.spec import sink_window
from metalforge.engine.kv.storage import DenseStorage
from metalforge.engine.memory import MemoryLimits, check_fit, parse_bytes
from metalforge.engine.weights import load_weights
from metalforge.engine.ops import Kernels
from metalforge.engine.scheduler import MAX_WAITING, Scheduler
from metalforge.engine.speculative import NUM_DRAFT
from metalforge.errors import MetalforgeError
from metalforge import devices
from metalforge.intmath import cdiv

# Prompt tokens per forward pass: attention's scratch is heads x chunk x length floats (8 heads at
# 8192 tokens: 128 MiB), a quarter of mlx-lm's 2048-token steps; the linear layers already reach
# their dequantized speed at this many rows (engine/cpu_linear.py).
PREFILL_CHUNK = 512

OPTIONS = ("kv_tokens", "kv_memory", "block_size", "max_seq_len", "memory", "max_kv_size", "kv_bits", "kv_group_size")


def load(path, device=None, backend: str | None = None, results=None, **options) -> "Engine":
    """Load an mlx-lm style model folder. Options: kv_tokens (default 4096) or kv_memory (bytes
    or '10%'), block_size (16), max_seq_len, memory={'wired_limit', 'cache_limit', 'memory_limit'},
    max_kv_size: a sliding window of that many keys per query (the first 4 kept as attention
    sinks, as mlx-lm's rotating cache keeps them); blocks that fall out of it go back to the pool,
    so a sequence may grow to max_seq_len (default then: the model's max_position_embeddings)
    whatever kv_tokens holds. kv_bits (8 or 4) with kv_group_size (32, 64 or 128; default 64):
    K and V stored quantized (engine/kv/quantized.py); kv_tokens from kv_memory and the fit check
    count the smaller pool."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise MetalforgeError(f"unknown engine option(s) {sorted(unknown)}; valid options: {', '.join(OPTIONS)}")
    return Engine(Path(path), device, backend, results, **options)


class Engine:
    def __init__(self, path: Path, device, backend, results, kv_tokens=None, kv_memory=None, block_size=BLOCK_SIZE,
                 max_seq_len=None, memory=None, max_kv_size=None, kv_bits=None, kv_group_size=64):
        self.path = path
        for name, value in (("kv_tokens", kv_tokens), ("block_size", block_size), ("max_seq_len", max_seq_len),
                            ("max_kv_size", max_kv_size)):
            if value is not None:
                arguments.positive_int(name, value)
        self.args = models.parse(read(path), str(path / "config.json"))
        if device is not None:
            self.device = devices.resolve(device)
        else:
            self.device = devices.detect()
        self.limits = MemoryLimits(memory)
        weights = load_weights(path)
        self.kernels = Kernels(backend, self.device, results)
        self.model = models.get(self.args.model_type)(self.args, weights, self.kernels)
        self.tokenizer = tokenizers.load(path)
        self.fingerprint = prompt_cache.fingerprint(self.args, weights)
        a = self.args
        shape = (a.num_hidden_layers, a.num_key_value_heads, a.head_dim, self.model.dtype)
        if kv_bits is not None:
            quantized.check(kv_bits, kv_group_size, a.head_dim)
            per_token = QuantizedStorage.token_bytes(*shape, kv_bits, kv_group_size)
        else:
            per_token = DenseStorage.token_bytes(*shape)
        if kv_memory is not None:
            kv_tokens = parse_bytes(kv_memory, self.limits.total, "kv_memory") // per_token
        kv_tokens = 4096 if kv_tokens is None else kv_tokens
        if kv_tokens < block_size:
            raise MetalforgeError(f"kv_tokens={kv_tokens} is smaller than one block of {block_size} tokens")
        self.weights_bytes = self.model.weights_bytes
        num_blocks = cdiv(kv_tokens, block_size)
        check_fit(self.weights_bytes, num_blocks * block_size * per_token, self.limits.total, self.limits.total_source)
        self.limits.apply()
        specs = None
        if max_kv_size is not None:
            specs = [sink_window(max_kv_size, kv_tokens)] * a.num_hidden_layers
        longest = a.max_position_embeddings if specs else min(kv_tokens, a.max_position_embeddings)
        layout = (a.num_hidden_layers, a.num_key_value_heads, a.head_dim, block_size, num_blocks, self.model.dtype)
        storage = DenseStorage(*layout) if kv_bits is None else QuantizedStorage(*layout, kv_bits, kv_group_size)
        self.pool = KVPool(storage, block_size, num_blocks, int(max_seq_len or longest), specs)
        self.prefixes: dict[int, str] = {}   # sequences kept as reusable prompt prefixes -> where from
        self._closed = False

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Restore MLX's memory limits as they were before load."""
        if not self._closed:
            self.limits.restore()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- sequences ------------------------------------------------------------------------------
    def add_sequence(self) -> int:
        return self.pool.add_sequence()

    def remove(self, seq: int, start: int = 0, end: int | None = None) -> None:
        self.pool.remove(seq, start, end)
        if seq not in self.pool.seqs:
            self.prefixes.pop(seq, None)

    def fork(self, seq: int) -> int:
        return self.pool.fork(seq)

    def clear(self) -> None:
        self.pool.clear()
        self.prefixes.clear()

    def tokens(self, seq: int) -> list[int]:
        return list(self.pool.seq(seq).tokens)

    def step(self, seqs: list[int], tokens: list[list[int]], logits_at: dict[int, list[int]] | None = None) -> mx.array:
        """Append tokens to sequences and return their next-token logits (B, vocab), in one
        forward pass whatever the mix: prompts and single tokens (a ragged step). `logits_at`
        asks for a sequence's logits after other of its new tokens (indices into its list; the
        rows come sequence after sequence). Bad ids or sequences are refused before anything changes."""
        self._check_step(seqs, tokens)
        for sid, rows in (logits_at or {}).items():
            n = len(tokens[seqs.index(sid)]) if sid in seqs else 0
            if not n or not rows or any(not 0 <= r < n for r in rows):
                raise MetalforgeError(f"step: logits_at[{sid}]={rows} are not indices of the sequence's {n} new tokens")
        step = self.pool.begin({sid: len(t) for sid, t in zip(seqs, tokens)}, logits_at)
        logits = self.model.forward(step, mx.array([t for ids in tokens for t in ids], dtype=mx.int32))
        step.commit(tokens)
        mx.eval(logits, self.pool.storage.arrays())
        return logits

    def prefill(self, seq: int, tokens: list[int]) -> mx.array:
        """`step` for one sequence's prompt, in chunks of PREFILL_CHUNK tokens: attention's scratch
        is (heads, chunk, length) instead of (heads, length, length), so memory stays bounded for
        long prompts. Returns the last token's logits (1, vocab)."""
        for i in range(0, len(tokens), PREFILL_CHUNK):
            logits = self.step([seq], [tokens[i:i + PREFILL_CHUNK]])
        return logits

    # ---- generation -----------------------------------------------------------------------------
    def _check_step(self, seqs, tokens) -> None:
        if len(seqs) != len(tokens) or not seqs:
            raise MetalforgeError(f"step: {len(seqs)} sequence(s) but {len(tokens)} token list(s); give one list per sequence")
        if len(set(seqs)) != len(seqs):
            raise MetalforgeError(f"step: sequence ids {seqs} repeat; each sequence may appear once per step")
        for sid, ids in zip(seqs, tokens):
            self.pool.seq(sid)
            if not ids:
                raise MetalforgeError(f"step: no tokens for sequence {sid}")
            self._check_ids(ids)

    def _check_ids(self, ids) -> list[int]:
        """The ids as Python ints, each inside the vocabulary (an id past the embedding table
        would read outside it)."""
        out, bad = [], []
        for t in ids:
            try:
                n = operator.index(t)
            except TypeError:
                n = None
            if n is None or isinstance(t, bool) or not 0 <= n < self.args.vocab_size:
                bad.append(t)
            out.append(n)
        if bad:
            raise MetalforgeError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.args.vocab_size - 1})")
        return out

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise MetalforgeError(f"{self.path} has no tokenizer.json: pass the prompt as a list of token ids")
            return self.tokenizer.encode(prompt)
        return self._check_ids(prompt)

    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop=None, keep: bool = False, logprobs: int | None = None, draft=None,
                 num_draft: int = NUM_DRAFT, prompt_lookup: int = 0, max_kv_size: int | None = None) -> Generation:
        """Stream tokens for a prompt (text or token ids), through the same loop as `batch()`. A
        cached prefix (see load_prompt_cache and keep_prefix) is reused so only new tokens are
        prefilled. With keep=True the sequence stays in the pool afterwards (its id is
        `generation.sequence`), holding the prompt and every generated token but the last.
        logprobs=k fills each Token's `logprob` and its k `top_logprobs`. Arguments are checked
        here, before any work; a prompt the pool cannot hold raises PoolExhausted when iterated.

        Speculative decoding (engine/speculative.py): `draft` (an engine or a model folder of the
        same tokenizer) proposes `num_draft` tokens a step, or `prompt_lookup=n` copies them from
        an earlier match of the last n tokens; the target verifies them in one forward pass and
        the output is distributed as without (greedy: the same tokens). `stats` counts verify
        passes, drafted and accepted tokens. `max_kv_size`: a sliding window for this request
        alone (see load's; its length is still bounded by max_seq_len)."""
        loop = Scheduler(self, max_waiting=1)
        rid = loop.request(prompt, max_tokens, temperature, top_p, top_k, seed, stop, keep, logprobs, draft=draft,
                           num_draft=num_draft, prompt_lookup=prompt_lookup, max_kv_size=max_kv_size)

        def run(gen: Generation):
            loop.start_clock(rid)
            try:
                while rid in loop.requests:
                    for _, token in loop.step():
                        gen.sequence = loop.sequence(rid)
                        yield token
                if loop.error(rid):
                    raise loop.error(rid)
            finally:
                loop.close()
        return Generation(run, loop.stats(rid))

    def batch(self, max_waiting: int = MAX_WAITING) -> Batch:
        """A continuous batch: requests join and leave between steps, and wait (at most
        `max_waiting` of them) while the pool is full (see engine/scheduler.py)."""
        return Batch(self, max_waiting)

    def generate_batch(self, prompts, max_tokens: int = 128, **sampling) -> Batch:
        """Generate for several prompts at once, decoded together: iterate for (prompt index,
        Token) pairs as they are produced; `batch.stats(i)` holds prompt i's figures. `sampling`
        takes generate's temperature, top_p, top_k, seed and stop, the same for every prompt."""
        batch = Batch(self)
        for p in prompts:
            batch.add(p, max_tokens, **sampling)
        return batch

    # ---- prompt caches ---------------------------------------------------------------------------
    def keep_prefix(self, seq: int) -> None:
        """Offer a sequence's tokens as a prefix later prompts may start from."""
        self.pool.seq(seq)
        self.prefixes[seq] = "kept"

    def save_prompt_cache(self, path, seq: int) -> Path:
        return prompt_cache.save(path, self.pool, seq, self.fingerprint)

    def load_prompt_cache(self, path) -> int:
        """Load a saved cache into a new sequence (a reusable prefix) and return its id. Another
        model's cache, or a corrupt or truncated file, is an error and changes nothing."""
        meta, arrays = prompt_cache.read(path, self.fingerprint)
        tokens = self._check_ids(meta["tokens"])
        stored = meta["quantization"]
        kv = self._cached_kv(path, meta, arrays, len(tokens))
        mine = getattr(self.pool.storage, "quantization", None)
        sid = self.pool.add_sequence()
        try:
            step = self.pool.begin({sid: len(tokens)})
            for layer, (k, v) in enumerate(kv):
                if stored and stored == mine:   # the codes as saved
                    self.pool.storage.write_quantized(layer, step.where, k, v)
                    continue
                if stored:
                    k, v = (mx.dequantize(*x, **stored) for x in (k, v))
                step.update_and_fetch(layer, k[None], v[None])
            step.commit([tokens])
        except BaseException:
            self.pool.remove(sid)
            raise
        mx.eval(self.pool.storage.arrays())
        self.prefixes[sid] = str(path)
        return sid

    def _cached_kv(self, path, meta, arrays, tokens: int) -> list[tuple]:
        """Each layer's (K, V) of a prompt cache file: arrays, or [codes, scales, biases] when it
        was saved from a quantized pool; refused when they do not fit this model's KV cache."""
        a, stored = self.args, meta["quantization"]
        dims = [(f".{p}", a.head_dim * stored["bits"] // 32 if p == "codes" else a.head_dim // stored["group_size"])
                for p in prompt_cache.PARTS] if stored else [("", a.head_dim)]
        shape = lambda name: tuple(getattr(arrays.get(name), "shape", ()))
        bad = [f"{kind}.{layer}{name}" for layer in range(self.pool.layers) for kind in "kv" for name, d in dims
               if shape(f"{kind}.{layer}{name}") != (a.num_key_value_heads, tokens, d)]
        if meta["layers"] != self.pool.layers or bad:
            raise prompt_cache.PromptCacheError(f"{path}: does not fit this model's KV cache (layers "
                                                f"{meta['layers']} vs {self.pool.layers}; tensors {bad[:3]} do not "
                                                f"hold {a.num_key_value_heads} heads of {tokens} tokens of this size)")
        pick = (lambda kind, layer: [arrays[f"{kind}.{layer}.{p}"] for p in prompt_cache.PARTS]) if stored else \
            (lambda kind, layer: arrays[f"{kind}.{layer}"])
        return [(pick("k", layer), pick("v", layer)) for layer in range(self.pool.layers)]

    # ---- reporting --------------------------------------------------------------------------------
    def memory_breakdown(self) -> dict:
        active = mx.get_active_memory()
        return {
            "weights": self.weights_bytes,
            "kv_reserved": self.pool.reserved_bytes,
            "kv_used": self.pool.used_blocks * self.pool.block_bytes,
            "scratch": max(0, active - self.weights_bytes - self.pool.reserved_bytes),
            "active": active,
        }

    def kernel_report(self) -> dict:
        """Which kernel (and config, and where the config came from) each kind of op used."""
        return dict(self.kernels.report)
