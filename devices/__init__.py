"""Apple GPU profiles (one YAML per chip) and detection of the GPU this process runs on.

Every limit the resource checks enforce comes from a profile, so a config is judged against the
chip it will run on rather than against the machine that happens to render it.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources

import mlx.core as mx
import yaml

from metalforge.errors import MetalforgeError, choices


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    display_name: str
    device_name: str
    architecture: str
    gpu_cores: int
    gpu_clock_ghz: float
    memory_bandwidth_gbs: float
    threadgroup_memory_bytes: int = 32768
    max_threads_per_threadgroup: int = 1024
    simd_width: int = 32
    memory_options_gb: tuple = field(default_factory=tuple)
    system_cache_mb: int = 0      # the system level cache a warm re-read can hit (0: not known)

    @property
    def peak_fp32_tflops(self) -> float:
        """128 FP32 lanes per Apple GPU core, one FMA (2 flops) each per clock."""
        return self.gpu_cores * 128 * 2 * self.gpu_clock_ghz / 1000.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory_options_gb"] = list(self.memory_options_gb)
        return d


_ARCH = re.compile(r"applegpu_g(\d+)([a-z])")


@lru_cache(maxsize=1)
def profiles() -> dict[str, DeviceProfile]:
    """All shipped profiles by name, in chip order."""
    out = {}
    folder = resources.files(__name__)
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text())
            data["memory_options_gb"] = tuple(data.get("memory_options_gb", ()))
            out[data["name"]] = DeviceProfile(**data)
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[1])))


def _sort_key(p: DeviceProfile):
    m = _ARCH.match(p.architecture)
    order = {"": 0, "Pro": 1, "Max": 2, "Ultra": 3}
    variant = p.device_name.split()[-1] if len(p.device_name.split()) > 2 else ""
    return (int(m.group(1)) if m else 99, order.get(variant, 9), p.gpu_cores)


def get(name: str | DeviceProfile) -> DeviceProfile:
    """Profile by name (case-insensitive; 'M3 Max 40' and 'm3-max-40' both work)."""
    if isinstance(name, DeviceProfile):
        return name
    key = re.sub(r"[\s_]+", "-", str(name).strip().lower()).removeprefix("apple-")
    all_ = profiles()
    if key in all_:
        return all_[key]
    raise MetalforgeError(f"unknown device '{name}'; valid devices: {choices(all_)}")


def match(info: dict) -> DeviceProfile | None:
    """The profile for a `mx.device_info()` dictionary, or None when it is not an Apple GPU.

    `device_name` picks the chip; where one name covers two GPU-core variants (M3 Max, M4 Max) the
    memory size decides, since Apple sold each memory size with one variant only. An Apple GPU
    we have no profile for gets one built from what MLX reports, with a warning.
    """
    arch = str(info.get("architecture", ""))
    m = _ARCH.match(arch)
    if not m:
        return None
    name = str(info.get("device_name", "")).strip()
    candidates = [p for p in profiles().values() if p.device_name == name]
    if not candidates:
        candidates = [p for p in profiles().values() if p.architecture == arch and not name]
    mem_gb = round(info.get("memory_size", 0) / 2**30) if info.get("memory_size") else None
    if len(candidates) > 1 and mem_gb:
        by_mem = [p for p in candidates if mem_gb in p.memory_options_gb]
        candidates = by_mem or candidates
    if candidates:
        if len(candidates) > 1:
            warnings.warn(
                f"{name}: cannot tell {choices(p.name for p in candidates)} apart from device_info(); "
                f"using {candidates[-1].name} (pass --device to choose)"
            )
        return candidates[-1]
    warnings.warn(
        f"no profile for GPU '{name or arch}'; using limits reported by MLX and Apple's "
        "family-wide limits (32 KB threadgroup memory, 1024 threads, SIMD width 32)"
    )
    gen = int(m.group(1))
    same_gen = [p for p in profiles().values() if p.architecture.startswith(f"applegpu_g{gen}")]
    bandwidth = max((p.memory_bandwidth_gbs for p in same_gen), default=100.0)
    return DeviceProfile(
        name=re.sub(r"\W+", "-", (name or arch).lower()).strip("-"),
        display_name=name or arch,
        device_name=name,
        architecture=arch,
        gpu_cores=min((p.gpu_cores for p in same_gen), default=8),
        gpu_clock_ghz=max((p.gpu_clock_ghz for p in same_gen), default=1.4),
        memory_bandwidth_gbs=bandwidth,
        threadgroup_memory_bytes=int(info.get("max_threadgroup_memory_length", 32768)),
    )


def device_info() -> dict:
    """MLX's device description (`mx.device_info()` from 0.32, `mx.metal.device_info()` before)."""
    fn = getattr(mx, "device_info", None) or getattr(mx.metal, "device_info", None)
    try:
        return dict(fn()) if fn else {}
    except RuntimeError:
        return {}


def detect() -> DeviceProfile | None:
    """The profile of this machine's Apple GPU, or None off a Mac (commands then ask for --device)."""
    if not mx.metal.is_available():
        return None
    return match(device_info())


def resolve(name: str | DeviceProfile | None) -> DeviceProfile:
    """--device handling: a name, 'auto' (detect), or an error listing the valid names."""
    if name is None or (isinstance(name, str) and name.lower() == "auto"):
        found = detect()
        if found is None:
            raise MetalforgeError(
                "no Apple GPU detected on this machine; pass --device NAME, one of: "
                + choices(profiles())
            )
        return found
    return get(name)
