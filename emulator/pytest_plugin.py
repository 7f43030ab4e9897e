"""pytest fixtures (registered through the pytest11 entry point):

- `metal_emulator`: `mx.fast.metal_kernel` is the emulator for the test.
- `metal_emulator_available`: the same, and `mx.metal.is_available()` answers True.
"""
import pytest

from .patch import patch


@pytest.fixture
def metal_emulator():
    with patch() as kernel:
        yield kernel


@pytest.fixture
def metal_emulator_available():
    with patch(metal_available=True) as kernel:
        yield kernel
