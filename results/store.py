"""Results files on disk: where they live, reading and validating them, merging entries by the
rules (measured beats modelled, faster beats slower), and writing them atomically under a lock."""
from __future__ import annotations

import datetime
import os
from importlib import resources
from pathlib import Path

import mlx.core as mx
import yaml

import metalforge
from metalforge import devices, files
from metalforge.errors import MetalforgeError
from metalforge.kernels.families import FAMILIES
from metalforge.results.entry import Entry

SCHEMA_VERSION = 1


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


def validate(data, where: str) -> None:
    if not isinstance(data, dict):
        raise MetalforgeError(f"{where}: a results file must be a mapping")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise MetalforgeError(f"{where}: schema_version {data.get('schema_version')!r} is not {SCHEMA_VERSION}")
    device = data.get("device")
    if not isinstance(device, dict) or not isinstance(device.get("name"), str):
        raise MetalforgeError(f"{where}: 'device' must be a mapping with the device's name, not {device!r}"[:300])
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
