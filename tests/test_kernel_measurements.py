"""Published per-kernel timings (benchmarks/data/kernel_measurements.yaml): the shipped file's
schema and sources, and the loader's refusals (no source, no quote, a figure not in its quote or
not the recorded seconds, a physically impossible point)."""
import dataclasses
import re

import pytest
import yaml

from metalforge.errors import MetalforgeError
from metalforge.kernels import kernel_measurements as km


@pytest.fixture(scope="module")
def points():
    return km.load()


def test_the_shipped_file_has_40_sourced_points_on_5_chips(points):
    raw = yaml.safe_load(km.DATA.read_text())["points"]
    usable = km.usable(points)
    assert len(points) == len(raw) and len(usable) >= 40
    assert len({p.chip for p in usable}) >= 5
    assert len({p.profile for p in usable if p.profile}) >= 5      # chips our device profiles price
    assert {p.library for p in usable} == {"mlx", "llama.cpp"}
    for p in points:
        # a thread (issue, pull request) or a file pinned to a commit (a write-up that cannot change)
        assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+/((pull|issues)/\d+|blob/[0-9a-f]{40}/[\w./-]+)",
                            p.source), p.source
        assert len(p.quote) >= 10 and p.figure in p.quote
        assert p.seconds == pytest.approx(km.figure_value(p.figure) * km.UNITS[p.unit] / p.calls, rel=1e-12)
        assert 1e-7 < p.seconds < 10.0     # a 32k-token prefill on a 10-core M4 takes 3.3 s
        assert (p.gpu_cores and p.dtype) or p.inferred
    # no point twice
    assert len({(p.source, p.quote, p.kernel, p.shape) for p in points}) == len(points)


def test_every_point_says_what_its_clock_includes(points):
    """The timer follows the timing text: a GPU capture is kernel time, test-backend-ops' us/run and
    calls queued per eval are amortised, a wall clock around each eval is per call."""
    assert {p.timer for p in points} <= set(km.TIMERS)
    for p in points:
        if "GPU time" in p.timing:
            assert p.timer == "gpu", p.timing
        elif "test-backend-ops" in p.timing or "per eval" in p.timing or "chained" in p.timing:
            assert p.timer == "host_amortised", p.timing
        elif "around mx.eval" in p.timing:
            assert p.timer == "host_per_call", p.timing
    assert {p.timer for p in km.usable(points)} == set(km.TIMERS)


def test_a_call_carries_its_share_of_the_host_round_trips(points):
    """mlx's sdpa_bench.py (PR 1610) evaluates 8 chained attentions per timed iteration: each carries
    1/8 of a wait; a wall clock around every eval, one; test-backend-ops (its graph's runs per wait
    not stated), none counted."""
    bench = next(p for p in points if "pull/1610" in p.source)
    per_call = next(p for p in points if p.timer == "host_per_call")
    backend_ops = next(p for p in points if "test-backend-ops" in p.timing and p.timer == "host_amortised")
    assert bench.calls_per_wait == 8 and bench.host_waits == 1 / 8
    assert per_call.calls_per_wait is None and per_call.host_waits == 1.0
    assert backend_ops.calls_per_wait is None and backend_ops.host_waits == 0.0
    assert all(p.calls_per_wait is None for p in points if p.timer != "host_amortised")


def test_a_read_faster_than_dram_is_called_cache_hot(points):
    """M3 Pro, llama.cpp q4_K mat-vec of 1024 x 5120: 1024 * 5120 * 4.5 / 8 = 2,949,120 bytes of
    weights in 15.37 us is 192 GB/s, above the chip's 150 GB/s: warm weights in the system cache."""
    p = next(p for p in points if p.profile == "m3-pro" and p.get("N") == 1024 and p.get("M") == 1
             and p.get("bits") == 4.5)
    assert p.min_bytes() == 2_949_120 and p.seconds == 15.37e-6
    assert "cache-hot" in p.timing and p.impossibility() is None
    plain = dataclasses.replace(p, timing="warm")
    assert plain.impossibility() == ("reads 192 GB/s, above the chip's 150 GB/s DRAM, "
                                     "and the timing does not say cache-hot")


def test_more_flops_than_the_chip_has_is_impossible(points):
    """M3 Max, steel attention at 4096 tokens, D 64, 32 heads: 4 * 32 * 4096^2 * 64 = 137.4 GFLOP.
    Read as 3.747 ms a call (not 3.747 s for 320 calls) it would be 36.7 TFLOP/s on a 14.1 TFLOP/s chip."""
    p = next(p for p in points if p.profile == "m3-max-40" and p.get("L") == 4096)
    assert p.min_flops() == 4 * 32 * 4096 ** 2 * 64
    assert p.impossibility() is None
    misread = dataclasses.replace(p, seconds=3.747e-3)
    assert misread.impossibility() == "36.7 TFLOP/s is above the 40-core chip's peak of 14.1"


def _write(tmp_path, mutate):
    data = yaml.safe_load(km.DATA.read_text())
    mutate(data["points"][2])
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p.pop("source"), r"points\[2\]: missing source"),
    (lambda p: p.update(source="a forum post"), "source must be a URL"),
    (lambda p: p.pop("quote"), r"points\[2\]: missing quote"),
    (lambda p: p.update(quote=""), r"points\[2\]: missing quote"),
    (lambda p: p.update(figure="10.887"), "figure '10.887' is not in the quoted line"),
    (lambda p: p.update(seconds=0.010887), "is 0.010888 s, not the 0.010887 s recorded"),
    (lambda p: p.update(shape={"M": 8, "rows": 3}), "unknown shape fields rows"),
    (lambda p: p.pop("inferred"), "gpu_cores unknown and no `inferred` note says why"),
    (lambda p: p.update(dtype=None, gpu_cores=40, inferred=""), "dtype unknown and no `inferred` note says why"),
    (lambda p: p.update(unit="min"), "unit must be one of s, ms, us"),
    (lambda p: p.pop("timer"), r"points\[2\]: missing timer"),
    (lambda p: p.update(timer="wall clock"), "timer must be one of host_per_call, host_amortised, gpu, got 'wall clock'"),
    (lambda p: p.update(timer="host_per_call", calls_per_wait=20), "calls_per_wait 20 is for a host_amortised point"),
    (lambda p: p.update(timer="host_amortised", calls_per_wait=1), "calls_per_wait 1 is for a host_amortised point: "
                                                                   "a whole number of calls, 2 or more"),
])
def test_the_loader_refuses_a_point_it_cannot_trace(tmp_path, mutate, message):
    with pytest.raises(MetalforgeError, match=message):
        km.load(_write(tmp_path, mutate))


def test_an_impossible_point_loads_only_when_excluded_with_the_reason(tmp_path):
    def fast(p):
        p.update(profile="m3-max-40", gpu_cores=40, shape={"M": 8, "N": 16384, "K": 16384},
                 unit="us", seconds=10.888e-6)      # the quoted 10.888 read as microseconds
    with pytest.raises(MetalforgeError, match=r"points\[2\]: physically impossible \(394\.5 TFLOP/s is above "
                                              r"the 40-core chip's peak of 14\.1\)"):
        km.load(_write(tmp_path, fast))

    def excluded(p):
        fast(p)
        p["excluded"] = "10.888 us would be 394.5 TFLOP/s"
    loaded = km.load(_write(tmp_path, excluded))
    assert loaded[2].excluded and loaded[2] not in km.usable(loaded)


def test_every_chip_in_the_data_has_a_device_profile(points):
    """The fit prices a point on its chip's profile: no chip of the data lacks one (the M5s' came
    with their sources in the profile's comments)."""
    from metalforge import devices
    names = {p.device_name for p in devices.profiles().values()}
    assert {p.chip for p in points} <= names, {p.chip for p in points} - names
    for p in points:
        if p.profile:
            assert devices.get(p.profile).device_name == p.chip, (p.profile, p.chip)


def test_an_unreadable_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "k.yaml"
    bad.write_text("points: [1, 2\n")
    with pytest.raises(MetalforgeError) as e:
        km.load(bad)
    assert str(e.value).startswith(f"{bad}: cannot read kernel measurements (while parsing a flow sequence")
    assert "\n" not in str(e.value)


def test_a_figure_with_a_thousands_separator_is_its_number(tmp_path):
    """Tables print '1,029.3 us': the figure stays as quoted, its seconds are 1029.3 us."""
    def separated(p):
        p.update(figure="1,029.3", unit="us", seconds=1029.3e-6, quote="| Vocabulary head | 1,029.3 us |")
    p = km.load(_write(tmp_path, separated))[2]
    assert p.figure == "1,029.3" and km.figure_value(p.figure) == 1029.3 and p.seconds == 1029.3e-6

    def misread(p):
        separated(p)
        p["seconds"] = 1.0293e-6                # the separator read as a decimal point
    with pytest.raises(MetalforgeError, match=r"figure 1,029.3 us over 1 call\(s\) is 0.0010293 s, not the 1.0293e-06 s"):
        km.load(_write(tmp_path, misread))
