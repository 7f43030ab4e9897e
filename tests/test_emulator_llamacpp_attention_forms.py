"""The emulator's library entry point on the MSL forms llama.cpp's flash attention uses (each a
small kernel checked against numpy): instantiations over a macro the file #undefs at its end,
clang's range initialiser with a non-zero value, MAXHALF, make_filled_simdgroup_matrix<T, 8>;
threadgroup pointers bounded by the threadgroup's memory; a launch without the race detector;
SIMD-group matrix loads from device memory counted in a trace."""
import numpy as np
import pytest

from metalforge.emulator import EmulatorError
from metalforge.emulator.library import Library

FORMS = """
#include <metal_stdlib>
using namespace metal;

template <typename T, short N>
kernel void fill(device const float * x, device float * out, uint i [[thread_position_in_grid]]) {
    float m[N] = { [0 ... N-1] = -FLT_MAX/2 };
    float s[N] = { [0 ... N - 1] = 0.0f };
    for (short k = 0; k < N; ++k) { m[k] = max(m[k], x[i] * k); s[k] += m[k]; }
    simdgroup_float8x8 z = make_filled_simdgroup_matrix<float, 8>(1.5f);
    out[i] = s[N-1] + (float) MAXHALF + z.thread_elements()[0];
}

#define FILL_TYPES float, 4
typedef decltype(fill<float, 2>) fill_t;
template [[host_name("fill_4")]] kernel fill_t fill<FILL_TYPES>;
#undef FILL_TYPES
"""


def test_llama_cpp_attentions_forms_run():
    """fill<float, 4> through `#define FILL_TYPES` (undefined at the end of the source, before the
    launcher the emulator appends): m[3] = max(-FLT_MAX/2, 3x), s[3] = m[3]; MAXHALF = 65504;
    the filled matrix's elements 1.5."""
    lib = Library(FORMS)
    x = np.array([1.0, -2.0, 0.5, 4.0], np.float32)
    out = np.zeros(4, np.float32)
    lib.function("fill_4")(buffers={0: x, 1: out}, threadgroups=(1, 1, 1), threadgroup=(4, 1, 1))
    np.testing.assert_allclose(out, 3 * x + 65504.0 + 1.5)


ARENA = """
#include <metal_stdlib>
using namespace metal;

kernel void arena(device float * out, threadgroup half * shmem [[threadgroup(0)]],
                  uint i [[thread_index_in_threadgroup]]) {
    threadgroup float4 * s4 = (threadgroup float4 *) (shmem + 8);   // llama.cpp's views of its arena
    s4[i] = float4(1.0f);    // 32 bytes from the host: 16 past the view's start, thread 1 writes past them
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = s4[0].x;
}
"""


@pytest.mark.parametrize("mode", ["checked", "traced"])
def test_a_threadgroup_pointer_past_the_hosts_length_is_named(mode):
    fn = Library(ARENA, mode=mode).function("arena", threadgroup_memory={0: 32})
    with pytest.raises(EmulatorError, match=r"out-of-bounds access to threadgroup array 'threadgroup memory' at "
                                            r"element 2 \(it has 2 elements\)"):
        fn(buffers={0: np.zeros(2, np.float32)}, threadgroups=(1, 1, 1), threadgroup=(2, 1, 1))


LOCKSTEP = """
#include <metal_stdlib>
using namespace metal;

kernel void lockstep(device float * out, threadgroup float * sh [[threadgroup(0)]],
                     ushort lane [[thread_index_in_simdgroup]]) {
    sh[lane] = lane;                 // every lane writes its slot ...
    out[lane] = sh[(lane + 1) % 32]; // ... and reads its neighbour's: no barrier, as llama.cpp does
}
"""


def test_lanes_sharing_threadgroup_memory_without_a_barrier():
    """A SIMD-group sharing threadgroup memory without a barrier (Metal's lanes run in lockstep):
    the detector reports it; Library(races=False) runs it bounds-checked and counted; with
    lockstep=True each lane reads its neighbour's write, as on Metal (lane 0, resumed first,
    would otherwise read lane 1's slot before lane 1 wrote it)."""
    out = np.zeros(32, np.float32)
    with pytest.raises(EmulatorError, match="threadgroup memory race"):
        Library(LOCKSTEP, mode="checked").function("lockstep", threadgroup_memory={0: 128})(
            buffers={0: out}, threadgroups=(1, 1, 1), threadgroup=(32, 1, 1))
    fn = Library(LOCKSTEP, mode="traced", races=False).function("lockstep", threadgroup_memory={0: 128})
    fn(buffers={0: out}, threadgroups=(1, 1, 1), threadgroup=(32, 1, 1))
    assert fn.last_trace.device["out"].footprint_bytes == 128
    fn = Library(LOCKSTEP, mode="checked", races=False, lockstep=True).function("lockstep", threadgroup_memory={0: 128})
    fn(buffers={0: out}, threadgroups=(1, 1, 1), threadgroup=(32, 1, 1))
    np.testing.assert_array_equal(out, (np.arange(32) + 1) % 32)


MATRIX_LOAD = """
#include <metal_stdlib>
using namespace metal;

kernel void load8x8(device const half * src, device float * out, threadgroup float * sh [[threadgroup(0)]],
                    ushort lane [[thread_index_in_simdgroup]]) {
    simdgroup_half8x8 a;
    simdgroup_load(a, src + 8, 16);              // rows of 16 halfs, columns 8..15
    simdgroup_float8x8 b;
    simdgroup_store(a, sh, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_load(b, sh, 8);                    // from threadgroup memory: one fragment operation
    simdgroup_store(b, out, 8);
}
"""


def test_a_matrix_load_from_device_memory_is_traffic_in_a_trace():
    """An 8x8 half tile from a 8 x 16 source: its 8 rows of 16 bytes (the right half of each
    32-byte row) are the source's footprint; the load from threadgroup memory stays a fragment op."""
    src = np.arange(128, dtype=np.float16)
    out = np.zeros(64, np.float32)
    fn = Library(MATRIX_LOAD, mode="traced").function("load8x8", threadgroup_memory={0: 256})
    fn(buffers={0: src, 1: out}, threadgroups=(1, 1, 1), threadgroup=(32, 1, 1))
    np.testing.assert_array_equal(out.reshape(8, 8), src.reshape(8, 16)[:, 8:].astype(np.float32))
    t = fn.last_trace
    assert t.device["src"].footprint_bytes == 8 * 16 and t.matrix_loads == 2
