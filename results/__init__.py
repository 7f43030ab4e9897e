"""Tuned configs per device in YAML: the files shipped in this folder (one per device profile)
and the code that reads and writes them. Written atomically, merged by rules that never lose a
better or a measured entry, validated on load, and looked up by the engine and the tuner."""
from __future__ import annotations

import datetime
import math
import os
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import mlx.core as mx
import yaml

import metalforge
from metalforge import files
from metalforge import devices
from metalforge.errors import MetalforgeError
from metalforge.kernels.checks import check
from metalforge.kernels.cost import within_error
from metalforge.kernels.families import FAMILIES, get as get_family

SCHEMA_VERSION = 1
TIMER_KINDS = ("metal", "model")


def user_results_dir() -> Path:
    """Where tuning writes: $METALFORGE_RESULTS, else the XDG data folder (never site-packages)."""
    root = os.environ.get("METALFORGE_RESULTS") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "metalforge", "results")
    return Path(root)


def shipped_path(device: str) -> Path:
    return Path(str(resources.files("metalforge.results"))) / f"{device}.yaml"


def empty(device) -> dict:
    p = devices.get(device)
    return {"schema_version": SCHEMA_VERSION, "device": p.to_dict(), "metalforge_version": metalforge.__version__,
            "mlx_version": mx.__version__, "updated": _now(), "entries": {}}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def load(path) -> dict:
    """Read and validate a results file; every problem names the file and the bad entry."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise MetalforgeError(f"{path}: corrupt results file (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        raise MetalforgeError(f"{path}: corrupt results file ({str(e).splitlines()[0]})") from None
    except IsADirectoryError:
        raise MetalforgeError(f"{path}: is a folder, not a results file") from None
    except OSError as e:
        raise MetalforgeError(f"{path}: cannot read results file ({e.strerror})") from None
    validate(data, str(path))
    return data


@dataclass(frozen=True)
class Entry:
    """One bucket's winner in a results file: the config, its time and how that time was obtained
    (`timer`: "metal" measured, "model" estimated, with the model's error), MLX's time for the
    same job and the study's trial counts. Built from a file's mapping by `from_dict`, which checks every field."""

    shape: dict
    dtype: str
    config: dict
    time_s: float
    timer: str
    baseline_s: float | None = None
    speedup: float | None = None
    model_error: float | None = None   # modelled entries: the model's held-out error (calibration)
    trials: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)   # fields this version does not know: kept, never dropped

    @classmethod
    def from_dict(cls, family: str, key: str, e, at: str) -> "Entry":
        if not isinstance(e, dict):
            raise MetalforgeError(f"{at}: must be a mapping")
        for name in ("config", "time_s", "timer", "dtype", "shape"):
            if name not in e:
                raise MetalforgeError(f"{at}: missing '{name}'")
        if e["timer"] not in TIMER_KINDS:
            raise MetalforgeError(f"{at}: timer must be one of {', '.join(TIMER_KINDS)}, not {e['timer']!r}")
        if not isinstance(e["time_s"], (int, float)) or not math.isfinite(e["time_s"]) or e["time_s"] <= 0:
            raise MetalforgeError(f"{at}: time_s must be a positive number")
        error = e.get("model_error")
        if error is not None and (not isinstance(error, (int, float)) or not 0 <= error < 10):
            raise MetalforgeError(f"{at}: model_error must be a fraction (0.08 for 8%)")
        fam = get_family(family)
        try:
            fam.config(e["config"])
            shape = fam.shape(e["shape"])
        except MetalforgeError as err:
            raise MetalforgeError(f"{at}: {err}") from None
        if fam.bucket_key(shape, e["dtype"]) != key:
            raise MetalforgeError(f"{at}: key does not match its shape and dtype")
        return cls.of(e)

    @classmethod
    def of(cls, e: dict) -> "Entry":
        """An entry from a mapping already checked (by from_dict, or by loading its file)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in e.items() if k in known},
                   extra={k: v for k, v in e.items() if k not in known})

    def evidence(self, family_error: float | None) -> tuple[bool, str]:
        """Whether this entry shows ours faster than MLX, and the words for it: a measured speedup
        above 1, or a modelled one priced against MLX's real kernel by the per-kernel model
        (`baseline_kernel` set: kernels/timing) whose gain exceeds the family's per-kernel error.
        A family without kernel-level data (`family_error` None) is unvalidated: no ratio, no
        evidence; a ratio against a hand description of MLX's kernel (older files) is none either."""
        if not self.speedup:
            return False, "no time for MLX's built-in in this entry"
        if self.timer == "metal":
            return self.speedup > 1.0, f"measured {self.speedup:.2f}x"
        if family_error is None:
            return False, "modelled, unvalidated (no per-kernel measurements of this family)"
        if not self.extra.get("baseline_kernel"):
            return False, "modelled against a description of MLX's kernel, not MLX's real kernel: no evidence"
        if within_error(self.speedup, family_error):
            return False, f"modelled, within model error ({family_error:.0%})"
        return self.speedup > 1.0, f"modelled {self.speedup:.2f}x (model error {family_error:.0%})"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if self.model_error is None:   # measured entries have none: the file says nothing of it
            del out["model_error"]
        return {**{k: v for k, v in out.items() if k != "extra"}, **out["extra"]}

    def beats(self, other: "Entry | None") -> bool:
        """Merge rule: a measured entry beats a modelled one; otherwise the faster wins."""
        if other is None:
            return True
        if self.timer != other.timer:
            return self.timer == "metal"
        return self.time_s < other.time_s


def validate(data, where: str) -> None:
    if not isinstance(data, dict):
        raise MetalforgeError(f"{where}: a results file must be a mapping")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise MetalforgeError(f"{where}: schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise MetalforgeError(f"{where}: 'entries' must be a mapping of family to buckets")
    for fam_name, buckets in entries.items():
        if fam_name not in FAMILIES:
            raise MetalforgeError(f"{where}: entries.{fam_name}: unknown family")
        if not isinstance(buckets, dict):
            raise MetalforgeError(f"{where}: entries.{fam_name} must be a mapping of buckets")
        for key, e in buckets.items():
            Entry.from_dict(fam_name, key, e, f"{where}: entries.{fam_name}[{key!r}]")


def merge(data: dict, family: str, key: str, entry: "Entry | dict") -> bool:
    """Put `entry` into a loaded file's data where it beats the bucket's entry (Entry.beats)."""
    new = entry if isinstance(entry, Entry) else Entry.from_dict(family, key, entry, f"entries.{family}[{key!r}]")
    buckets = data["entries"].setdefault(family, {})
    old = buckets.get(key)
    if new.beats(None if old is None else Entry.of(old)):   # what is in `data` was checked when loaded
        buckets[key] = new.to_dict()
        return True
    return False


def write_atomic(path, data: dict) -> None:
    files.write_atomic(path, yaml.safe_dump(data, sort_keys=False))


def save_entries(path, device, new_entries: list[tuple[str, str, dict]]) -> dict:
    """Merge entries into the file at `path` (creating it) and write it back atomically, under
    the file's lock so that concurrent writers each keep their entries."""
    path = Path(path)
    with files.locked(path):
        data = load(path) if path.exists() else empty(device)
        for family, key, entry in new_entries:
            merge(data, family, key, entry)
        _stamp(data)
        write_atomic(path, data)
    return data


def _stamp(data: dict) -> None:
    data.update(updated=_now(), metalforge_version=metalforge.__version__, mlx_version=mx.__version__)


def merge_files(paths, out) -> tuple[dict, int]:
    """Combine results files (from several machines) into `out` by the merge rules: measured
    beats modelled, faster beats slower. Every input is validated first and all must describe one
    device; an existing `out` takes part in the merge. Returns (data, entries taken from inputs)."""
    out = Path(out)
    loaded = [(Path(p), load(p)) for p in paths]
    if not loaded:
        raise MetalforgeError("results merge: no input files")
    names = {data["device"]["name"] for _, data in loaded}
    if len(names) > 1:
        raise MetalforgeError(f"results merge: the files describe different devices ({', '.join(sorted(names))}); "
                              "merge the files of one device at a time")
    device = names.pop()
    with files.locked(out):
        data = load(out) if out.exists() else empty(device)
        if data["device"]["name"] != device:
            raise MetalforgeError(f"results merge: {out} is for {data['device']['name']}, the inputs for {device}")
        taken = sum(merge(data, fam, key, entry) for _, d in loaded
                    for fam, buckets in d["entries"].items() for key, entry in buckets.items())
        _stamp(data)
        write_atomic(out, data)
    return data, taken


# ---- lookup -------------------------------------------------------------------------------------
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
