"""The emulator reproduces `mx.fast.metal_kernel`'s contract (shared/reference/metal_kernel-contract.md)."""
import re

import mlx.core as mx
import numpy as np
import pytest

from metalforge import emulator
from metalforge.emulator import EmulatorError


def run(source, inputs, output_shapes, output_dtypes, grid, threadgroup, names=None, outputs=("out",), **kw):
    call_kw = {k: kw.pop(k) for k in ("template", "init_value", "verbose") if k in kw}
    names = names or [f"in{i}" for i in range(len(inputs))]
    k = emulator.metal_kernel(name="t", input_names=names, output_names=list(outputs), source=source, **kw)
    return k(inputs=inputs, output_shapes=output_shapes, output_dtypes=output_dtypes, grid=grid,
             threadgroup=threadgroup, **call_kw)


def test_generated_signature_follows_mlx_rules(capsys):
    source = """
        uint i = thread_position_in_grid.x;
        if (i < 4) atomic_fetch_add_explicit(&out[i], a[i] * float(b[0]) * s + float(c_shape[1] + c_ndim + N), memory_order_relaxed);
        (void)c_strides; (void)thread_index_in_simdgroup;
    """
    k = emulator.metal_kernel(name="sig", input_names=["a", "b", "c", "s"], output_names=["out"], source=source,
                              header="// my header\n", atomic_outputs=True)
    a = mx.ones((16,))
    b = mx.array([2.0, 3.0], dtype=mx.float16)   # fewer than 8 elements: constant address space
    c = mx.zeros((2, 3), dtype=mx.int32)
    out = k(inputs=[a, b, c, 0.5], template=[("T", mx.float32), ("N", 7), ("FLAG", True)], grid=(4, 1, 1),
            threadgroup=(4, 1, 1), output_shapes=[(4,)], output_dtypes=[mx.float32], init_value=1.0, verbose=True)[0]
    printed = capsys.readouterr().out
    name = "custom_kernel_sig__float_7_1_float_float16_tc_int32_tc_floats_float"
    expected = (
        "// my header\n"
        "template <typename T, int N, bool FLAG>\n"
        f"[[kernel]] void {name}(\n"
        "  const device float* a [[buffer(0)]],\n"
        "  const constant float16_t* b [[buffer(1)]],\n"
        "  const constant int32_t* c [[buffer(2)]],\n"
        "  const constant int* c_shape [[buffer(3)]],\n"
        "  const constant int64_t* c_strides [[buffer(4)]],\n"
        "  const constant int& c_ndim [[buffer(5)]],\n"
        "  const constant float& s [[buffer(6)]],\n"
        "  device atomic<float>* out [[buffer(7)]],\n"
        "  uint thread_index_in_simdgroup [[thread_index_in_simdgroup]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
    )
    assert expected in printed
    assert f'template [[host_name("{name}")]] [[kernel]] decltype({name}<float, 7, 1>) {name}<float, 7, 1>;' in printed
    # 1 (init) + 1 * 2 * 0.5 + (3 + 2 + 7)
    np.testing.assert_allclose(np.array(out), np.full(4, 14.0))


def test_python_scalars_become_0d_inputs():
    out = run("out[thread_position_in_grid.x] = x * float(n) + (flag ? 1.0f : 0.0f);", [1.5, 2, True],
              [(3,)], [mx.float32], (3, 1, 1), (3, 1, 1), names=["x", "n", "flag"], verbose=False)[0]
    np.testing.assert_allclose(np.array(out), [4.0, 4.0, 4.0])


def test_grid_counts_threads_and_edge_threadgroups_are_partial():
    src = """
        uint i = thread_position_in_grid.x;
        out[i * 4 + 0] = threads_per_threadgroup.x;
        out[i * 4 + 1] = threadgroup_position_in_grid.x;
        out[i * 4 + 2] = thread_position_in_threadgroup.x;
        out[i * 4 + 3] = threadgroups_per_grid.x * 1000 + threads_per_grid.x;
    """
    out = np.array(run(src, [mx.zeros(1)], [(70 * 4,)], [mx.uint32], (70, 1, 1), (32, 1, 1))[0]).reshape(70, 4)
    i = np.arange(70)
    np.testing.assert_array_equal(out[:, 0], np.where(i < 64, 32, 6))
    np.testing.assert_array_equal(out[:, 1], i // 32)
    np.testing.assert_array_equal(out[:, 2], i % 32)
    np.testing.assert_array_equal(out[:, 3], 3 * 1000 + 70)


def test_threadgroup_is_clamped_to_the_grid():
    out = run("out[thread_position_in_grid.x] = threads_per_threadgroup.x * 10 + dispatch_threads_per_threadgroup.x;",
              [mx.zeros(1)], [(5,)], [mx.uint32], (5, 1, 1), (32, 1, 1))[0]
    np.testing.assert_array_equal(np.array(out), [55] * 5)


def test_three_dimensional_positions_and_linear_index():
    src = """
        uint3 p = thread_position_in_grid;
        uint3 g = grid_size;
        uint at = (p.z * g.y + p.y) * g.x + p.x;
        out[at * 3 + 0] = thread_index_in_threadgroup;
        out[at * 3 + 1] = simdgroup_index_in_threadgroup * 100 + thread_index_in_simdgroup;
        out[at * 3 + 2] = (threadgroup_position_in_grid.z * 10 + threadgroup_position_in_grid.y) * 10 + threadgroup_position_in_grid.x;
    """
    grid, tg = (6, 5, 3), (4, 3, 2)
    out = np.array(run(src, [mx.zeros(1)], [(90 * 3,)], [mx.uint32], grid, tg)[0]).reshape(3, 5, 6, 3)
    z, y, x = np.meshgrid(np.arange(3), np.arange(5), np.arange(6), indexing="ij")
    lx, ly, lz = x % 4, y % 3, z % 2
    sx = np.minimum(4, 6 - (x // 4) * 4)
    sy = np.minimum(3, 5 - (y // 3) * 3)
    index = (lz * sy + ly) * sx + lx   # linearised with the actual (partial) threadgroup size
    np.testing.assert_array_equal(out[..., 0], index)
    np.testing.assert_array_equal(out[..., 1], (index // 32) * 100 + index % 32)
    np.testing.assert_array_equal(out[..., 2], ((z // 2) * 10 + y // 3) * 10 + x // 4)


def test_init_value_fills_outputs_the_kernel_does_not_write():
    out = run("if (thread_position_in_grid.x % 2 == 0) out[thread_position_in_grid.x] = 5;",
              [mx.zeros(1)], [(8,)], [mx.int32], (8, 1, 1), (8, 1, 1), init_value=-3)[0]
    np.testing.assert_array_equal(np.array(out), [5, -3] * 4)


@pytest.mark.parametrize("dtype, op, expected", [
    (mx.float32, "atomic_fetch_add_explicit(&out[bin], 0.5f, memory_order_relaxed);", lambda b: np.bincount(b, minlength=8) * 0.5),
    (mx.int32, "atomic_fetch_add_explicit(&out[bin], 1, memory_order_relaxed);", lambda b: np.bincount(b, minlength=8)),
    (mx.uint32, "atomic_fetch_max_explicit(&out[bin], thread_position_in_grid.x, memory_order_relaxed);",
     lambda b: np.array([np.max(np.nonzero(b == k)[0], initial=0) for k in range(8)])),
])
def test_atomic_outputs_across_threadgroups(dtype, op, expected):
    bins = np.random.default_rng(0).integers(0, 8, 4000).astype(np.int32)
    src = f"uint bin = uint(bins[thread_position_in_grid.x]); {op}"
    out = run(src, [mx.array(bins)], [(8,)], [dtype], (4000, 1, 1), (64, 1, 1), names=["bins"],
              atomic_outputs=True, init_value=0)[0]
    np.testing.assert_allclose(np.array(out), expected(bins))


def test_templates_dtype_int_and_bool():
    src = "uint i = thread_position_in_grid.x; T v = T(x[i]) * T(SCALE); out[i] = NEGATE ? -v : v;"
    x = mx.arange(6, dtype=mx.float32)
    for t, scale, neg in ((mx.float16, 3, True), (mx.int32, 2, False)):
        out = run(src, [x], [(6,)], [t], (6, 1, 1), (6, 1, 1), names=["x"],
                  template=[("T", t), ("SCALE", scale), ("NEGATE", neg)])[0]
        np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.arange(6) * scale * (-1 if neg else 1))


def test_strides_buffers_read_a_non_contiguous_input():
    a = mx.arange(48, dtype=mx.float32).reshape(6, 8)[::2, 1::3]    # shape (3, 3), strides (16, 3)
    src = """
        uint e = thread_position_in_grid.x;
        out[e] = inp[elem_to_loc(e, inp_shape, inp_strides, inp_ndim)] + 1000.0f * inp_strides[0] + inp_strides[1];
    """
    out = run(src, [a], [a.shape], [mx.float32], (a.size, 1, 1), (4, 1, 1), names=["inp"],
              ensure_row_contiguous=False)[0]
    np.testing.assert_array_equal(np.array(out), np.array(a) + 16003.0)


def test_row_contiguous_copy_by_default():
    a = mx.arange(48, dtype=mx.float32).reshape(6, 8).T
    out = run("out[thread_position_in_grid.x] = inp[thread_position_in_grid.x];", [a], [a.shape], [mx.float32],
              (a.size, 1, 1), (16, 1, 1), names=["inp"])[0]
    np.testing.assert_array_equal(np.array(out), np.array(a))


def test_argument_count_errors_match_mlx():
    k = emulator.metal_kernel(name="n", input_names=["a", "b"], output_names=["out"], source="")
    with pytest.raises(ValueError, match=re.escape("[metal_kernel] Expected `inputs` to have size 2 but got size 1.")):
        k(inputs=[mx.ones(2)], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))
    with pytest.raises(ValueError, match="Must specify at least one output"):
        emulator.metal_kernel(name="n", input_names=[], output_names=[], source="")


def test_dispatch_limits_worded_as_metal():
    with pytest.raises(EmulatorError, match=re.escape("Thread group size (2048) is greater than  the maximum allowed threads per threadgroup (1024).")):
        run("out[0] = 1;", [mx.zeros(1)], [(1,)], [mx.float32], (2048, 1, 1), (2048, 1, 1))
    src = "threadgroup float a[8192]; threadgroup half b[4224]; uint i = thread_index_in_threadgroup; a[i] = 1; b[i] = 2; out[i] = a[i] + b[i];"
    with pytest.raises(EmulatorError, match=re.escape("Threadgroup memory size (41216) exceeds the maximum threadgroup memory allowed (32768)")):
        run(src, [mx.zeros(1)], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))


def test_device_profile_limits_apply(tmp_path):
    from dataclasses import replace
    from metalforge import devices
    small = replace(devices.get("m1"), name="m1-896", max_threads_per_threadgroup=896)
    k = emulator.metal_kernel(name="lim", input_names=["x"], output_names=["out"], source="out[0] = x[0];",
                              device=small)
    with pytest.raises(EmulatorError, match=r"Thread group size \(1024\).*\(896\)"):
        k(inputs=[mx.zeros(1)], output_shapes=[(1,)], output_dtypes=[mx.float32], grid=(1024, 1, 1),
          threadgroup=(1024, 1, 1))


def test_the_old_import_path_still_works_for_a_release_with_a_deprecation_warning():
    import importlib
    import sys
    for name in [m for m in sys.modules if m.startswith("metalforge.kernels.emulator")]:
        del sys.modules[name]
    with pytest.warns(DeprecationWarning, match="import metalforge.emulator"):
        old = importlib.import_module("metalforge.kernels.emulator")
    assert old.metal_kernel is emulator.metal_kernel
    from metalforge.kernels.emulator.kernel import EmulatorError as Old
    assert Old is EmulatorError
