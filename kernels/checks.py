"""Resource checks: is a config valid for a shape on a device, decided before anything compiles.

Every violation carries its numbers, worded as Metal words it where Metal has a message, so a
user sees the same sentence here that a Mac would print at dispatch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from metalforge import devices
from metalforge.kernels import dtypes
from metalforge.kernels.families import get as get_family

# The register rule. All threads of a threadgroup live on one GPU core, whose register file holds
# about 208 KB on Apple 7 and 8 (M1, M2: philipturner/metal-benchmarks, "On-Chip Memory", 384 to
# 3,072 threads a core) and which a lane addresses as at most 128 32-bit registers (dougallj/applegpu,
# the G13 ISA; past 128 the compiler spills to memory instead). So a pipeline whose lanes hold R
# registers gets maxTotalThreadsPerThreadgroup <= 208 KB / (4 bytes x min(R, 128)), in whole
# SIMD-groups, which is how Apple's pipelines report less than 1,024 (896 was seen on an M2 Ultra).
# R is a family's count of the values its arrays keep (Geometry.registers) plus REGISTER_OVERHEAD
# for the scalars beside them (indices, pointers, loop counters, softmax state): an estimate meant
# to err high, so a config we ship or pick is not refused at dispatch. MLX avoids the question by
# keeping its 1,024-thread kernels (sdpa_vector) at a few values a lane.
REGISTER_FILE_BYTES = 208 * 1024
MAX_REGISTERS = 128
REGISTER_OVERHEAD = 24


def max_threads_for_registers(registers: int, device_max: int) -> int:
    """The most threads a threadgroup of lanes holding `registers` values may have (the rule above)."""
    held = min(registers + REGISTER_OVERHEAD, MAX_REGISTERS)
    return min(device_max, REGISTER_FILE_BYTES // (4 * held) // 32 * 32)


@dataclass(frozen=True)
class Violation:
    kind: str       # threadgroup_memory | threads | simd_width | shape
    message: str

    def __str__(self) -> str:
        return self.message


def check(family, config: dict, shape, dtype, device) -> list[Violation]:
    """Every reason `config` cannot run `shape` in `dtype` on `device` (empty when valid)."""
    fam = get_family(family) if isinstance(family, str) else family
    dev = devices.get(device)
    dt = dtypes.get(dtype)
    shape = fam.shape(shape)
    config = fam.config(config)
    out = []
    for g in fam.geometry(config, shape, dt):
        if g.threadgroup_memory_bytes > dev.threadgroup_memory_bytes:
            out.append(Violation("threadgroup_memory",
                                 f"Threadgroup memory size ({g.threadgroup_memory_bytes}) exceeds the maximum "
                                 f"threadgroup memory allowed ({dev.threadgroup_memory_bytes})"))
        limit = max_threads_for_registers(g.registers, dev.max_threads_per_threadgroup)
        if g.threads > limit:
            why = "" if limit == dev.max_threads_per_threadgroup else \
                f" for lanes holding about {g.registers + REGISTER_OVERHEAD} registers"
            out.append(Violation("threads",
                                 f"Thread group size ({g.threads}) is greater than the maximum allowed threads per "
                                 f"threadgroup ({limit}){why}"))
        if g.threads % dev.simd_width:
            out.append(Violation("simd_width",
                                 f"threads per threadgroup ({g.threads}) is not a multiple of the SIMD width "
                                 f"({dev.simd_width})"))
    out += [Violation("shape", m) for m in fam.config_problems(config, shape, dt)]
    return list(dict.fromkeys(out))   # a limit two launches break is one reason


@dataclass
class SpaceReport:
    total: int
    valid: int
    reasons: Counter   # distinct reason (numbers folded) -> count of configs

    def lines(self) -> list[str]:
        out = [f"{self.valid} of {self.total} configs are valid"]
        for reason, n in self.reasons.most_common():
            out.append(f"  {n:6d} invalid: {reason}")
        return out


def check_space(family, shape, dtype, device) -> tuple[list[dict], SpaceReport]:
    """Check every config of the family's space; returns the valid ones and a summary."""
    fam = get_family(family) if isinstance(family, str) else family
    shape = fam.shape(shape)
    valid, reasons, total = [], Counter(), 0
    for config in fam.space():
        total += 1
        problems = check(fam, config, shape, dtype, device)
        if problems:
            for p in problems:
                reasons[_fold(p)] += 1
        else:
            valid.append(config)
    return valid, SpaceReport(total, len(valid), reasons)


def _fold(v: Violation) -> str:
    """One line per distinct reason: byte counts vary per config, so group by kind and limit."""
    if v.kind == "threadgroup_memory":
        return "threadgroup memory exceeds the maximum threadgroup memory allowed (" + v.message.rsplit("(", 1)[1]
    if v.kind == "threads":
        return "thread group size exceeds the maximum allowed threads per threadgroup (" + v.message.split("threadgroup (", 1)[1]
    return v.message
