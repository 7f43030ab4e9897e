"""Errors the emulator reports: divergent barriers, compile errors, a missing compiler, and the
checked mode's out-of-bounds and race reports (which Metal itself never gives)."""
import re

import mlx.core as mx
import numpy as np
import pytest

from metalforge.errors import MetalforgeError
from metalforge import emulator
from metalforge.emulator import CompileError, EmulatorError
from metalforge.emulator import compiler


def launch(source, checked=None, n=64, tg=64, name="k"):
    k = emulator.metal_kernel(name=name, input_names=["x"], output_names=["out"], source=source, checked=checked)
    return k(inputs=[mx.arange(n, dtype=mx.float32)], output_shapes=[(n,)], output_dtypes=[mx.float32],
             grid=(n, 1, 1), threadgroup=(tg, 1, 1))[0]


def test_barrier_not_reached_by_every_thread():
    src = """
        uint i = thread_index_in_threadgroup;
        if (i < 10) return;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = x[i];
    """
    with pytest.raises(EmulatorError) as e:
        launch(src, name="diverge")
    msg = str(e.value)
    assert "custom_kernel_diverge" in msg and "barrier on line 8 is not reached by every live thread" in msg
    assert "(10,0,0)" in msg and "already returned" in msg and "(0,0,0)" in msg


def test_threads_waiting_at_different_barriers():
    src = """
        uint i = thread_index_in_threadgroup;
        if (i % 2 == 0) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
        } else {
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        out[i] = x[i];
    """
    with pytest.raises(EmulatorError, match=r"divergent barrier: threads \(0,0,0\).*line 8 while threads \(1,0,0\).*line 10"):
        launch(src)


def test_partial_threadgroups_only_wait_for_live_threads():
    src = """
        uint i = thread_index_in_threadgroup;
        threadgroup float buf[64];
        buf[i] = x[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = buf[(i + 1) % threads_per_threadgroup.x];
    """
    out = np.array(launch(src, n=100, tg=64))
    x = np.arange(100)
    expected = np.concatenate([np.roll(x[:64], -1), np.roll(x[64:], -1)])
    np.testing.assert_array_equal(out, expected)


def test_compile_error_names_kernel_and_msl_line():
    with pytest.raises(CompileError) as e:
        launch("uint i = thread_position_in_grid.x;\nout[i] = x[i] + undefined_thing;", name="broken")
    msg = str(e.value)
    assert "custom_kernel_broken" in msg
    assert re.search(r"line 6: .*undefined_thing.*not declared", msg)
    assert "out[i] = x[i] + undefined_thing;" in msg


def test_missing_compiler_is_a_one_line_error(monkeypatch):
    compiler.compiler.cache_clear()
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        with pytest.raises(MetalforgeError) as e:
            compiler.compiler()
        assert "no C++ compiler found" in str(e.value) and "apt-get install g++" in str(e.value)
        assert "\n" not in str(e.value)
    finally:
        monkeypatch.undo()
        compiler.compiler.cache_clear()


def test_checked_mode_reports_out_of_bounds_device_reads():
    with pytest.raises(EmulatorError) as e:
        launch("uint i = thread_position_in_grid.x;\nout[i] = x[i + 1];", checked=True, name="oob")
    msg = str(e.value)
    assert "out-of-bounds access to device buffer 'x' at element 64 (it has 64 elements)" in msg
    assert "thread (63,0,0)" in msg and "line 6" in msg


def test_checked_mode_reports_out_of_bounds_device_writes():
    with pytest.raises(EmulatorError, match=r"device buffer 'out' at element -1 .* thread \(0,0,0\).* line 7"):
        launch("uint i = thread_position_in_grid.x;\nint j = int(i) - 1;\nout[j] = x[i];", checked=True)


def test_checked_mode_follows_a_reinterpret_cast_device_pointer():
    """A buffer read through another element type (as MLX's and our kernels do for packed words
    and vector loads) runs in checked mode, and its bounds are counted in the new type."""
    src = """
        uint i = thread_position_in_grid.x;
        const device float2* pairs = reinterpret_cast<const device float2*>(x);
        out[i] = pairs[i / 2][i % 2] + pairs[{step}][0];
    """
    np.testing.assert_array_equal(np.array(launch(src.replace("{step}", "0"), checked=True, name="pairs")),
                                  np.arange(64, dtype=np.float32))
    with pytest.raises(EmulatorError, match=r"device buffer 'x' at element 32 \(it has 32 elements\)"):
        launch(src.replace("{step}", "32"), checked=True, name="pairs_oob")


def test_checked_mode_reports_out_of_bounds_threadgroup_access():
    src = """
        uint i = thread_index_in_threadgroup;
        threadgroup float buf[4][16];
        buf[i / 16][i % 16] = x[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = buf[i / 8][0];
    """
    with pytest.raises(EmulatorError, match=r"threadgroup array .*'buf' at element 4 .*thread \(32,0,0\).* line 10"):
        launch(src, checked=True)


def test_checked_mode_reports_a_missing_barrier_as_a_race():
    src = """
        uint i = thread_index_in_threadgroup;
        threadgroup float buf[64];
        buf[i] = x[i];
        out[i] = buf[(i + 1) % 64];
    """
    with pytest.raises(EmulatorError) as e:
        launch(src, checked=True, name="race")
    msg = str(e.value)
    assert "threadgroup memory race on buf[1]" in msg
    assert "thread (0,0,0) read it at line 9" in msg and "thread (1,0,0) wrote it at line 8" in msg


def test_checked_mode_reports_write_write_races():
    src = """
        uint i = thread_index_in_threadgroup;
        threadgroup float total[1];
        total[0] = x[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = total[0];
    """
    with pytest.raises(EmulatorError, match=r"race on total\[0\].*wrote it at line 8.*wrote it at line 8"):
        launch(src, checked=True)


def test_checked_mode_accepts_correct_kernels_and_matches_unchecked():
    src = """
        uint i = thread_index_in_threadgroup;
        threadgroup float buf[64];
        buf[i] = x[i] * 2.0f;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = buf[63 - i];
    """
    checked = np.array(launch(src, checked=True))
    np.testing.assert_array_equal(checked, np.array(launch(src)))
    np.testing.assert_array_equal(checked, (63 - np.arange(64)) * 2.0)


def test_checked_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("METALFORGE_EMULATOR_CHECKED", "1")
    with pytest.raises(EmulatorError, match="out-of-bounds"):
        launch("out[thread_position_in_grid.x] = x[thread_position_in_grid.x + 64];")
