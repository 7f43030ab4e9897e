"""`metal_kernel`: a drop-in for `mx.fast.metal_kernel` that runs the kernel on the CPU."""
from __future__ import annotations

import functools
import math
import re

import mlx.core as mx
import numpy as np

from metalforge import devices

from . import compiler, environment, frontend, runner
from .errors import EmulatorError
from .source import (ATTRIBUTE_VALUES, InputInfo, attributes_in, buffer_plan, mlx_kernel_name, mlx_source, rewrite,
                     template_value, type_name)


# Limits used when no device profile is given: every Apple GPU (M1 to M5) shares them.
DEFAULT_LIMITS = {"threadgroup_memory_bytes": 32768, "max_threads_per_threadgroup": 1024}


def device_limits(device) -> dict:
    """The limits dispatch enforces: the device profile's, else those every Apple GPU shares."""
    if device is None:
        return DEFAULT_LIMITS
    p = devices.get(device)
    return {"threadgroup_memory_bytes": p.threadgroup_memory_bytes,
            "max_threads_per_threadgroup": p.max_threads_per_threadgroup}


def metal_kernel(name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False, compile_options=None, *, device=None, checked=None, timeout=None):
    """Same arguments as `mx.fast.metal_kernel` (plus `device`, a profile whose limits dispatch
    enforces, `checked`, bounds and race checking, and `timeout`, seconds a call may run before it
    is stopped with an error; default $METALFORGE_EMULATOR_TIMEOUT_S, else none); returns a
    callable with MLX's call."""
    if not output_names:
        raise ValueError("[metal_kernel] Must specify at least one output.")
    return EmulatedKernel(name, list(input_names), list(output_names), source, header,
                          ensure_row_contiguous, atomic_outputs, device, checked, timeout)


class EmulatedKernel:
    def __init__(self, name, input_names, output_names, source, header, ensure_row_contiguous,
                 atomic_outputs, device, checked, timeout=None):
        self.name = name
        self.input_names = input_names
        self.output_names = output_names
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.device = device
        self.checked = checked
        self.timeout = timeout
        self.last_stats: dict = {}   # counts of the last call: threads, barrier crossings, SIMD lanes

    def _timeout(self) -> float | None:
        return self.timeout if self.timeout is not None else environment.timeout_s()

    def _limits(self) -> dict:
        return device_limits(self.device)

    def _program(self, arrays, output_dtypes, template, checked, verbose=False):
        """Generate and compile (or fetch) the kernel for these input kinds; arrays need not be evaluated."""
        infos = [InputInfo(n, a.dtype, a.ndim, a.size, f"{n}_shape" in self.source, f"{n}_strides" in self.source,
                           f"{n}_ndim" in self.source) for n, a in zip(self.input_names, arrays)]
        kname = mlx_kernel_name(self.name, template, infos, output_dtypes)
        plan = buffer_plan(infos, self.output_names, output_dtypes, self.atomic_outputs)
        msl = mlx_source(kname, self.header, self.source, plan, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{msl}\n```")
        facts = conformance_facts(msl, kname)
        unit = _translation_unit(kname, msl, facts, plan, template, checked, attributes_in(self.source))
        lib, path = compiler.build(unit, kname, checked)
        return lib, path, kname, plan

    def _checked(self) -> bool:
        return environment.checked() if self.checked is None else bool(self.checked)

    def prepare(self, *, inputs, output_dtypes, template=None):
        """Compile ahead of a call (thread-safe, no MLX computation): for parallel precompilation."""
        specs = [x if hasattr(x, "dtype") and hasattr(x, "ndim") else _as_array(x) for x in inputs]
        self._program(specs, _listed(output_dtypes), _pairs(template), self._checked())

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        inputs = _listed(inputs)
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} but got size {len(inputs)}.")
        output_shapes, output_dtypes = _listed(output_shapes), _listed(output_dtypes)
        for what, got in (("output_shapes", len(output_shapes)), ("output_dtypes", len(output_dtypes))):
            if got != len(self.output_names):
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {len(self.output_names)} but got size {got}.")
        template = _pairs(template)
        checked = self._checked()
        arrays = [_as_array(x) for x in inputs]
        if self.ensure_row_contiguous:
            arrays = [mx.contiguous(a) if a.ndim else a for a in arrays]
        mx.eval(*arrays)
        runner.geometry(grid, threadgroup)   # MLX's argument errors before any compiling
        limits = self._limits()
        tg_size = math.prod(int(t) for t in threadgroup)
        if tg_size > limits["max_threads_per_threadgroup"]:
            raise EmulatorError(f"Thread group size ({tg_size}) is greater than  the maximum allowed threads per "
                                f"threadgroup ({limits['max_threads_per_threadgroup']}).")
        workers, timeout_s = environment.threads(), self._timeout()
        lib, path, kname, plan = self._program(arrays, output_dtypes, template, checked, verbose)
        tg_bytes = lib.threadgroup_bytes
        if tg_bytes > limits["threadgroup_memory_bytes"]:
            raise EmulatorError(f"Threadgroup memory size ({tg_bytes}) exceeds the maximum threadgroup memory "
                                f"allowed ({limits['threadgroup_memory_bytes']}) in kernel {kname}")

        views = {name: _numpy_view(a) for name, a in zip(self.input_names, arrays)}
        outs = {name: _new_output(tuple(int(s) for s in shape), dtype, init_value)
                for name, shape, dtype in zip(self.output_names, output_shapes, output_dtypes)}
        args = []
        for b in plan:
            if b.role == "output":
                args.append(runner.Arg(outs[b.of], output=True, initialised=init_value is not None))
            elif b.role in ("input", "scalar"):
                args.append(runner.Arg(views[b.of]))
            else:
                view = views[b.of]
                values = {"shape": view.shape, "ndim": [view.ndim],
                          "strides": [s // view.itemsize for s in view.strides]}[b.role]
                args.append(runner.Arg(np.ascontiguousarray(values, dtype=np.int64 if b.role == "strides" else np.int32)))
        launched = lib.launch("mf_launch", args, grid=grid, threadgroup=threadgroup, workers=workers,
                              checked=checked, timeout_s=timeout_s)
        self.last_stats = launched.stats
        if launched.rc != 0:
            raise EmulatorError(_with_lines(launched.errors, path, kname))
        return [_to_mlx(outs[n], d) for n, d in zip(self.output_names, output_dtypes)]


def _listed(values) -> list:
    """MLX takes lists, and dicts in name order (older documentation passes dicts)."""
    return list(values.values()) if isinstance(values, dict) else list(values)


def _pairs(template) -> list:
    """Template arguments as (name, value) pairs, from a list of pairs or a dict."""
    return list(template.items()) if isinstance(template, dict) else list(template or [])


def _as_array(x) -> mx.array:
    if isinstance(x, mx.array):
        return x
    if isinstance(x, bool):
        return mx.array(x, dtype=mx.bool_)
    if isinstance(x, int):
        return mx.array(x, dtype=mx.int32)
    if isinstance(x, float):
        return mx.array(x, dtype=mx.float32)
    return mx.array(x)


def _numpy_view(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.asarray(mx.contiguous(a).view(mx.uint16))
    return np.asarray(a)


NUMPY_DTYPES = {
    mx.bool_: np.bool_, mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.uint64: np.uint64,
    mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32, mx.int64: np.int64,
    mx.float16: np.float16, mx.bfloat16: np.uint16, mx.float32: np.float32, mx.complex64: np.complex64,
}


def _new_output(shape, dtype, init_value) -> np.ndarray:
    type_name(dtype)  # rejects dtypes kernels cannot use, with a clear message
    if init_value is None:   # MLX leaves it uninitialised; the runner gives the kernel zeros
        return np.empty(shape, dtype=NUMPY_DTYPES[dtype])
    filled = mx.full(shape, init_value, dtype=dtype)
    return np.array(filled.view(mx.uint16) if dtype == mx.bfloat16 else filled)


def _to_mlx(out: np.ndarray, dtype) -> mx.array:
    arr = mx.array(out)
    return arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr


def _with_lines(messages: list[str], path, kname: str) -> str:
    """Replace '@pc:0x..' markers (checked-mode reports) with lines of the kernel's MSL."""
    offsets = sorted({int(m, 16) for msg in messages for m in re.findall(r"@pc:0x([0-9a-f]+)", msg)})
    lines = compiler.addr2line(path, offsets, f"{kname}.metal")
    def sub(m):
        n = lines.get(int(m.group(1), 16))
        return f"line {n}" if n else "unknown line"
    return "\n".join(re.sub(r"@pc:0x([0-9a-f]+)", sub, msg) for msg in messages)


@functools.lru_cache(maxsize=256)
def conformance_facts(msl: str, kname: str):
    """The front end's verdict on one generated source (parsed in its own process), once per process."""
    return frontend.check(msl, kname)


def _translation_unit(kname, msl, facts, plan, template, checked, attributes) -> str:
    """The kernel's MSL (rewritten line for line) followed by the extern "C" launcher."""
    args = []
    for i, b in enumerate(plan):
        q = "" if b.role == "output" else "const "
        raw = f"reinterpret_cast<{q}{b.ctype}*>(buffers[{i}])"
        if b.by_reference:
            args.append(f"*{raw}")
        elif checked:
            args.append(f'mf::DevPtr<{q}{b.ctype}>({raw}, meta[9 + {i}], "{b.name}")')
        else:
            args.append(raw)
    first_output = next((i for i, b in enumerate(plan) if b.role == "output"), len(plan))
    args += [ATTRIBUTE_VALUES[a] for a in attributes]
    call = kname
    if template:
        call += "<" + ", ".join(template_value(v)[1] for _, v in template) + ">"
    names = ", ".join(f'"{b.name}"' for b in plan) or '""'
    launcher = f'''
#line 1 "mf_launcher.cpp"
static const char* const mf_buffer_names[] = {{{names}}};
extern "C" const mf::KernelInfo mf_kernel_info = {{"{kname}", mf_buffer_names, {len(plan)}, {first_output}}};
extern "C" void mf_kernel_body(void* const* buffers, const long long* meta, const mf::Launch& L, mf::Fiber& f) {{
  {call}({", ".join(args)});
}}
'''
    return f'#line 1 "{kname}.metal"\n' + rewrite(msl, checked, facts) + launcher
