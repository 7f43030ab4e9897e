"""Prompt caches on disk: a sequence's K/V per layer in safetensors, with the token ids and a
fingerprint of the model, so a later run (or process) prefills only what is new."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx

from metalforge import files
from metalforge.errors import MetalforgeError

FORMAT_VERSION = "2"   # 2: a checksum of the tensors


class PromptCacheError(MetalforgeError):
    """A prompt cache file is corrupt, truncated, or belongs to another model; nothing changed."""


def fingerprint(args, weights: dict[str, mx.array]) -> str:
    """The model's identity: its config, the names, shapes and dtypes of its weights, and a sample
    of their values (the first and last 16 elements of each), so two checkpoints of one
    model type differ without hashing gigabytes."""
    h = hashlib.sha256(json.dumps(args.__dict__, sort_keys=True, default=str).encode())
    for name in sorted(weights):
        w = weights[name]
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        flat = w.reshape(-1)
        sample = mx.concatenate([flat[:16], flat[-16:]])
        if sample.dtype == mx.bfloat16:
            sample = sample.view(mx.uint16)
        h.update(memoryview(sample).tobytes())
    return h.hexdigest()[:32]


def checksum(arrays: dict[str, mx.array]) -> str:
    """SHA-256 of every tensor's name, shape, dtype and bytes: one flipped bit in the K/V data
    would otherwise load and silently change what the model generates."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype}".encode())
        h.update(memoryview(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes())
    return h.hexdigest()


def save(path, pool, sid: int, model_fingerprint: str) -> Path:
    """Write atomically: a temporary file beside the target, renamed into place."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    seq = pool.seq(sid)
    if not seq.tokens:
        raise MetalforgeError(f"sequence {sid} is empty: nothing to cache")
    arrays = {}
    for layer in range(pool.layers):
        k, v = pool.read(layer, pool.runs(sid, seq.length))
        arrays[f"k.{layer}"], arrays[f"v.{layer}"] = k[0], v[0]
    metadata = {"format": "metalforge-prompt-cache", "format_version": FORMAT_VERSION,
                "fingerprint": model_fingerprint, "tokens": json.dumps(seq.tokens), "dtype": str(pool.dtype),
                "layers": str(pool.layers)}
    mx.eval(arrays)
    metadata["checksum"] = checksum(arrays)
    with files.replacing(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(tmp, arrays, metadata=metadata)
    return path


def read(path, model_fingerprint: str | None = None) -> tuple[dict, dict[str, mx.array]]:
    """(metadata, arrays) after every check; raises PromptCacheError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise PromptCacheError(f"{path}: no such prompt cache")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
        mx.eval(arrays)
    except Exception as e:
        raise PromptCacheError(f"{path}: corrupt or truncated prompt cache ({str(e).splitlines()[0]})") from None
    if meta.get("format") != "metalforge-prompt-cache":
        raise PromptCacheError(f"{path}: not a metalforge prompt cache")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PromptCacheError(f"{path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    if model_fingerprint is not None and meta.get("fingerprint") != model_fingerprint:
        raise PromptCacheError(f"{path}: made for another model (fingerprint {meta.get('fingerprint')}, "
                               f"this model is {model_fingerprint})")
    try:
        tokens = json.loads(meta["tokens"])
        layers = int(meta["layers"])
    except (KeyError, ValueError, TypeError) as e:
        raise PromptCacheError(f"{path}: bad metadata ({e})") from None
    if not isinstance(tokens, list) or not tokens or not all(type(t) is int for t in tokens) or layers < 1:
        raise PromptCacheError(f"{path}: bad metadata (tokens must be a non-empty list of ids, layers positive)")
    if meta.get("checksum") != checksum(arrays):
        raise PromptCacheError(f"{path}: checksum mismatch: the tensors changed after the cache was written "
                               "(a corrupt or edited file)")
    for layer in range(layers):
        for kind in "kv":
            a = arrays.get(f"{kind}.{layer}")
            if a is None or a.ndim != 3 or a.shape[1] != len(tokens):
                raise PromptCacheError(f"{path}: tensor {kind}.{layer} is missing or does not hold {len(tokens)} tokens")
    meta["tokens"] = tokens
    meta["layers"] = layers
    return meta, arrays


def info(path) -> dict:
    meta, arrays = read(path)
    size = sum(a.nbytes for a in arrays.values())
    return {"path": str(path), "tokens": len(meta["tokens"]), "layers": meta["layers"], "dtype": meta["dtype"],
            "fingerprint": meta["fingerprint"], "bytes": size}
