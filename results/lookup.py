"""The config to use for a shape: the results files' entries (shipped, the user's, an explicit
file) merged, and the exact or nearest bucket that is valid on the device. Files are read once
per modification (lookups run per engine op and per tuning study)."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from metalforge import devices
from metalforge.kernels.checks import check
from metalforge.kernels.families import get as get_family
from metalforge.results.entry import Entry
from metalforge.results.store import load, merge, shipped_path, user_results_dir


@dataclass(frozen=True)
class Choice:
    config: dict
    source: str          # "exact", "nearest" or "default"
    entry: dict | None   # the results entry used, if any

    def describe(self) -> str:
        if self.entry is None:
            return "family default"
        error = self.entry.get("model_error")
        how = f"model-timed, model error {error:.0%}" if error is not None else f"{self.entry['timer']}-timed"
        return f"{self.source} match {self.entry['shape']} ({how})"


def _stamp(path: Path):
    """What changes when a file is rewritten (atomically: a new inode) or touched; None when absent."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


# both keyed by the files' paths and holding their stamps: a changed file replaces, never adds
_ENTRIES: dict = {}   # paths -> (stamps, merged entries)
_CHOICES: dict = {}   # (device, family, shape, dtype, paths) -> (stamps, Choice)


def _paths(device: str, results, shipped: bool) -> tuple[Path, ...]:
    paths = ([shipped_path(device)] if shipped else []) + [user_results_dir() / f"{device}.yaml"]
    if results:
        paths.append(Path(results))
    return tuple(paths)


def _entries_for(paths: tuple[Path, ...], stamps: tuple) -> dict:
    """Shipped entries overlaid with the user's (and an explicit file's) by the merge rules; read
    again only when one of the files changed."""
    cached = _ENTRIES.get(paths)
    if cached is None or cached[0] != stamps:
        merged = {"entries": {}}
        for p, stamp in zip(paths, stamps):
            if stamp is not None:
                for fam, buckets in load(p)["entries"].items():
                    for key, entry in buckets.items():
                        merge(merged, fam, key, Entry.of(entry))   # load() checked it
        cached = _ENTRIES[paths] = (stamps, merged["entries"])
    return cached[1]


def lookup(device, family: str, shape, dtype: str, results=None, shipped: bool = True) -> Choice:
    """The config to use: the exact bucket, else the nearest bucket of the same structure (head
    dim, GQA ratio, bits and group size) where MLX runs the same kind of kernel (Family.mlx_regime),
    else the family default; always valid for `shape`.
    Sources: the shipped modelled defaults (unless shipped=False), the user's results folder and
    an explicit `results` file, merged so measured and faster entries win. Answers are kept until
    one of the files changes (its modification time, size or inode)."""
    dev = devices.get(device)
    fam = get_family(family)
    shape = fam.shape(shape)
    paths = _paths(dev.name, results, shipped)
    stamps = tuple(_stamp(p) for p in paths)
    key = (dev, family, shape, dtype, paths)
    cached = _CHOICES.get(key)
    if cached is None or cached[0] != stamps:
        cached = _CHOICES[key] = (stamps, _choose(dev, fam, shape, dtype, _entries_for(paths, stamps).get(family, {})))
    return cached[1]


def _choose(dev, fam, shape, dtype: str, buckets: dict) -> Choice:
    key = fam.bucket_key(shape, dtype)
    candidates = []
    if key in buckets:
        candidates.append(("exact", buckets[key]))
    rep = fam.representative(shape)
    regime = fam.mlx_regime(rep)
    near = []
    for k, e in buckets.items():
        if k == key or e["dtype"] != dtype:
            continue
        other = fam.shape(e["shape"])
        if fam.mlx_regime(other) != regime:   # tuned against another of MLX's kernels: no evidence here
            continue
        distance = fam.shape_distance(rep, other)
        if distance is not None:
            near.append((distance, k, e))
    candidates += [("nearest", e) for _, _, e in sorted(near, key=lambda t: (t[0], t[1]))]
    for source, entry in candidates:
        config = fam.config(entry["config"])
        if not check(fam, config, shape, dtype, dev):
            return Choice(config, source, entry)
    return Choice(_valid_default(fam, shape, dtype, dev), "default", None)


def _valid_default(fam, shape, dtype: str, dev) -> dict:
    """The family's default config, or where the device refuses it at this shape (a decode
    attention sharing K/V over 8 query heads of 128 needs 33,280 bytes of threadgroup memory) the
    valid config that changes the fewest parameters of it (in declaration and domain order), so
    no lookup hands out a config that fails at dispatch. The default itself where none is valid."""
    default = fam.default_config()
    if not check(fam, default, shape, dtype, dev):
        return default
    params = fam.params
    for changed in range(1, len(params) + 1):
        for subset in itertools.combinations(params, changed):
            for values in itertools.product(*([v for v in p.domain if v != p.default] for p in subset)):
                config = {**default, **{p.name: v for p, v in zip(subset, values)}}
                if not check(fam, config, shape, dtype, dev):
                    return config
    return default
