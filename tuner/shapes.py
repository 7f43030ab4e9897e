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
from metalforge.engine import models
from metalforge.engine.config import read
from metalforge.engine.ops import kernel_shapes
from metalforge.intmath import pow2_bucket

# A Qwen2.5-0.5B-sized model (4-bit): small enough to tune on a laptop in minutes.
BUILTIN_MODEL = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
    "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936,
    "quantization": {"group_size": 64, "bits": 4},
}
DEFAULT_CONTEXTS = (512, 4096)
DEFAULT_PREFILL = (128, 512)


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
                      where: str = "config.json", num_draft: int = 0) -> dict[str, list[dict]]:
    """The kernel shapes the engine runs for this model, as its model type's op plan says:
    decode at each context (attention in the engine's paged layout; with `num_draft`, also the
    verify passes of speculative decoding), prompts at each prefill length, each op given to the
    family that serves it (the engine runs MLX's op for the rest: 3-bit weights, head dim 32).
    Config errors are the engine's, word for word."""
    args = models.parse(config, where)
    plan = models.get(args.model_type).op_plan(args, contexts=sorted({pow2_bucket(c) for c in contexts}), batch=batch,
                                               prefill=sorted({pow2_bucket(p) for p in prefill}), num_draft=num_draft)
    return kernel_shapes(plan)


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


def model_families() -> list[str]:
    """What tuning a model tunes unless --families says otherwise (Family.tuned_with_models; a
    family has shapes only where the model runs its op: gather_qmv where it has expert layers)."""
    return [name for name, fam in FAMILIES.items() if fam.tuned_with_models]


def targets(shapes: dict[str, list[dict]], families=None, dtype: str = "float16") -> list[Target]:
    """Validated, de-duplicated study targets (one per bucket)."""
    out, seen = [], set()
    for fam_name in families or list(shapes):
        fam = get_family(fam_name)
        for values in shapes.get(fam_name, []):
            t = Target(fam_name, fam.representative(values), dtype)
            if (fam_name, t.bucket) not in seen:   # families may share a bucket's words (qmv, gate_up)
                seen.add((fam_name, t.bucket))
                out.append(t)
    return out
