"""Shared fixtures. The emulator compiles into a per-session cache so tests never reuse binaries
from an older checkout (its cache is keyed by source anyway; this keeps ~/.cache clean)."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _emulator_cache(tmp_path_factory):
    if "METALFORGE_CACHE" not in os.environ:
        os.environ["METALFORGE_CACHE"] = str(tmp_path_factory.mktemp("metalforge-cache"))
    yield
