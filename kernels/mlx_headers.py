"""MLX's Metal kernel headers, fetched at run time from the `mlx-metal` wheel of the installed MLX
version (PyPI's macOS wheel ships them for extension builders) and kept in the cache. Nothing of
MLX's code is part of metalforge: the headers are a dependency, pinned to the MLX we run with."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import mlx.core as mx

from metalforge.errors import MetalforgeError

KERNELS = "mlx/backend/metal/kernels"   # the headers' folder inside the include root (their own #include paths)
_PREFIX = "mlx/include/"                # where the wheel keeps the include root


def mlx_version() -> str:
    return mx.__version__


def cache_root() -> Path:
    root = os.environ.get("METALFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "metalforge")
    return Path(root) / "mlx-metal"


def download_command(version: str, into: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", f"mlx-metal=={version}", "--no-deps", "--only-binary=:all:",
            "--platform", "macosx_14_0_arm64", "--disable-pip-version-check", "-q", "-d", str(into)]


def include_root(version: str | None = None) -> Path:
    """The folder to put on the include path (it holds `mlx/backend/metal/kernels/`), fetching the
    wheel with pip the first time. A wheel already in the cache's `wheels/` folder (downloaded
    by hand on another machine) is used without the network."""
    version = version or mlx_version()
    root = cache_root()
    target = root / version
    if (target / KERNELS / "utils.h").exists():
        return target
    wheels = root / "wheels"
    wheel = _wheel_in(wheels, version)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(download_command(version, wheels), capture_output=True, text=True)
        wheel = _wheel_in(wheels, version)
        if wheel is None:
            shown = " ".join(download_command(version, wheels)[1:]).replace("-q ", "")
            reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise MetalforgeError(
                f"MLX's Metal kernel headers (mlx-metal {version}) are not cached and pip could not fetch them "
                f"({reason[:160]}): run `python {shown}` where PyPI is reachable")
    _extract(wheel, target)
    return target


def kernels_dir(version: str | None = None) -> Path:
    return include_root(version) / KERNELS


def metallib_names(version: str | None = None) -> frozenset[str]:
    """The function names in the wheel's compiled mlx.metallib: every kernel MLX instantiates, with
    its template arguments in the name (a check on instantiations written outside MLX)."""
    version = version or mlx_version()
    include_root(version)
    wheel = _wheel_in(cache_root() / "wheels", version)
    if wheel is None:
        raise MetalforgeError(f"the mlx-metal {version} wheel is no longer in {cache_root() / 'wheels'}: "
                              f"delete {cache_root() / version} and run again")
    with zipfile.ZipFile(wheel) as z:
        data = z.read("mlx/lib/mlx.metallib")
    return frozenset(m.decode() for m in re.findall(rb"[A-Za-z_][A-Za-z0-9_]{7,}", data))


def _wheel_in(folder: Path, version: str) -> Path | None:
    found = sorted(folder.glob(f"mlx_metal-{version}-*.whl")) if folder.exists() else []
    return found[0] if found else None


def _extract(wheel: Path, target: Path) -> None:
    """The headers of the wheel's include root, into a temporary folder renamed into place (a
    concurrent process either sees all of them or none)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist() if m.startswith(_PREFIX + KERNELS + "/") and m.endswith(".h")]
            if not members:
                raise MetalforgeError(f"{wheel.name} holds no Metal kernel headers under {_PREFIX}{KERNELS}/")
            for m in members:
                out = tmp / m[len(_PREFIX):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(m))
        os.rename(tmp, target)
    except zipfile.BadZipFile:
        raise MetalforgeError(f"{wheel} is not a readable wheel: delete it and run again") from None
    except OSError:
        if not (target / KERNELS / "utils.h").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":   # python -m metalforge.kernels.mlx_headers: fetch now, print the folder
    try:
        print(kernels_dir())
    except MetalforgeError as e:
        sys.exit(f"error: {e}")
