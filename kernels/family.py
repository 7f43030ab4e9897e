"""What every kernel family declares, and the machinery they share.

A family is a template plus the facts the rest of metalforge needs without compiling anything:
its tunable parameters and their domains, the shape it is specialised to, its exact threadgroup
memory and thread counts, its launch geometry, and a reference implementation in MLX ops.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator

import mlx.core as mx

from metalforge.errors import MetalforgeError, choices
from metalforge.intmath import cdiv, pow2_bucket
from metalforge.kernels import backends, dtypes as _dtypes
from metalforge.kernels.render import kernel_name, render


@dataclass(frozen=True)
class Param:
    name: str
    domain: tuple
    default: Any
    doc: str


@dataclass(frozen=True)
class KernelSource:
    """Everything `mx.fast.metal_kernel` needs to build one kernel."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str   # the body: our templates need no header (helpers are inlined)


@dataclass(frozen=True)
class Geometry:
    """One launch's shape, known without rendering anything: the checks, the cost model and the
    launches all read it, so a template is rendered only to be compiled."""

    grid: tuple[int, int, int]          # threads, as mx.fast.metal_kernel counts them
    threadgroup: tuple[int, int, int]
    threadgroup_memory_bytes: int = 0
    # 32-bit values a lane keeps in its arrays (accumulators, staged rows, fragments): what the
    # checks' register rule (kernels/checks.py) reads
    registers: int = 0

    @property
    def threads(self) -> int:
        return math.prod(self.threadgroup)

    @property
    def threadgroups(self) -> int:
        return math.prod(cdiv(g, t) for g, t in zip(self.grid, self.threadgroup))


@dataclass(frozen=True)
class Launch:
    """One dispatch: which kernel, its geometry (grid counts threads) and its outputs."""

    kernel: KernelSource
    grid: tuple[int, int, int]          # threads, as mx.fast.metal_kernel counts them
    threadgroup: tuple[int, int, int]   # threads
    output_shapes: tuple
    output_dtypes: tuple
    init_value: float | None = None
    # sizes the kernel reads at run time (its `lengths` input, int32), so that one compiled
    # kernel serves every prompt length, prefix and row count
    lengths: tuple[int, ...] = ()


Config = dict


@dataclass(frozen=True)
class ArraySpec:
    """What compiling a kernel needs to know of an input: its dtype, rank and size."""

    dtype: Any
    ndim: int
    size: int


class Family:
    """Base class; subclasses fill in the class attributes and the abstract methods."""

    name: str = ""
    params: tuple[Param, ...] = ()
    shape_type: type = object
    # shape fields rounded up to a power of two for tuning: shapes that round alike share a config
    bucketed: tuple[str, ...] = ()
    # shape fields that select a model variant, written into results keys only when set: a key
    # written before the variant existed still names the same bucket
    variant_fields: tuple[str, ...] = ()
    # what limits the kernel on the device: "memory" (decode-time kernels) or "compute" (prompt
    # kernels), as the per-kernel fit reports its error (kernels/timing/fit.py)
    bound: str = "memory"
    # the engine op it serves (engine/ops.py: "linear", "attention", "expert_linear"; "" none);
    # the families serving an op are asked in registry order (kernels/families.py)
    op: str = ""
    # whether tuning a model tunes it unless --families says otherwise
    tuned_with_models: bool = True
    # the folder holding its templates (None: the package's templates/)
    template_folder: str | None = None
    # MLX's op for the same job as mlx-lm calls it, a job of kernels/timing/mlx_jobs.py ("matmul",
    # "decode", "prefill"); "" where no MLX kernel sequence is ported for the family
    mlx_op: str = ""
    # the shape fields its traces scale from trace_proxy to the real shape, in groups scaled by
    # one factor (kernels/timing/traces.py: scaled, cut); () where its traces are not priced yet
    trace_groups: tuple[tuple[str, ...], ...] = ()

    def op_shape(self, values: dict) -> dict | None:
        """An engine op call's sizes (engine/ops.py PlannedOp.values) as this family's shape
        fields, or None where the family's layout does not apply to the call."""
        return None

    @property
    def template(self) -> str:
        """Its main kernel's template: templates/<name>.metal.j2."""
        return f"{self.name}.metal.j2"

    # ---- buckets ---------------------------------------------------------------------------
    def representative(self, shape):
        """The shape its bucket is tuned at (a zero stays zero: no prefix is not a prefix of one)."""
        fields = dict(self.shape(shape).__dict__)
        fields.update({f: pow2_bucket(fields[f]) for f in self.bucketed if fields[f]})
        return self.shape(fields)

    def bucket_key(self, shape, dtype: str) -> str:
        """The results key: shapes that share a bucket share a tuned config."""
        return f"{self.describe(self.representative(shape))}|{dtype}"

    def describe(self, shape) -> str:
        """'k=v,...' of a shape as users write it: variant fields only where set."""
        return shape_str(shape, unless_default=self.variant_fields)

    def proxy_shape(self, shape):
        """A shape of the same structure that the emulator checks in a moment (off a Mac a
        candidate is verified there): counts cut by cut_keeping_tail, the rest as it is."""
        return self.shape(shape)

    def shape_distance(self, a, b) -> float | None:
        """How far apart two shapes are for borrowing a tuned config (log scale), or None when
        one's config says nothing about the other (a different structure)."""
        raise NotImplementedError

    def mlx_regime(self, shape) -> str:
        """Which kind of MLX kernel runs the shape's job ("vector", "matrix"): a config and its
        ratio were tuned against that kernel and say nothing of a shape where MLX runs another,
        so results/lookup.py never borrows across regimes. One regime unless a family splits."""
        return "one"

    # ---- configs ---------------------------------------------------------------------------
    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise MetalforgeError(
            f"{self.name}: unknown parameter '{name}'; valid parameters: "
            f"{choices(p.name for p in self.params)}"
        )

    def default_config(self) -> Config:
        return {p.name: p.default for p in self.params}

    def config(self, values: dict | None = None) -> Config:
        """Defaults overlaid with `values`, each checked against its domain (strings are parsed)."""
        out = self.default_config()
        if values is not None and not isinstance(values, dict):
            raise MetalforgeError(f"{self.name}: a config must be a mapping of parameter to value, "
                                  f"not {type(values).__name__}")
        for key, raw in (values or {}).items():
            p = self.param(key)
            value = _coerce(raw, p)
            if value not in p.domain:
                raise MetalforgeError(
                    f"{self.name}: {key}={raw} is outside its domain; valid values: {choices(p.domain)}"
                )
            out[key] = value
        return out

    def space(self) -> Iterator[Config]:
        """Every config of the family's search space (the cartesian product of the domains)."""
        names = [p.name for p in self.params]
        for values in itertools.product(*(p.domain for p in self.params)):
            yield dict(zip(names, values))

    def space_size(self) -> int:
        n = 1
        for p in self.params:
            n *= len(p.domain)
        return n

    # ---- shapes ----------------------------------------------------------------------------
    def shape(self, values) -> Any:
        """A validated shape from a dict, a 'k=v,k=v' string or a shape object."""
        if isinstance(values, self.shape_type):
            return values
        if isinstance(values, str):
            values = parse_assignments(values, what="shape")
        fields = {f.name: f for f in dataclasses.fields(self.shape_type)}
        unknown = set(values) - set(fields)
        if unknown:
            raise MetalforgeError(
                f"{self.name}: unknown shape field(s) {choices(sorted(unknown))}; "
                f"valid fields: {choices(fields)}"
            )
        kwargs = {k: _shape_int(self.name, k, v) for k, v in values.items()}
        missing = [f.name for f in fields.values() if f.name not in kwargs
                   and f.default is dataclasses.MISSING]
        if missing:
            raise MetalforgeError(f"{self.name}: shape is missing {choices(missing)}")
        shape = self.shape_type(**kwargs)
        problems = self.shape_problems(shape)
        if not problems:
            largest = max(self.buffer_elements(shape).items(), key=lambda kv: kv[1])
            if largest[1] > MAX_BUFFER_ELEMENTS:
                problems.append(f"buffer '{largest[0]}' would hold {largest[1]} elements, more than the "
                                f"{MAX_BUFFER_ELEMENTS} that 32-bit indexing on the GPU can address")
        if problems:
            raise MetalforgeError(f"{self.name}: unsupported shape {self.describe(shape)}: {'; '.join(problems)}")
        return shape

    def shape_problems(self, shape) -> list[str]:
        """Reasons the family cannot handle the shape at all, whatever the config."""
        return []

    def buffer_elements(self, shape) -> dict[str, int]:
        """Elements of each buffer a launch indexes (logical values for packed weights): the
        kernels index with 32-bit integers, so none may exceed MAX_BUFFER_ELEMENTS."""
        raise NotImplementedError

    # ---- resources ------------------------------------------------------------------------------
    def geometry(self, config: Config, shape, dtype) -> tuple[Geometry, ...]:
        """Each launch's grid, threadgroup and threadgroup memory, in launch order (overridden)."""
        raise NotImplementedError

    def threadgroup_memory_bytes(self, config: Config, shape, dtype) -> int:
        """The most threadgroup memory any of the config's launches declares."""
        return max(g.threadgroup_memory_bytes for g in self.geometry(config, shape, dtype))

    def config_problems(self, config: Config, shape, dtype) -> list[str]:
        """Family-specific reasons a config cannot serve a shape (divisibility, precision)."""
        return []

    # ---- code --------------------------------------------------------------------------------
    def launches(self, config: Config, shape, dtype) -> list[Launch]:
        raise NotImplementedError

    def _kernel(self, template: str, inputs, outputs, **values) -> KernelSource:
        src = render(template, folder=self.template_folder, **values)
        return KernelSource(kernel_name(self.name, src), tuple(inputs), tuple(outputs), src)

    def render(self, config: Config, shape, dtype) -> str:
        """All kernels of a config as one MSL text (what `metalforge render` prints)."""
        parts = []
        for launch in self.launches(config, shape, dtype):
            k = launch.kernel
            parts.append(
                f"// kernel {k.name}: inputs {', '.join(k.input_names)} -> {', '.join(k.output_names)}\n"
                f"// grid {launch.grid} threads, threadgroup {launch.threadgroup}\n"
                + k.source
            )
        return "\n".join(parts)

    # ---- execution ---------------------------------------------------------------------------
    def make_inputs(self, shape, dtype, seed: int = 0) -> dict[str, mx.array]:
        raise NotImplementedError

    def trace_inputs(self, shape, dtype) -> dict[str, mx.array]:
        """The inputs its priced traces run on (kernels/timing/compare.py): make_inputs', where
        the work they are scaled to (Family.work) assumes nothing make_inputs varies."""
        return self.make_inputs(shape, dtype, 0)

    def reference(self, shape, dtype, inputs: dict[str, mx.array]) -> mx.array:
        raise NotImplementedError

    def baseline(self, shape, dtype, inputs: dict[str, mx.array]) -> mx.array:
        """MLX's op for the same job as mlx-lm calls it (what a tuned kernel must beat), on
        `baseline_inputs(...)`."""
        return self.reference(shape, dtype, inputs)

    def baseline_inputs(self, shape, dtype, inputs: dict[str, mx.array]) -> dict[str, mx.array]:
        """The inputs laid out as mlx-lm holds them for MLX's op, prepared before any timing."""
        return inputs

    def mlx_jobs(self, fields: dict) -> list[tuple[str, dict]]:
        """MLX's jobs (op, sizes) for ours at `fields` (a shape's, or sizes the family does not
        serve), as mlx-lm runs them: one `mlx_op` at `mlx_sizes`; a fused family's are several."""
        if not self.mlx_op:
            from metalforge.kernels.families import FAMILIES
            raise MetalforgeError(f"no MLX kernel sequence is ported for family '{self.name}'; valid families: "
                                  f"{choices(n for n, f in FAMILIES.items() if f.mlx_op)}")
        return [(self.mlx_op, self.mlx_sizes(fields))]

    def mlx_sizes(self, fields: dict) -> dict:
        """`fields` as the sizes of MLX's op (its job's fields, kernels/timing/mlx_jobs.py)."""
        return dict(fields)

    def mlx_op_shape(self, values: dict) -> dict | None:
        """An engine op call as mlx-lm makes it, in this family's shape fields (what mlx_jobs
        takes): op_shape's unless mlx-lm holds the call's data otherwise; None where the family
        does not serve the call."""
        return self.op_shape(values)

    def mlx_kernels(self, shape, dtype, device) -> str:
        """The Metal kernels MLX runs for the job on `device` (kernels/mlx_dispatch.py), or why unknown."""
        from metalforge.kernels.timing import mlx_jobs
        try:
            return " + ".join(launch.kernel for op, sizes in self.mlx_jobs(dataclasses.asdict(self.shape(shape)))
                              for launch in mlx_jobs.choose(op, sizes, dtype, device).launches)
        except MetalforgeError as e:
            return f"unknown: {e}"

    def mlx_config(self, shape, dtype, device) -> Config | None:
        """Our config that tiles the job as MLX's real kernel does on `device` (the kernel MLX's own
        dispatch rules pick, kernels/mlx_dispatch.py): the tuner tries it in every search and ships
        nothing priced slower, so the worst case is parity. None where no config of ours
        corresponds: here, a family with no MLX kernel sequence ported (gather_qmv) or a fused one
        (gate_up, norm_qkv: MLX runs its job as several kernels - a norm, two or three products, an
        elementwise op - that no single config of ours tiles alike)."""
        return None

    def trace_proxy(self, fields: dict, config) -> dict:
        """A small shape of the same structure whose traces of `config` scale exactly to `fields`
        along trace_groups (traces.cut: whole tiles of the config; where proxy_shape is what the
        emulator verifies a candidate at, this keeps every tail a trace's counters depend on)."""
        raise MetalforgeError(f"{self.name}: no proxy shapes for its traces (Family.trace_groups, trace_proxy): "
                              "not priced yet")

    def run(self, config: Config, shape, dtype, inputs: dict[str, mx.array], backend=None,
            device=None) -> mx.array:
        """Execute the config's launches; intermediate outputs feed later launches by name."""

        env = dict(inputs)
        out = None
        for launch, kernel, lengths in self.built(config, shape, dtype, backend, device):
            if lengths is not None:
                env[LENGTHS] = lengths
            missing = [n for n in launch.kernel.input_names if n not in env]
            if missing:
                raise MetalforgeError(f"{self.name}: missing input(s) {choices(missing)}")
            results = kernel(
                inputs=[env[n] for n in launch.kernel.input_names],
                output_shapes=list(launch.output_shapes),
                output_dtypes=list(launch.output_dtypes),
                grid=launch.grid,
                threadgroup=launch.threadgroup,
                init_value=launch.init_value,
            )
            env.update(zip(launch.kernel.output_names, results))
            out = results[0]
        return out

    def built(self, config: Config, shape, dtype, backend=None, device=None) -> list[tuple]:
        """(launch, its callable kernel, its lengths array or None) for each launch of the config:
        rendered, hashed and built once per (family, config, compile-time shape, dtype, backend,
        device), since an engine calls each op once per layer per token."""
        key = (self.name, tuple(config.items()), shape, getattr(dtype, "name", dtype), backends.requested(backend),
               getattr(device, "name", device))
        found = _BUILT.get(key)
        if found is None:
            found = _BUILT[key] = [
                (launch, backends.kernel(launch.kernel, backend, device),
                 mx.array(launch.lengths, dtype=mx.int32) if launch.lengths else None)
                for launch in self.launches(config, shape, _dtypes.get(dtype))]
        return found

    def prepare(self, config: Config, shape, dtype, inputs: dict, backend=None, device=None) -> None:
        """Compile every launch without running it (emulator only). Thread-safe and free of MLX
        computation, so many configs can be compiled in parallel before they are run."""

        if backends.resolve(backend) != "emulator":
            return
        env = dict(inputs)
        for launch in self.launches(config, shape, _dtypes.get(dtype)):
            kernel = backends.kernel(launch.kernel, backend, device)
            if launch.lengths:
                env[LENGTHS] = ArraySpec(mx.int32, 1, len(launch.lengths))
            kernel.prepare(inputs=[env[n] for n in launch.kernel.input_names], output_dtypes=launch.output_dtypes)
            for name, shp, dt in zip(launch.kernel.output_names, launch.output_shapes, launch.output_dtypes):
                env[name] = ArraySpec(dt, len(shp), math.prod(shp))

    def tolerance(self, config: Config, dtype) -> tuple[float, float]:
        d = _dtypes.get(dtype)
        return d.atol, d.rtol

    # ---- the performance model: work counted here, priced by kernels/timing/model.py ---------------
    def work(self, config: Config, shape, dtype) -> list:
        """Each launch's counters (traces.Counted: bytes and sectors per buffer, threadgroup passes,
        barriers, SIMD-group functions, MMAs, threads, threadgroups), counted without running
        anything (kernels/work.py): the value the emulator's trace mode fills from a real run
        (every family counts it; tests/test_work.py checks each against traces)."""
        raise NotImplementedError

    def modelled_seconds(self, config: Config, shape, dtype, device) -> float:
        """Seconds for one call of `config` on `device` (a profile or its name): its work priced by
        the per-kernel model, the one function that prices MLX's kernels and ours."""
        from metalforge import devices
        from metalforge.kernels.timing import fit, model
        counted = _work(self, tuple(config.items()), shape, _dtypes.get(dtype).name)
        return model.price(counted, devices.get(device), fit.shipped()["constants"])

    def model_error(self) -> float | None:
        """The family's per-kernel error: leave-one-chip-out on published kernel timings
        (kernels/timing/constants.yaml); None where no kernel-level data validates it."""
        from metalforge.kernels.timing import fit
        return fit.family_error(self.name)



_BUILT: dict = {}   # Family.built's cache


def mlx_choice(family: Family, shape, dtype, device):
    """MLX's Choice for a one-job family's shape on `device` (kernels/timing/mlx_jobs.py), or None
    where MLX fuses no kernel for it (a head dim it runs unfused, M5's unported NAX kernels)."""
    from metalforge.kernels.timing import mlx_jobs
    (op, sizes), = family.mlx_jobs(dataclasses.asdict(family.shape(shape)))
    try:
        return mlx_jobs.choose(op, sizes, _dtypes.get(dtype).name, device)
    except MetalforgeError:
        return None


def allowed(family: Family, config: Config, shape, dtype, device) -> Config | None:
    """`config` where `device` runs it at `shape` (kernels/checks.py), else None: MLX's tiling
    mirrored past one of our limits is no config of ours."""
    from metalforge.kernels import checks
    return config if not checks.check(family, config, shape, dtype, device) else None


@functools.lru_cache(maxsize=4096)
def _work(family: Family, config: tuple, shape, dtype: str) -> list:
    """Family.work, once per config, shape and dtype: the tuner prices a config on many devices."""
    return family.work(dict(config), shape, dtype)


# 8x8 fp32 fragments one SIMD-group may hold (two 32-bit registers a lane each): past 64 (128
# registers a lane) a GPU trades occupancy or spills to memory; MLX's and llama.cpp's SIMD-group
# matrix kernels stay well below. It also bounds the emulator's per-thread stack.
MAX_FRAGMENTS = 64


def fragment_problems(count: int) -> list[str]:
    if count <= MAX_FRAGMENTS:
        return []
    return [f"a SIMD-group would hold {count} 8x8 fragments, more than {MAX_FRAGMENTS} (128 registers a lane)"]


# Threadgroup memory as 32 banks of 4 bytes (as on every GPU metal-benchmarks tabulates; Apple's
# bank layout is not published): a read whose lanes touch several words of one bank is serialised.
BANKS = 32
# A staged tile row's padding (MLX's steel loaders pad by 16 bytes): the 8 rows a fragment read
# touches then start in different banks, read along rows or down columns
TILE_PAD_BYTES = 16

# Apple's 8x8 fragment layout: lane -> (row, first of its two columns)
FRAGMENT_LANES = tuple((((lane // 4) & 4) + (lane // 2) % 4, ((lane // 4) & 2) * 2 + (lane % 2) * 2)
                       for lane in range(32))


def fragment_bank_ways(stride_bytes: int, element_bytes: int, transposed: bool) -> float:
    """How many times slower than conflict-free an 8x8 fragment read from a row-major tile is:
    each lane reads its two adjacent elements (row fm, columns fn and fn + 1) as one access, or,
    transposed (a K^T or W^T operand), element (fm, fn + c) from row fn + c, column fm, one access
    per c. Words a bank serves over the fewest passes the access's distinct words need (1.0: no
    conflict)."""
    worst = 1.0
    for c in ((0,) if not transposed else (0, 1)):
        words = set()
        for fm, fn in FRAGMENT_LANES:
            for e in ((c,) if transposed else (0, 1)):
                row, col = (fn + e, fm) if transposed else (fm, fn + e)
                words.add((row * stride_bytes + col * element_bytes) // 4)
        per_bank = [0] * BANKS
        for w in words:
            per_bank[w % BANKS] += 1
        worst = max(worst, max(per_bank) / -(-len(words) // BANKS))
    return worst


def stage_dtype(config, dtype) -> _dtypes.DType:
    """What a config's `stage` tunable stages tiles as: the input's own type (as MLX) or fp32."""
    return _dtypes.get("float32") if config["stage"] == "float" else _dtypes.get(dtype)


def stage_problems(config, dtype) -> list[str]:
    if config["stage"] == "input" and _dtypes.get(dtype).name == "float32":
        return ["stage=input is stage=float for float32 inputs"]
    return []


# The input that carries a launch's run-time sizes (Launch.lengths).
LENGTHS = "lengths"

# Kernels compute element offsets in 32-bit `int`/`uint`: a buffer larger than this would wrap.
MAX_BUFFER_ELEMENTS = 2**31 - 1


def _shape_int(family: str, field: str, value) -> int:
    """A shape field as an int: ints, integral strings and integral finite floats; nothing else
    (a bool, 1.5, inf and nan are mistakes, not sizes)."""
    if isinstance(value, bool):
        raise MetalforgeError(f"{family}: shape field {field}={value!r} is not an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise MetalforgeError(f"{family}: shape field {field}={value!r} is not an integer")
        value = int(value)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise MetalforgeError(f"{family}: shape field {field}={value!r} is not an integer") from None
    if not -MAX_BUFFER_ELEMENTS <= n <= MAX_BUFFER_ELEMENTS:
        raise MetalforgeError(f"{family}: shape field {field}={n} is beyond what 32-bit indexing on the GPU "
                              f"can address ({MAX_BUFFER_ELEMENTS})")
    return n


def _coerce(raw, p: Param):
    if not isinstance(raw, str):
        return raw
    sample = p.domain[0]
    if isinstance(sample, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        return raw
    if isinstance(sample, int):
        try:
            return int(raw)
        except ValueError:
            return raw
    return raw


def parse_assignments(text: str, what: str) -> dict[str, str]:
    """'a=1,b=2' (or several such strings) -> {'a': '1', 'b': '2'}."""
    out = {}
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        if "=" not in part:
            raise MetalforgeError(f"bad {what} item '{part}': expected NAME=VALUE")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def shape_str(shape, unless_default: tuple[str, ...] = ()) -> str:
    """'k=v,...' of every field, less those named in unless_default that hold their default."""
    return ",".join(f"{f.name}={getattr(shape, f.name)}" for f in dataclasses.fields(shape)
                    if f.name not in unless_default or getattr(shape, f.name) != f.default)


def cut_keeping_tail(n: int, keep: int, period: int) -> int:
    """n itself when small, else keep + (n mod period): the remainder (the tail) survives."""
    return n if n <= keep + period else keep + n % period
