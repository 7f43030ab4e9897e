"""Files that users keep: written atomically with the user's umask, and updated under a lock so
that concurrent writers (tuning workers, several `metalforge tune` runs) lose nothing."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from metalforge.errors import MetalforgeError


def digest(path) -> str:
    """A short fingerprint of a file's bytes: what a fit was made from, to tell when it is stale."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_yaml(path, what: str) -> dict:
    """A YAML file's mapping (empty for an empty file); unreadable or not YAML: one line naming the
    file and `what` it should hold."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise MetalforgeError(f"{path}: cannot read {what} ({' '.join(str(e).split())})") from None


def current_umask() -> int:
    """The process's umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path, suffix: str = ".tmp"):
    """Yield a temporary path beside `path`; when the block ends without error, rename it into
    place, so a reader sees the old file or the new one, never half of one. The file gets the
    permissions a plain `open` would give it (mkstemp's are always 0600)."""
    path = Path(path)
    if path.is_dir():
        raise MetalforgeError(f"{path}: is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as e:
        raise MetalforgeError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path, text: str) -> None:
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def locked(path, timeout_s: float = 120.0):
    """Hold `<path>.lock` while reading, merging and writing `path` back: without it, two
    writers that read the same old file each write their own entry and the later rename wins."""
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path), timeout=timeout_s, mode=0o666 & ~current_umask()):
            yield
    except Timeout:
        raise MetalforgeError(f"{path}: another process has held its lock for over {timeout_s:.0f} s") from None
    except PermissionError as e:
        raise MetalforgeError(f"cannot lock {path}: {e.strerror or e}") from None


def write_section(path, heading: str, section: str) -> None:
    """Replace the `## heading` section of a Markdown file with `section` (which starts with that
    heading), or append it: benchmark scripts keep their part of a shared report current."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def require_one_of(at: str, field: str, value, allowed) -> None:
    """A data file's field checked against the values it may take, in one wording for every file."""
    if value not in allowed:
        raise MetalforgeError(f"{at}: {field} must be one of {', '.join(map(str, allowed))}, got {value!r}")
