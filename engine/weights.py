"""An mlx-lm model folder's weights: every tensor of its safetensors files."""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from metalforge.errors import MetalforgeError


def load_weights(folder) -> dict[str, mx.array]:
    """All tensors of the folder's safetensors files (sharded or not, with or without an index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise MetalforgeError(f"{index}: corrupt index ({e})") from None
        paths = [folder / f for f in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise MetalforgeError(f"{folder}: no *.safetensors weight files")
    weights = {}
    for p in paths:
        if not p.is_file():
            raise MetalforgeError(f"{p}: listed in the index but missing")
        try:
            weights.update(mx.load(str(p)))
        except Exception as e:  # MLX raises RuntimeError/ValueError on truncated or corrupt files
            raise MetalforgeError(f"{p}: cannot read safetensors ({str(e).splitlines()[0]})") from None
    return weights
