"""Prompt caches on disk: a sequence's K/V per layer in safetensors, with the token ids and a
fingerprint of the model, so a later run (or process) prefills only what is new."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx

from metalforge import files
from metalforge.errors import MetalforgeError

FORMAT_VERSION = "3"   # 2: a checksum of the tensors; 3: quantized K/V (kv_bits, kv_group_size)
READABLE = ("2", "3")  # version 2 files are version 3's dense case


PARTS = ("codes", "scales", "biases")   # a quantized pool's tensors per layer and kind (mx.quantize's)


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


def destination(path) -> Path:
    """Where `save` writes for `path` (.safetensors added when missing), refused when an existing
    file there is not a prompt cache: a model's weights are safetensors too (as `cache clear`
    refuses to delete them). Checked before any work."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    if path.is_dir():
        raise MetalforgeError(f"{path}: is a folder, not a prompt cache file")
    if path.exists() and _format(path) != "metalforge-prompt-cache":
        raise MetalforgeError(f"refusing to overwrite {path}: not a metalforge prompt cache")
    return path


def _format(path: Path) -> str | None:
    """The `format` of a safetensors file's metadata, read from its header alone (weights files
    are gigabytes); None for anything else."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(size, 1 << 24)))
        return header.get("__metadata__", {}).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def save(path, pool, sid: int, model_fingerprint: str) -> Path:
    """Write atomically: a temporary file beside the target, renamed into place."""
    path = destination(path)
    seq = pool.seq(sid)
    if not seq.tokens:
        raise MetalforgeError(f"sequence {sid} is empty: nothing to cache")
    if None in seq.blocks:
        raise MetalforgeError(f"sequence {sid} gave back the blocks that fell out of its window: a prompt cache "
                              "holds a whole sequence")
    arrays = {}
    quantization = getattr(pool.storage, "quantization", None)
    for layer in range(pool.layers):
        runs = pool.runs(sid, seq.length)
        if quantization:   # stored as they are: dequantizing and quantizing again would move them
            for kind, parts in zip("kv", pool.storage.read_quantized(layer, runs)):
                for name, part in zip(PARTS, parts):
                    arrays[f"{kind}.{layer}.{name}"] = part[0]
        else:
            k, v = pool.read(layer, runs)
            arrays[f"k.{layer}"], arrays[f"v.{layer}"] = k[0], v[0]
    metadata = {"format": "metalforge-prompt-cache", "format_version": FORMAT_VERSION,
                "fingerprint": model_fingerprint, "tokens": json.dumps(seq.tokens), "dtype": str(pool.dtype),
                "layers": str(pool.layers)}
    if quantization:
        metadata.update(kv_bits=str(quantization["bits"]), kv_group_size=str(quantization["group_size"]))
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
    if meta.get("format_version") not in READABLE:
        raise PromptCacheError(f"{path}: format version {meta.get('format_version')} is not one of "
                               f"{', '.join(READABLE)}")
    if model_fingerprint is not None and meta.get("fingerprint") != model_fingerprint:
        raise PromptCacheError(f"{path}: made for another model (fingerprint {meta.get('fingerprint')}, "
                               f"this model is {model_fingerprint})")
    try:
        tokens = json.loads(meta["tokens"])
        layers = int(meta["layers"])
        quantization = {"bits": int(meta["kv_bits"]), "group_size": int(meta["kv_group_size"])} \
            if "kv_bits" in meta else None
    except (KeyError, ValueError, TypeError) as e:
        raise PromptCacheError(f"{path}: bad metadata ({e})") from None
    if not isinstance(tokens, list) or not tokens or not all(type(t) is int for t in tokens) or layers < 1:
        raise PromptCacheError(f"{path}: bad metadata (tokens must be a non-empty list of ids, layers positive)")
    if meta.get("checksum") != checksum(arrays):
        raise PromptCacheError(f"{path}: checksum mismatch: the tensors changed after the cache was written "
                               "(a corrupt or edited file)")
    names = [f".{p}" for p in PARTS] if quantization else [""]
    for layer in range(layers):
        for kind in "kv":
            for name in names:
                a = arrays.get(f"{kind}.{layer}{name}")
                if a is None or a.ndim != 3 or a.shape[1] != len(tokens):
                    raise PromptCacheError(f"{path}: tensor {kind}.{layer}{name} is missing or does not hold "
                                           f"{len(tokens)} tokens")
    meta["tokens"] = tokens
    meta["layers"] = layers
    meta["quantization"] = quantization
    return meta, arrays


def info(path) -> dict:
    meta, arrays = read(path)
    size = sum(a.nbytes for a in arrays.values())
    return {"path": str(path), "tokens": len(meta["tokens"]), "layers": meta["layers"], "dtype": meta["dtype"],
            "fingerprint": meta["fingerprint"], "bytes": size}
