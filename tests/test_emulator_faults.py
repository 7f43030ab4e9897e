"""A kernel's fault is an exception, never a dead Python process: each case runs in a subprocess,
so a regression fails this test instead of killing pytest."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PRELUDE = textwrap.dedent("""
    import mlx.core as mx
    from metalforge import emulator
    from metalforge.emulator.kernel import EmulatorError

    def run(src, inp, dtype, checked=None, timeout=None):
        k = emulator.metal_kernel(name="fault", input_names=["inp"], output_names=["out"], source=src,
                                  checked=checked, timeout=timeout)
        return k(inputs=[inp], grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(64,)],
                 output_dtypes=[dtype])[0]

    ints = mx.arange(64).astype(mx.int32)
    floats = mx.arange(64).astype(mx.float32)
""")


def script(body: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=240, **kw)


DIV = "uint i = thread_position_in_grid.x; out[i] = 100 / (inp[i] - int(i));"


def test_integer_division_by_zero_gives_a_value_as_a_gpu_does():
    run = script(f"""
        out = run({DIV!r}, ints, mx.int32)
        print("values", sorted(set(out.tolist())))
    """)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "values [0]" in run.stdout


def test_integer_division_by_zero_is_reported_in_checked_mode_with_thread_and_line():
    run = script(f"""
        try:
            run({DIV!r}, ints, mx.int32, checked=True)
        except EmulatorError as e:
            print("ERROR", e)
    """)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ERROR" in run.stdout and "integer division by zero" in run.stdout
    # line 5 of the generated MSL (what verbose=True prints): MLX's signature takes the first four
    # (every thread divides by zero here: which one is reported first depends on the schedule)
    assert "custom_kernel_fault" in run.stdout
    assert re.search(r"thread \(\d+,0,0\) of threadgroup \(\d+,0,0\) at line 5", run.stdout), run.stdout


@pytest.mark.parametrize("checked", [False, True])
def test_private_memory_over_the_thread_stack_is_an_error_naming_kernel_and_size(checked):
    src = ("uint i = thread_position_in_grid.x; float big[100000]; "
           "for (int j = 0; j < 100000; j++) big[j] = inp[i] + j; out[i] = big[i * 7];")
    run = script(f"""
        try:
            run({src!r}, floats, mx.float32, checked={checked})
        except EmulatorError as e:
            print("ERROR", e)
        print("alive")
    """)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "custom_kernel_fault" in run.stdout and "private memory overflow" in run.stdout and "64 KiB" in run.stdout
    assert "alive" in run.stdout


def test_an_out_of_bounds_write_is_an_error_naming_the_buffer_not_heap_corruption():
    run = script("""
        for src in ("uint i = thread_position_in_grid.x; out[i + 70] = inp[i];",
                    "uint i = thread_position_in_grid.x; out[int(i) - 1000] = inp[i];"):
            try:
                run(src, floats, mx.float32)
            except EmulatorError as e:
                print("ERROR", "out-of-bounds write to device buffer 'out'" in str(e))
        ok = run("uint i = thread_position_in_grid.x; out[i] = inp[i] * 2;", floats, mx.float32)
        print("after", ok.tolist() == [2.0 * i for i in range(64)])
    """)
    assert run.returncode == 0, run.stderr[-2000:]
    # one error per kernel (naming the buffer), however many of its threadgroups faulted
    assert run.stdout.count("ERROR True") == 2, run.stdout
    assert "after True" in run.stdout, "the process and later kernels are intact"


def test_an_out_of_bounds_read_near_a_buffer_returns_zeros():
    run = script("""
        out = run("uint i = thread_position_in_grid.x; out[i] = inp[i + 1024];", floats, mx.float32)
        print("values", sorted(set(out.tolist())))
    """)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "values [0.0]" in run.stdout


ENDLESS = "uint i = thread_position_in_grid.x; float x = inp[i]; while (true) { x = x * 1.0001f; } out[i] = x;"


def test_an_endless_kernel_is_stopped_by_its_time_limit_argument_and_environment():
    run = script(f"""
        import time
        for timeout in (0.5, None):
            start = time.time()
            try:
                run({ENDLESS!r}, floats, mx.float32, timeout=timeout)
            except EmulatorError as e:
                print("ERROR", round(time.time() - start, 1), e)
    """, env={**os.environ, "METALFORGE_EMULATOR_TIMEOUT_S": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 2 and all("ran past its time limit" in line for line in lines)
    assert "limit of 0.5 s" in lines[0] and "limit of 1 s" in lines[1]
    assert all(float(line.split()[1]) < 5 for line in lines)


def test_ctrl_c_interrupts_a_running_kernel_within_a_second():
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(f"""
        import sys, time
        emulator.metal_kernel(name="fault", input_names=["inp"], output_names=["out"], source={ENDLESS!r}).prepare(
            inputs=[floats], output_dtypes=[mx.float32])   # compiled before the signal can come
        print("running", flush=True)
        try:
            run({ENDLESS!r}, floats, mx.float32)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "running"
    time.sleep(1.0)     # compiled above, so running by now
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted" in out and time.time() - sent < 5
