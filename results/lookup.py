"""The config to use for a shape: the results files' entries (shipped, the user's, an explicit
file) merged, and the exact or nearest bucket that is valid on the device. Files are read once
per modification (lookups run per engine op and per tuning study)."""
from __future__ import annotations

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


def _entries_for(device: str, results=None, shipped: bool = True) -> dict:
    """Shipped entries overlaid with the user's (and an explicit file's) by the merge rules."""
    merged = {"entries": {}}
    paths = ([shipped_path(device)] if shipped else []) + [user_results_dir() / f"{device}.yaml"]
    if results:
        paths.append(Path(results))
    for p in paths:
        if p.exists():
            for fam, buckets in load(p)["entries"].items():
                for key, entry in buckets.items():
                    merge(merged, fam, key, Entry.of(entry))   # load() checked it
    return merged["entries"]


def lookup(device, family: str, shape, dtype: str, results=None, shipped: bool = True) -> Choice:
    """The config to use: the exact bucket, else the nearest bucket of the same structure (head
    dim, GQA ratio, bits and group size), else the family default; always valid for `shape`.
    Sources: the shipped modelled defaults (unless shipped=False), the user's results folder and
    an explicit `results` file, merged so measured and faster entries win."""
    dev = devices.get(device)
    fam = get_family(family)
    shape = fam.shape(shape)
    buckets = _entries_for(dev.name, results, shipped).get(family, {})
    key = fam.bucket_key(shape, dtype)
    candidates = []
    if key in buckets:
        candidates.append(("exact", buckets[key]))
    rep = fam.representative(shape)
    near = []
    for k, e in buckets.items():
        if k == key or e["dtype"] != dtype:
            continue
        other = fam.shape(e["shape"])
        distance = fam.shape_distance(rep, other)
        if distance is not None:
            near.append((distance, k, e))
    candidates += [("nearest", e) for _, _, e in sorted(near, key=lambda t: (t[0], t[1]))]
    for source, entry in candidates:
        config = fam.config(entry["config"])
        if not check(fam, config, shape, dtype, dev):
            return Choice(config, source, entry)
    return Choice(fam.default_config(), "default", None)
