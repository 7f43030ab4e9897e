"""The shapes to tune: from an mlx-lm model folder's config.json, a YAML file, or the built-in
small model; attention contexts bucketed by powers of two so one study serves a range."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from metalforge.errors import MetalforgeError, choices
from metalforge.kernels import dtypes
from metalforge.kernels.families import FAMILIES, get as get_family
from metalforge.kernels.family import Family
from metalforge.engine.config import read, sizes
from metalforge.intmath import pow2_bucket

# A Qwen2.5-0.5B-sized model (4-bit): small enough to tune on a laptop in minutes.
BUILTIN_MODEL = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
    "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936,
    "quantization": {"group_size": 64, "bits": 4},
}
DEFAULT_CONTEXTS = (512, 4096)
DEFAULT_PREFILL = (128, 512)
# What a model tunes unless --families says otherwise (qmm, the prompt-side product, on request).
MODEL_FAMILIES = ("qmv", "decode_attention", "prefill_attention")


@dataclass(frozen=True)
class Target:
    """One study's subject: a family, a bucket-representative shape and a dtype. Built from
    names and plain dicts, it holds the family object, a validated shape and the dtype's
    canonical name, so nothing downstream looks them up or normalises them again."""

    family: Family
    shape: object
    dtype: str

    def __post_init__(self):
        family = get_family(self.family) if isinstance(self.family, str) else self.family
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "shape", family.shape(self.shape))
        object.__setattr__(self, "dtype", dtypes.get(self.dtype).name)

    @property
    def bucket(self) -> str:
        return self.family.bucket_key(self.shape, self.dtype)


def from_model_config(config: dict, contexts=DEFAULT_CONTEXTS, prefill=DEFAULT_PREFILL, batch: int = 1,
                      where: str = "config.json") -> dict[str, list[dict]]:
    """Every distinct qmv shape of the model, decode attention at each context, prefill at a few
    lengths. The sizes are read as the engine reads them (any decoder architecture), so the
    tuner and the engine agree on a model's shapes and refuse the same nonsense."""
    a = sizes(config, where)
    hidden, inter, heads, kv_heads, head_dim = (a.hidden_size, a.intermediate_size, a.num_attention_heads,
                                                a.num_key_value_heads, a.head_dim)
    out: dict[str, list[dict]] = {"qmv": [], "qmm": [], "decode_attention": [], "prefill_attention": []}
    if a.quantization:
        bits, gs = a.quantization["bits"], a.quantization["group_size"]
        vocab = (a.vocab_size, hidden)
        projections = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (hidden, heads * head_dim),
                       (inter, hidden), (hidden, inter), vocab]
        seen = set()
        for n, k in projections:
            if (n, k) not in seen:
                seen.add((n, k))
                out["qmv"].append(dict(M=batch, N=n, K=k, bits=bits, group_size=gs))
        # prompts: every projection but the vocabulary one (only the last position needs logits)
        for m in sorted({pow2_bucket(p) for p in prefill}):
            for n, k in sorted(seen - {vocab}):
                out["qmm"].append(dict(M=m, N=n, K=k, bits=bits, group_size=gs))
    for s in sorted({pow2_bucket(c) for c in contexts}):
        out["decode_attention"].append(dict(B=batch, Hq=heads, Hkv=kv_heads, S=s, D=head_dim))
    for n in sorted({pow2_bucket(p) for p in prefill}):
        out["prefill_attention"].append(dict(B=1, Hq=heads, Hkv=kv_heads, L=n, D=head_dim))
    # only what a family serves: the engine runs MLX's op for the rest (3-bit weights, head dim 32)
    return {name: [v for v in values if _serves(name, v)] for name, values in out.items()}


def _serves(family: str, values: dict) -> bool:
    try:
        get_family(family).shape(values)
    except MetalforgeError:
        return False
    return True


def from_model_folder(path, **kw) -> dict[str, list[dict]]:
    return from_model_config(read(path), where=str(Path(path) / "config.json"), **kw)


def from_yaml(path) -> dict[str, list[dict]]:
    """A shapes file: {family: [{field: value, ...}, ...]}."""
    try:
        data = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise MetalforgeError(f"{path}: cannot read shapes file (not UTF-8 text)") from None
    except OSError as e:
        raise MetalforgeError(f"{path}: cannot read shapes file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise MetalforgeError(f"{path}: cannot read shapes file ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MetalforgeError(f"{path}: expected a mapping of family name to a list of shapes")
    for fam, shapes in data.items():
        if fam not in FAMILIES:
            raise MetalforgeError(f"{path}: unknown family '{fam}'; valid families: {choices(FAMILIES)}")
        if not isinstance(shapes, list) or not all(isinstance(s, dict) for s in shapes):
            raise MetalforgeError(f"{path}: '{fam}' must be a list of shape mappings")
    return data


def targets(shapes: dict[str, list[dict]], families=None, dtype: str = "float16") -> list[Target]:
    """Validated, de-duplicated study targets (one per bucket)."""
    out, seen = [], set()
    for fam_name in families or list(shapes):
        fam = get_family(fam_name)
        for values in shapes.get(fam_name, []):
            t = Target(fam_name, fam.representative(values), dtype)
            if t.bucket not in seen:
                seen.add(t.bucket)
                out.append(t)
    return out
