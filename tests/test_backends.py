"""Which implementation runs our kernels: Metal on a Mac, the emulator elsewhere, overridable."""
import mlx.core as mx
import pytest

from metalforge.errors import MetalforgeError
from metalforge.kernels import backends


def test_auto_picks_metal_only_where_metal_exists(monkeypatch):
    monkeypatch.delenv("METALFORGE_BACKEND", raising=False)
    assert backends.resolve() == ("metal" if mx.metal.is_available() else "emulator")
    assert backends.resolve("auto") == backends.resolve()


def test_argument_and_environment_override(monkeypatch):
    monkeypatch.setenv("METALFORGE_BACKEND", "emulator")
    assert backends.resolve() == "emulator"
    assert backends.resolve("EMULATOR") == "emulator"
    monkeypatch.setenv("METALFORGE_BACKEND", "vulkan")
    with pytest.raises(MetalforgeError, match="unknown backend 'vulkan'; valid backends: auto, metal, emulator"):
        backends.resolve()


@pytest.mark.skipif(mx.metal.is_available(), reason="this machine has Metal")
def test_metal_off_a_mac_is_a_clear_error():
    with pytest.raises(MetalforgeError, match="needs a Mac with Metal"):
        backends.resolve("metal")


def test_one_vocabulary_for_kernels_and_the_engine(monkeypatch):
    """`mlx` (MLX's built-ins) is a choice only where a caller can use MLX's ops instead of ours;
    both honour METALFORGE_BACKEND."""
    monkeypatch.delenv("METALFORGE_BACKEND", raising=False)
    assert backends.resolve(allow_mlx=True) == ("metal" if mx.metal.is_available() else "mlx")
    assert backends.resolve("mlx", allow_mlx=True) == "mlx"
    with pytest.raises(MetalforgeError, match="unknown backend 'mlx'; valid backends: auto, metal, emulator$"):
        backends.resolve("mlx")
    monkeypatch.setenv("METALFORGE_BACKEND", "emulator")
    assert backends.resolve(allow_mlx=True) == "emulator"
