"""Jinja rendering of the MSL templates: strict (a missing variable is an error, not an empty string)."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

import jinja2


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    folder = resources.files("metalforge.templates")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **values) -> str:
    return environment().get_template(template).render(**values)


def kernel_name(family: str, source: str) -> str:
    """A name unique to the source: MLX caches compiled kernels by name, so a changed source must
    never reuse an old name (a known stale-cache pitfall of mx.fast.metal_kernel)."""
    return f"mf_{family}_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
