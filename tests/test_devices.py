"""Device profiles and detection from recorded `mx.device_info()` dictionaries."""

import mlx.core as mx
import pytest

from metalforge.errors import MetalforgeError
from metalforge import devices

GB = 2**30


def test_every_chip_variant_has_a_profile_with_apple_limits():
    names = set(devices.profiles())
    for chip in ("m1", "m2", "m3", "m4"):
        assert {chip, f"{chip}-pro", f"{chip}-max" if chip in ("m1", "m2") else f"{chip}-max-{'30' if chip == 'm3' else '32'}"} <= names
    assert {"m3-max-40", "m4-max-40", "m1-ultra", "m2-ultra", "m3-ultra"} <= names
    for p in devices.profiles().values():
        assert p.threadgroup_memory_bytes == 32768
        assert p.max_threads_per_threadgroup == 1024
        assert p.simd_width == 32
    # published bandwidths (shared/reference/apple-gpus.md)
    assert devices.get("m1").memory_bandwidth_gbs == 68.25
    assert devices.get("m3-max-30").memory_bandwidth_gbs == 300
    assert devices.get("m4-max-40").memory_bandwidth_gbs == 546


def test_peak_flops_from_cores_and_clock():
    m1 = devices.get("m1")
    assert m1.peak_fp32_tflops == pytest.approx(8 * 128 * 2 * 1.278 / 1000)


@pytest.mark.parametrize("info, expected", [
    ({"architecture": "applegpu_g13g", "device_name": "Apple M1", "memory_size": 16 * GB}, "m1"),
    ({"architecture": "applegpu_g14s", "device_name": "Apple M2 Max", "memory_size": 96 * GB}, "m2-max"),
    ({"architecture": "applegpu_g15s", "device_name": "Apple M3 Max", "memory_size": 36 * GB}, "m3-max-30"),
    ({"architecture": "applegpu_g15s", "device_name": "Apple M3 Max", "memory_size": 128 * GB}, "m3-max-40"),
    ({"architecture": "applegpu_g16s", "device_name": "Apple M4 Max", "memory_size": 36 * GB}, "m4-max-32"),
    ({"architecture": "applegpu_g16s", "device_name": "Apple M4 Pro", "memory_size": 48 * GB}, "m4-pro"),
    ({"architecture": "applegpu_g17g", "device_name": "Apple M5", "memory_size": 24 * GB}, "m5"),
    ({"architecture": "applegpu_g17s", "device_name": "Apple M5 Max", "memory_size": 36 * GB}, "m5-max-32"),
    ({"architecture": "applegpu_g17s", "device_name": "Apple M5 Max", "memory_size": 128 * GB}, "m5-max-40"),
])
def test_match_recorded_device_info(info, expected):
    assert devices.match(info).name == expected


def test_unknown_apple_gpu_gets_a_profile_and_a_warning():
    info = {"architecture": "applegpu_g18g", "device_name": "Apple M6", "memory_size": 32 * GB}
    with pytest.warns(UserWarning, match="no profile"):
        p = devices.match(info)
    assert p.display_name == "Apple M6"
    assert p.threadgroup_memory_bytes == 32768 and p.simd_width == 32


def test_not_an_apple_gpu():
    assert devices.match({"architecture": "x86_64", "device_name": "Intel(R) Xeon(R)"}) is None
    assert devices.match(devices.device_info()) is None or mx.metal.is_available()


def test_detect_off_a_mac_asks_for_a_device():
    if mx.metal.is_available():
        pytest.skip("this machine has Metal")
    assert devices.detect() is None
    with pytest.raises(MetalforgeError, match="pass --device NAME.*m3-max-40"):
        devices.resolve("auto")


def test_names_are_forgiving_and_errors_list_choices():
    assert devices.get("M3 Max 40").name == "m3-max-40"
    assert devices.get("Apple M2 Pro").name == "m2-pro"
    with pytest.raises(MetalforgeError, match="unknown device 'm9'.*valid devices: m1, m1-pro"):
        devices.get("m9")
