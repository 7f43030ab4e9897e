"""Published per-kernel timings on Apple GPUs (benchmarks/data/kernel_measurements.yaml), checked.

A per-kernel time model can only be held to measurements whose provenance can be read again, so
the loader refuses a point without its source URL and the verbatim line its figure is quoted
from, checks that the figure is in that line and converts to the point's seconds, and refuses a
point that is physically impossible on its chip unless the file marks it excluded (with the
reason): more arithmetic per second than the chip's peak, or a read faster than its DRAM that the
point's timing does not call cache-hot (weights re-read every run stay in the system cache).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from metalforge import devices, files
from metalforge.errors import MetalforgeError
from metalforge.kernels import dtypes

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "kernel_measurements.yaml"
SHAPE_FIELDS = ("M", "N", "K", "bits", "group_size", "B", "Hq", "Hkv", "S", "D", "L")
UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
LIBRARIES = ("mlx", "llama.cpp")
# What a figure's clock includes besides the kernel: the host's per-call round trip (launch, command
# buffer commit, wait), a share of it (many calls queued per wait), or nothing (GPU timestamps).
TIMERS = ("host_per_call", "host_amortised", "gpu")
REQUIRED = ("chip", "gpu_cores", "library", "kernel", "shape", "dtype", "figure", "unit", "seconds",
            "timing", "timer", "source", "quote")


@dataclass(frozen=True)
class KernelPoint:
    """One published kernel timing (the data file's header describes the fields)."""
    chip: str
    gpu_cores: int | None
    library: str
    kernel: str
    shape: tuple            # ((field, value), ...) in SHAPE_FIELDS order
    dtype: str | None       # None where the source does not say (then `inferred` says so)
    figure: str
    unit: str
    seconds: float
    timing: str
    timer: str              # one of TIMERS
    source: str
    quote: str
    profile: str | None = None
    calls: int = 1
    calls_per_wait: int | None = None   # host_amortised: kernel calls queued per host wait, where stated
    date: str = ""
    software: str = ""
    inferred: str = ""
    excluded: str = ""

    def get(self, field: str):
        return dict(self.shape).get(field)

    @property
    def host_waits(self) -> float:
        """The host's round trips (commit, wait, wake-up) a call's time carries: one timed per call,
        1 / calls_per_wait queued per wait. ASSUMED 0 where the source does not say how many were
        queued (test-backend-ops' graphs hold hundreds to thousands of runs) and on a GPU clock."""
        if self.timer == "host_per_call":
            return 1.0
        return 1.0 / self.calls_per_wait if self.calls_per_wait else 0.0

    @property
    def device(self):
        """Our profile of the chip (with the point's core count where stated), or None."""
        if not self.profile:
            return None
        base = devices.get(self.profile)
        return dataclasses.replace(base, gpu_cores=self.gpu_cores) if self.gpu_cores else base

    def min_bytes(self) -> float | None:
        """Bytes the kernel must read at least: the weights of a matrix product, K and V of attention."""
        if all(self.get(f) for f in ("N", "K", "bits")):
            return self.get("N") * self.get("K") * self.get("bits") / 8
        if self.dtype and all(self.get(f) for f in ("B", "Hkv", "S", "D")):
            return 2 * self.get("B") * self.get("Hkv") * self.get("S") * self.get("D") * dtypes.get(self.dtype).size
        return None

    def min_flops(self) -> float | None:
        """Floating-point operations the kernel must do at least (causal attention: half the square)."""
        if all(self.get(f) for f in ("M", "N", "K")):
            return 2.0 * self.get("M") * self.get("N") * self.get("K")
        if all(self.get(f) for f in ("B", "Hq", "L", "S", "D")):
            full = 4.0 * self.get("B") * self.get("Hq") * self.get("L") * self.get("S") * self.get("D")
            return full / 2 if "causal" in self.kernel else full
        return None

    def impossibility(self) -> str | None:
        """Why the point cannot be right for its chip, or None (chips without a profile: unchecked)."""
        dev = self.device
        if dev is None:
            return None
        flops = self.min_flops()
        if flops and flops / self.seconds > dev.peak_fp32_tflops * 1e12:
            return (f"{flops / self.seconds / 1e12:.1f} TFLOP/s is above the {dev.gpu_cores}-core chip's "
                    f"peak of {dev.peak_fp32_tflops:.1f}")
        reads = self.min_bytes()
        if reads and reads / self.seconds > dev.memory_bandwidth_gbs * 1e9 and "cache-hot" not in self.timing:
            return (f"reads {reads / self.seconds / 1e9:.0f} GB/s, above the chip's "
                    f"{dev.memory_bandwidth_gbs:.0f} GB/s DRAM, and the timing does not say cache-hot")
        return None


def load(path=DATA) -> list[KernelPoint]:
    """Every point of the file, checked (excluded points included; `usable` drops them)."""
    data = files.read_yaml(path, "kernel measurements")
    points = []
    for i, raw in enumerate(data.get("points") or []):
        at = f"{path}: points[{i}]"
        missing = [k for k in REQUIRED if k not in raw or raw[k] in ("", None) and k not in ("gpu_cores", "dtype")]
        if missing:
            raise MetalforgeError(f"{at}: missing {', '.join(missing)}")
        points.append(_point(raw, at))
    return points


def figure_value(figure: str) -> float:
    """The number a quoted figure states: '1,029.3' (a thousands separator, as tables print it) is 1029.3."""
    return float(figure.replace(",", ""))


def usable(points: list[KernelPoint]) -> list[KernelPoint]:
    return [p for p in points if not p.excluded]


def _point(raw: dict, at: str) -> KernelPoint:
    if not str(raw["source"]).startswith("https://"):
        raise MetalforgeError(f"{at}: source must be a URL, got {raw['source']!r}")
    for field, allowed in (("library", LIBRARIES), ("timer", TIMERS), ("unit", UNITS)):
        files.require_one_of(at, field, raw[field], allowed)
    if raw["dtype"] is not None:
        dtypes.get(raw["dtype"])
    unknown = sorted(set(raw["shape"]) - set(SHAPE_FIELDS))
    if unknown:
        raise MetalforgeError(f"{at}: unknown shape fields {', '.join(unknown)}; valid: {', '.join(SHAPE_FIELDS)}")
    figure, quote = str(raw["figure"]), str(raw["quote"])
    if figure not in quote:
        raise MetalforgeError(f"{at}: figure {figure!r} is not in the quoted line")
    calls = int(raw.get("calls", 1))
    per_wait = raw.get("calls_per_wait")
    if per_wait is not None and (raw["timer"] != "host_amortised" or not isinstance(per_wait, int) or per_wait < 2):
        raise MetalforgeError(f"{at}: calls_per_wait {per_wait!r} is for a host_amortised point: "
                              "a whole number of calls, 2 or more, queued per host wait")
    expected = figure_value(figure) * UNITS[raw["unit"]] / calls
    if not math.isclose(expected, float(raw["seconds"]), rel_tol=1e-9):
        raise MetalforgeError(f"{at}: figure {figure} {raw['unit']} over {calls} call(s) is {expected:g} s, "
                              f"not the {raw['seconds']} s recorded")
    for unknown in ("gpu_cores", "dtype"):
        if raw[unknown] is None and not raw.get("inferred"):
            raise MetalforgeError(f"{at}: {unknown} unknown and no `inferred` note says why")
    if raw.get("profile"):
        devices.get(raw["profile"])
    point = KernelPoint(
        chip=str(raw["chip"]), gpu_cores=raw["gpu_cores"], library=raw["library"], kernel=str(raw["kernel"]),
        shape=tuple((f, raw["shape"][f]) for f in SHAPE_FIELDS if f in raw["shape"]),
        dtype=raw["dtype"], figure=figure, unit=raw["unit"], seconds=float(raw["seconds"]),
        timing=str(raw["timing"]), timer=raw["timer"], source=str(raw["source"]), quote=quote, profile=raw.get("profile"),
        calls=calls, calls_per_wait=per_wait, date=str(raw.get("date", "")), software=str(raw.get("software", "")),
        inferred=str(raw.get("inferred", "")), excluded=str(raw.get("excluded", "")))
    why = point.impossibility()
    if why and not point.excluded:
        raise MetalforgeError(f"{at}: physically impossible ({why}); mark it excluded with the reason")
    return point
