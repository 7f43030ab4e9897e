"""A dispatch's trace counters at a real shape, from traces at small proxy shapes, cached on disk.

Trace mode counts as the kernel runs, so a model's full shape traces in the time its emulation
takes: 10-25 s for an 8B model's qmv or 4,096-key decode attention on 2 cores, about 90 s at
32,768 keys, and far longer for prefill and qmm, whose emulated multiply-accumulates dominate.
Proxies stay: the model prices hundreds of jobs, and a proxy's few small traces cost seconds.

A job is traced at a proxy shape (each scaled axis cut to a small value) and twice more per scaled axis, with that axis at 2x and 4x the proxy; each counter is taken as a product over axes
of a quadratic in the axis's factor f through those three traces: counter(real) = counter(proxy) *
prod(q_a(f_a) / counter(proxy)). So a counter that does not grow with an axis (x's footprint with
N, pass 2 of the 2-pass attention with the keys) keeps its value, one with a fixed and a per-key
part grows affinely, a square prefill's query x key tiles quadratically. Axes scaled together
(query and KV heads, a prefill's queries and cached keys) are one group. Exact where a counter is
such a product over whole tiles on the same code path: a family's proxy (Family.trace_proxy, built
by `cut`) holds whole tiles of the config it traces at all three points (a 128-query tile traced
over 64 queries scaled one half-empty tile 64x), and the real shape is whole tiles too;
tests/test_trace_model.py and tests/test_scaled_work.py check scaled counters against traces at
the real shape and against Family.work.

Traces are cached under METALFORGE_CACHE/traces by a key of the job (kernel source or MLX's
host names and version, shape, dtype), so tests and calibration do not re-run them.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import reduce
from typing import Callable

from metalforge import files
from metalforge.emulator.compiler import cache_dir
from metalforge.emulator.trace import Dispatch

TRACE_SCHEMA = 4   # bump when the features or their meaning change: old cache entries are ignored


@dataclass(frozen=True)
class Counted:
    """One dispatch at the real shape: its kernel, threadgroup size and scaled counters."""
    kernel: str
    threadgroup: tuple
    threadgroup_memory_bytes: int
    features: dict            # counter -> count (device traffic per buffer: "dram_bytes/w"); floats once scaled

    def total(self, name: str) -> float:
        """A feature summed over buffers where it is counted per buffer."""
        return sum(v for k, v in self.features.items() if k == name or k.startswith(name + "/"))

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "threadgroup": list(self.threadgroup),
                "threadgroup_memory_bytes": self.threadgroup_memory_bytes, "features": dict(self.features)}


def features(d: Dispatch) -> Counted:
    """The counters the price reads, totalled over the dispatch (barriers over its threadgroups),
    device traffic per buffer (a buffer's footprint scales with its own axes: x's not with N)."""
    t = d.trace
    per_buffer = {}
    for name, b in t.device.items():
        per_buffer[f"dram_bytes/{name}"] = b.footprint_bytes
        per_buffer[f"sector_bytes/{name}"] = 32 * b.sectors[32]
    return Counted(d.kernel, tuple(d.threadgroup), t.threadgroup_memory_bytes, {
        **per_buffer,
        "threadgroup_passes": t.threadgroup_instructions + t.bank_conflicts,
        "fragment_ops": t.matrix_loads + t.matrix_stores,
        "matrix_multiplies": t.matrix_multiplies,
        "barriers": t.barriers * t.threadgroups,
        "simd_functions": t.simd_functions,
        "simd_fences": t.simd_fences,
        "threadgroups": t.threadgroups,
        "threads": t.threads})


def _cache_path(key: str):
    path = cache_dir().parent / "traces"
    path.mkdir(parents=True, exist_ok=True)
    return path / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def traced(key: str, shape: dict, run: Callable[[dict], list[Dispatch]]) -> list[Counted]:
    """`run(shape)`'s dispatches as counters, from the disk cache when this job was traced before."""
    path = _cache_path(json.dumps([TRACE_SCHEMA, key, sorted(shape.items())]))
    if path.exists():
        return [Counted(d["kernel"], tuple(d["threadgroup"]), d["threadgroup_memory_bytes"], d["features"])
                for d in json.loads(path.read_text())]
    out = [features(d) for d in run(dict(shape))]
    files.write_atomic(path, json.dumps([c.as_dict() for c in out]))
    return out


# a group whose real values are not whole units is traced at the real values up to this many times
# the smallest proxy (exact, at no more than the three proxies' traces cost: 1 + 2 + 4 along a
# linear axis, 1 + 4 + 16 along a prompt's square), scaled from whole units past it (approximate)
DIRECT_UP_TO = 4


def cut(fields: dict, units: dict[str, int], least: dict[str, int] | None = None) -> dict:
    """`fields` with one group's axes (`units`: axis -> the unit its counters are periodic in:
    a whole tile, a sector's rows) divided by one factor f, the largest leaving each a whole
    number of its units and at least `least` of it (default one unit): each counter, a quadratic
    in the number of units, then scales exactly to the real values from `scaled`'s three points,
    which are that proxy at 1x, 2x and 4x. Axes at 0 stay 0. Where the real values are not whole
    units, the real values (up to DIRECT_UP_TO proxies) or a proxy of whole units in the same
    ratio (approximate: the tail is scaled with the rest)."""
    least = least or {}
    axes = [a for a in units if fields[a]]
    if not axes:
        return dict(fields)
    floor = {a: max(units[a], least.get(a, 0)) for a in axes}
    if all(fields[a] % units[a] == 0 for a in axes):
        g = reduce(math.gcd, (fields[a] // units[a] for a in axes))
        for f in sorted((d for i in range(1, math.isqrt(g) + 1) if g % i == 0 for d in (i, g // i)), reverse=True):
            if all(fields[a] // f >= floor[a] for a in axes):
                return {**fields, **{a: fields[a] // f for a in axes}}
        return dict(fields)
    lead = axes[0]
    smallest = -(-floor[lead] // units[lead]) * units[lead]
    if fields[lead] <= DIRECT_UP_TO * smallest:
        return dict(fields)
    f = fields[lead] / smallest
    return {**fields, **{a: max(floor[a], round(fields[a] / f / units[a]) * units[a]) for a in axes}}


def _through(f: float, c1: float, c2: float, c4: float) -> float:
    """The quadratic through (1, c1), (2, c2), (4, c4) at f: exact for a counter constant, linear
    or quadratic in the axis (a fixed part plus a per-key part; a square prefill's query x key tiles)."""
    return (c1 * (f - 2) * (f - 4) / 3 - c2 * (f - 1) * (f - 4) / 2 + c4 * (f - 1) * (f - 2) / 6)


def scaled(key: str, real: dict, proxy: dict, groups: tuple, run: Callable[[dict], list[Dispatch]]) -> list[Counted]:
    """The counters of `run` at `real`, from traces at `proxy` and at `proxy` with each group of
    axes at 2x and 4x (a group is a tuple of shape fields scaled by one factor, real[g[0]] / proxy[g[0]])."""
    base = traced(key, proxy, run)
    axes = []
    for group in groups:
        f = real[group[0]] / proxy[group[0]]
        if f != 1:
            axes.append((f, *(traced(key, {**proxy, **{a: m * proxy[a] for a in group}}, run) for m in (2, 4))))
    out = []
    for i, c in enumerate(base):
        values = {}
        for name, v0 in c.features.items():
            v = float(v0)
            for f, two, four in axes:
                if v0:
                    v *= max(0.0, _through(f, v0, two[i].features[name], four[i].features[name])) / v0
            values[name] = v
        out.append(Counted(c.kernel, c.threadgroup, c.threadgroup_memory_bytes, values))
    return out
