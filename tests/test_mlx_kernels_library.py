"""The emulator's full-library entry point (a Metal source with its own [[kernel]] functions, picked
by host name) on small sources written here, and the fetching of MLX's headers."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from metalforge.emulator import EmulatorError
from metalforge.emulator.conformance import ConformanceError
from metalforge.emulator.library import Library
from metalforge.errors import MetalforgeError
from metalforge.kernels import mlx_headers
from metalforge.kernels.mlx_library import QUANTIZED_INCLUDES, SDPA_INCLUDES, STEEL_ATTENTION_INCLUDES

SOURCE = """
#include <metal_stdlib>
using namespace metal;
constant bool add_bias [[function_constant(10)]];
constant int repeats [[function_constant(11)]];

template <typename T, int N>
[[kernel]] void scale_rows(
    const device T* x [[buffer(0)]],
    device T* y [[buffer(1)]],
    const constant float& factor [[buffer(2)]],
    const device T* bias [[buffer(3), function_constant(add_bias)]],
    uint3 gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]],
    ushort2 tg [[threadgroup_position_in_grid]]) {
  threadgroup float partial[N];
  partial[lane % N] = float(tg.x);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float v = float(x[gid.x]) * factor * repeats;
  if (add_bias) v += float(bias[gid.x]);
  y[gid.x] = T(v + simd_sum(1.0f) - 32.0f + partial[0] - float(tg.x));
}

template [[host_name("scale_rows_float")]] [[kernel]] decltype(scale_rows<float, 4>) scale_rows<float, 4>;
template [[host_name("scale_rows_half")]] [[kernel]] decltype(scale_rows<half, 8>) scale_rows<half, 8>;

[[kernel]] void fill(device int* out, const constant int& value, uint i [[thread_position_in_grid]]) {
  out[i] = value + int(i);
}
"""


@pytest.fixture(scope="module")
def lib():
    return Library(SOURCE)


def test_functions_by_host_name_with_constants_and_conditional_buffers(lib):
    assert lib.host_names() == ["fill", "scale_rows_float", "scale_rows_half"]
    assert lib.constants == {"add_bias": (10, "bool"), "repeats": (11, "int")}
    x = np.arange(64, dtype=np.float32)
    y = np.zeros_like(x)
    fn = lib.function("scale_rows_float", {10: True, "repeats": 2})
    fn(buffers={0: x, 1: y, 2: 0.5, 3: np.full(64, 3, np.float32)}, threadgroups=(2, 1, 1), threadgroup=(32, 1, 1))
    assert np.array_equal(y, x * 0.5 * 2 + 3)
    assert fn.last_stats == {"threads": 64, "barrier_crossings": 64, "simd_lanes": 64}
    # add_bias false: buffer(3) is not an argument of this specialisation and may stay unbound
    lib.function("scale_rows_float", {"add_bias": False, 11: 3})(
        buffers={0: x, 1: y, 2: 1.0}, threadgroups=(2, 1, 1), threadgroup=(32, 1, 1))
    assert np.array_equal(y, x * 3)
    h = np.zeros(64, np.float16)
    lib.function("scale_rows_half", {11: 1})(buffers={0: x.astype(np.float16), 1: h, 2: 2.0},
                                             threadgroups=(1, 1, 1), threadgroup=(64, 1, 1))
    assert np.array_equal(h, (x * 2).astype(np.float16))


def test_a_kernel_without_attributes_takes_the_next_buffer_indices(lib):
    out = np.zeros(8, np.int32)
    fn = lib.function("fill")
    assert [(p.name, p.index) for p in fn.fn.params if p.binding == "buffer"] == [("out", 0), ("value", 1)]
    fn(buffers={0: out, 1: 40}, threadgroups=(2, 1, 1), threadgroup=(4, 1, 1))
    assert out.tolist() == list(range(40, 48))


@pytest.mark.parametrize("call,message", [
    (lambda lib: lib.function("scale_rows_double"), "no kernel named `scale_rows_double` (host names: fill, "),
    (lambda lib: lib.function("fill", {12: True}), "function constant 12 is not declared in this library "
                                                    "(declared: 10 add_bias, 11 repeats)"),
    (lambda lib: lib.function("fill")(buffers={0: np.zeros(4, np.int32), 1: 1, 5: 2}, threadgroups=(1, 1, 1),
                                      threadgroup=(4, 1, 1)), "kernel `fill` has no buffer(5)"),
    (lambda lib: lib.function("fill")(buffers={0: [0, 0], 1: 1}, threadgroups=(1, 1, 1), threadgroup=(2, 1, 1)),
     "buffer(0) `out` of kernel `fill` is written by the kernel: bind a numpy array (got list)"),
    (lambda lib: lib.function("fill")(buffers={0: np.zeros(4, np.int32), 1: b"\x01"}, threadgroups=(1, 1, 1),
                                      threadgroup=(4, 1, 1)), "buffer(1) `value` of kernel `fill` holds 1 bytes, "
                                                              "less than one int (4 bytes)"),
])
def test_bad_calls_say_what_is_wrong_in_one_line(lib, call, message):
    with pytest.raises(MetalforgeError) as e:
        call(lib)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_metals_limits_hold(lib):
    fn = lib.function("fill")
    with pytest.raises(EmulatorError, match=r"Thread group size \(1025\) is greater than  the maximum allowed "
                                            r"threads per threadgroup \(1024\)"):
        fn(buffers={0: np.zeros(1025, np.int32), 1: 0}, threadgroups=(1, 1, 1), threadgroup=(1025, 1, 1))


def test_an_unbound_buffer_the_kernel_reads_is_a_fault_not_a_crash(lib):
    with pytest.raises(EmulatorError):
        lib.function("fill")(buffers={1: 0}, threadgroups=(1, 1, 1), threadgroup=(4, 1, 1))


def test_the_include_policy_admits_the_header_root_only(tmp_path):
    (tmp_path / "inside.h").write_text("constant int kInside = 3;\n")
    kernel = "[[kernel]] void k(device int* o [[buffer(0)]]) { o[0] = kInside; }\n"
    out = np.zeros(1, np.int32)
    Library('#include "inside.h"\n' + kernel, headers=tmp_path).function("k")(
        buffers={0: out}, threadgroups=(1, 1, 1), threadgroup=(1, 1, 1))
    assert out[0] == 3
    for include in ("<stdio.h>", '"../outside.h"', '"/etc/hostname"'):
        (tmp_path.parent / "outside.h").write_text("constant int kInside = 4;\n")
        with pytest.raises(ConformanceError, match="an #include of a non-Metal header"):
            Library(f"#include {include}\n" + kernel, headers=tmp_path).function("k").prepare()


def test_a_kernel_taking_threadgroup_memory_as_an_argument_gets_the_hosts_length():
    """setThreadgroupMemoryLength: 32 floats shared by the threadgroup, read back reversed; without
    a length the kernel is refused in one line."""
    lib = Library("[[kernel]] void k(device float* o [[buffer(0)]], threadgroup float* t [[threadgroup(0)]],\n"
                  "              uint i [[thread_position_in_threadgroup]]) {\n"
                  "  t[i] = float(i) * 2.0f;\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n  o[i] = t[31 - i];\n}\n")
    out = np.zeros(32, np.float32)
    lib.function("k", threadgroup_memory={0: 128})(buffers={0: out}, threadgroups=(1, 1, 1), threadgroup=(32, 1, 1))
    assert np.array_equal(out, np.arange(31, -1, -1, dtype=np.float32) * 2)
    with pytest.raises(MetalforgeError, match=r"takes threadgroup memory `t` at threadgroup\(0\): give its length"):
        lib.function("k")


@pytest.mark.usefixtures("mlx_kernel_headers")
@pytest.mark.parametrize("includes,kernels", [(QUANTIZED_INCLUDES, 17), (SDPA_INCLUDES, 4),
                                              (STEEL_ATTENTION_INCLUDES, 1)], ids=["quantized", "sdpa_vector",
                                                                                   "steel_attention"])
def test_mlxs_kernel_headers_pass_the_front_end(includes, kernels):
    """Every [[kernel]] function of quantized.h, sdpa_vector.h and steel_attention.h (the templates
    every instantiation is made of) passes the conformance front end, and its signature binds."""
    lib = Library("".join(f'#include "{i}"\n' for i in includes), headers=mlx_headers.include_root())
    lib.check()
    assert len(lib.kernels) == kernels
    assert [k.name for k in lib.kernels.values() if k.problem] == []


def test_offline_without_the_headers_says_what_to_run(tmp_path):
    env = {**os.environ, "METALFORGE_CACHE": str(tmp_path), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1"}
    proc = subprocess.run([sys.executable, "-m", "metalforge.kernels.mlx_headers"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"mlx-metal {mlx_headers.mlx_version()}" in last and "pip could not fetch them" in last
    assert f"run `python -m pip download mlx-metal=={mlx_headers.mlx_version()} --no-deps" in last


@pytest.mark.usefixtures("mlx_kernel_headers")
def test_a_wheel_in_the_cache_is_used_without_the_network(tmp_path, monkeypatch):
    wheel = next((mlx_headers.cache_root() / "wheels").glob(f"mlx_metal-{mlx_headers.mlx_version()}-*.whl"))
    (tmp_path / "mlx-metal" / "wheels").mkdir(parents=True)
    shutil.copy(wheel, tmp_path / "mlx-metal" / "wheels")
    monkeypatch.setenv("METALFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    folder = mlx_headers.kernels_dir()
    assert folder == tmp_path / "mlx-metal" / mlx_headers.mlx_version() / "mlx/backend/metal/kernels"
    assert (folder / "quantized.h").is_file() and (folder / "steel/attn/kernels/steel_attention.h").is_file()
    assert not list(folder.rglob("*.metal"))   # headers only: the library MLX compiles is not extracted


def test_checked_mode_reports_an_out_of_bounds_index_with_its_line():
    lib = Library("[[kernel]] void k(const device float* a [[buffer(0)]], device float* o [[buffer(1)]],\n"
                  "              uint i [[thread_position_in_grid]]) {\n"
                  "  o[i] = a[i + 1];\n"
                  "}\n", mode="checked")
    with pytest.raises(EmulatorError, match=r"device buffer 'a' at element 8 \(it has 8 elements\) by thread \(7,0,0\) .* at line 3"):
        lib.function("k")(buffers={0: np.zeros(8, np.float32), 1: np.zeros(8, np.float32)},
                          threadgroups=(1, 1, 1), threadgroup=(8, 1, 1))


@pytest.mark.usefixtures("mlx_kernel_headers")
def test_mlxs_decode_attention_runs_clean_in_checked_mode():
    """No out-of-bounds access and no threadgroup race in MLX's sdpa_vector at a shape with a tail."""
    import mlx.core as mx
    from metalforge.kernels import mlx_library
    mx.random.seed(1)
    q, k, v = mx.random.normal((1, 2, 1, 64)), mx.random.normal((1, 1, 37, 64)), mx.random.normal((1, 1, 37, 64))
    out = np.zeros((1, 2, 1, 64), np.float32)
    fn = Library(mlx_library.library_source(mlx_library.SDPA_INCLUDES, "sdpa_vector_float_64_64", "sdpa_vector",
                                               "float, 64, 64"), headers=mlx_headers.include_root(),
                 mode="checked").function(
        "sdpa_vector_float_64_64", {20: False, 21: False, 22: False, 23: False, 24: False, 25: False})
    fn(buffers={0: q, 1: k, 2: v, 3: out, 4: 2, 5: 37, 6: 37 * 64, 7: 64, 8: 37 * 64, 9: 64, 10: 0.125},
       threadgroups=(2, 1, 1), threadgroup=(1024, 1, 1))
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
    assert np.allclose(out, np.array(ref), atol=1e-5)


LLAMA_STYLE = """
#define FC_BASE 600
constant short FC_scale [[function_constant(FC_BASE + 1)]];
typedef struct { int n; } args_t;
typedef struct { half d; uchar qs[6]; } blk;
template <typename T, typename A>
void body(A args, device const T* x, device const char* src, device float* o, uint i) {
  device const blk* b = (device const blk*) src;
  device const ushort* q = (device const ushort*) b[i].qs + 1;   // a member array through a pointer
  o[i] = float(x[i]) * FC_scale + float(q[0]) + args.n;
}
kernel void k_plain(constant args_t & args, device const half* x, device const char* src, device float* o,
                    uint i [[thread_position_in_grid]]) {
  body<half, constant args_t &>(args, x, src, o, i);
}
template <typename T>
kernel void k_tmpl(constant args_t & args, device const T* x, device const char* src, device float* o,
                   uint i [[thread_position_in_grid]]) {
  body<T, constant args_t &>(args, x, src, o, i);
}
typedef decltype(k_tmpl<half>) k_tmpl_t;
template [[host_name("k_half")]] kernel k_tmpl_t k_tmpl<half>;
"""


@pytest.mark.parametrize("mode", ["plain", "traced"])
@pytest.mark.parametrize("name", ["k_plain", "k_half"])
def test_llama_cpps_spellings_load_and_run(name, mode):
    """`kernel void f(`, an instantiation over a typedef, a function-constant index written as a
    macro sum, a plain kernel instantiating a template with a tagged argument type (which crashed
    libclang), and a block's member array read through a device pointer (checked in traced mode)."""
    lib = Library(LLAMA_STYLE, mode=mode)
    assert lib.constants["FC_scale"] == (601, "short") and {"k_plain", "k_half"} <= set(lib.host_names())
    x, src, out = np.arange(4, dtype=np.float16), np.arange(32, dtype=np.uint8), np.zeros(4, np.float32)
    fn = lib.function(name, {601: 3})
    fn(buffers={0: np.array([10], np.int32).tobytes(), 1: x, 2: src, 3: out}, threadgroups=(1, 1, 1),
       threadgroup=(4, 1, 1))
    qs = [int(src[8 * i + 4]) | int(src[8 * i + 5]) << 8 for i in range(4)]   # bytes 2 + 2 of block i's qs
    assert np.array_equal(out, np.arange(4) * 3 + np.array(qs) + 10)
    if mode == "traced":
        assert fn.last_trace.device["src"].footprint_bytes == 32
