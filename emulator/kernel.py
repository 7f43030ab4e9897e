"""`metal_kernel`: a drop-in for `mx.fast.metal_kernel` that runs the kernel on the CPU."""
from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
import time

import mlx.core as mx
import numpy as np

from metalforge import devices
from metalforge.errors import MetalforgeError
from metalforge.intmath import cdiv

from . import compiler, conformance
from .source import (ATTRIBUTE_VALUES, InputInfo, attributes_in, buffer_plan, mlx_kernel_name, mlx_source, rewrite,
                     template_value, type_name)


class EmulatorError(MetalforgeError):
    """A kernel failed at dispatch or while running (limits, divergent barriers, checked-mode reports)."""


# Limits used when no device profile is given: every Apple GPU (M1 to M5) shares them.
DEFAULT_LIMITS = {"threadgroup_memory_bytes": 32768, "max_threads_per_threadgroup": 1024}


def device_limits(device) -> dict:
    """The limits dispatch enforces: the device profile's, else those every Apple GPU shares."""
    if device is None:
        return DEFAULT_LIMITS
    p = devices.get(device)
    return {"threadgroup_memory_bytes": p.threadgroup_memory_bytes,
            "max_threads_per_threadgroup": p.max_threads_per_threadgroup}


def checked_default() -> bool:
    return os.environ.get("METALFORGE_EMULATOR_CHECKED", "0").lower() in ("1", "true", "yes", "on")


def worker_count() -> int:
    env = os.environ.get("METALFORGE_EMULATOR_THREADS")
    return max(1, int(env)) if env else max(1, os.cpu_count() or 1)


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
        return self.timeout if self.timeout is not None else timeout_default()

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
        return checked_default() if self.checked is None else bool(self.checked)

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
        grid = tuple(int(g) for g in grid)
        tg = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(tg) != 3 or min(grid) < 1 or min(tg) < 1:
            raise ValueError(f"[metal_kernel] grid and threadgroup must be three positive integers, got {grid} and {tg}")
        limits = self._limits()
        tg_size = tg[0] * tg[1] * tg[2]
        if tg_size > limits["max_threads_per_threadgroup"]:
            raise EmulatorError(f"Thread group size ({tg_size}) is greater than  the maximum allowed threads per "
                                f"threadgroup ({limits['max_threads_per_threadgroup']}).")
        lib, path, kname, plan = self._program(arrays, output_dtypes, template, checked, verbose)
        tg_bytes = lib.mf_threadgroup_bytes()
        if tg_bytes > limits["threadgroup_memory_bytes"]:
            raise EmulatorError(f"Threadgroup memory size ({tg_bytes}) exceeds the maximum threadgroup memory "
                                f"allowed ({limits['threadgroup_memory_bytes']}) in kernel {kname}")

        keep, pointers, counts, sizes = [], [], [], []
        def buffer(arr: np.ndarray, count: int) -> None:
            keep.append(arr)
            pointers.append(arr.ctypes.data)
            counts.append(count)
            sizes.append(count * arr.itemsize if count < (1 << 62) else 0)   # 0: not guarded (negative strides)
        views = {name: _numpy_view(a) for name, a in zip(self.input_names, arrays)}
        outs = {name: _new_output(tuple(int(s) for s in shape), dtype, init_value)
                for name, shape, dtype in zip(self.output_names, output_shapes, output_dtypes)}
        for b in plan:
            if b.role == "output":
                buffer(outs[b.of], outs[b.of].size)
                continue
            view = views[b.of]
            if b.role in ("input", "scalar"):
                buffer(view, _extent(view))
                continue
            values = {"shape": view.shape, "ndim": [view.ndim],
                      "strides": [s // view.itemsize for s in view.strides]}[b.role]
            buf = np.ascontiguousarray(values, dtype=np.int64 if b.role == "strides" else np.int32)
            buffer(buf, buf.size)
        groups = [cdiv(g, min(t, g)) for g, t in zip(grid, tg)]
        nominal = [min(t, g) for g, t in zip(grid, tg)]   # MLX clamps each threadgroup dim to the grid
        meta = (ctypes.c_longlong * (9 + len(counts)))(*grid, *nominal, *groups, *counts)
        ptrs = (ctypes.c_void_p * max(1, len(pointers)))(*pointers)
        byte_sizes = (ctypes.c_longlong * max(1, len(sizes)))(*sizes)
        rc = _run_interruptibly(lambda: lib.mf_launch(ptrs, meta, byte_sizes, worker_count(), int(checked)),
                                lib.mf_cancel, kname, self._timeout())
        counts_out = (ctypes.c_longlong * 3)()
        lib.mf_stats(counts_out)
        self.last_stats = dict(zip(("threads", "barrier_crossings", "simd_lanes"), counts_out))
        if rc != 0:   # -1: errors reported; -2: cancelled (handled above)
            messages = [lib.mf_error(i).decode() for i in range(lib.mf_error_count())]
            raise EmulatorError(_with_lines(messages, path, kname))
        return [_to_mlx(outs[n], d) for n, d in zip(self.output_names, output_dtypes)]


def _run_interruptibly(launch, cancel, kname: str, timeout_s: float | None) -> int:
    """Run a dispatch on a helper thread while this one waits, so Ctrl-C (delivered to the main
    thread) and the time limit can end a kernel that never returns: `cancel` makes the runtime
    jump out of every running kernel thread within milliseconds."""
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(launch()), name=f"emulator:{kname}", daemon=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    interrupted = timed_out = False
    worker.start()
    while worker.is_alive():
        try:
            worker.join(0.05)
        except KeyboardInterrupt:
            interrupted = True
        if deadline is not None and time.monotonic() > deadline:
            timed_out = True
        if interrupted or timed_out:
            cancel()
    if interrupted:
        raise KeyboardInterrupt(f"emulated kernel {kname} interrupted")
    if timed_out:
        raise EmulatorError(f"{kname}: the kernel ran past its time limit of {timeout_s:g} s and was stopped "
                            "(an endless loop? raise the limit with timeout= or METALFORGE_EMULATOR_TIMEOUT_S)")
    return result[0]


def timeout_default() -> float | None:
    raw = os.environ.get("METALFORGE_EMULATOR_TIMEOUT_S")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise EmulatorError(f"METALFORGE_EMULATOR_TIMEOUT_S must be a number of seconds > 0, got {raw!r}")
    return value


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


def _extent(view: np.ndarray) -> int:
    """Elements reachable from the first one (the bound checked mode enforces)."""
    if view.size == 0:
        return 0
    if any(s < 0 for s in view.strides):
        return 1 << 62
    return 1 + sum((n - 1) * s for n, s in zip(view.shape, view.strides)) // view.itemsize


NUMPY_DTYPES = {
    mx.bool_: np.bool_, mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.uint64: np.uint64,
    mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32, mx.int64: np.int64,
    mx.float16: np.float16, mx.bfloat16: np.uint16, mx.float32: np.float32, mx.complex64: np.complex64,
}


def _new_output(shape, dtype, init_value) -> np.ndarray:
    type_name(dtype)  # rejects dtypes kernels cannot use, with a clear message
    if init_value is None:
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
def conformance_facts(msl: str, kname: str) -> conformance.Facts:
    """The front end's verdict on one generated source, parsed once per process."""
    return conformance.check(msl, kname)


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
