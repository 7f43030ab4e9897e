"""Jinja rendering of the MSL templates: strict (a missing variable is an error, not an empty string)."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

import jinja2


@lru_cache(maxsize=8)
def environment(folder: str | None = None) -> jinja2.Environment:
    """Templates from `folder` (a family's own), then the package's templates/ (shared macros)."""
    shipped = str(resources.files("metalforge.templates"))
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([folder, shipped] if folder else [shipped]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, folder: str | None = None, **values) -> str:
    return environment(folder).get_template(template).render(**values)


def kernel_name(family: str, source: str) -> str:
    """A name unique to the source: MLX caches compiled kernels by name, so a changed source must
    never reuse an old name (a known stale-cache pitfall of mx.fast.metal_kernel)."""
    return f"mf_{family}_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
