"""The MSL the emulator runs: types, vectors, math, threadgroup memory, SIMD functions, matrices."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge import emulator


def kernel(source, inputs, shape, dtype=mx.float32, grid=None, tg=(32, 1, 1), names=None, header="", **kw):
    names = names or [f"in{i}" for i in range(len(inputs))]
    k = emulator.metal_kernel(name="msl", input_names=names, output_names=["out"], source=source, header=header)
    n = int(np.prod(shape))
    return np.array(k(inputs=inputs, output_shapes=[shape], output_dtypes=[dtype], grid=grid or (n, 1, 1),
                      threadgroup=tg, **kw)[0].astype(mx.float32))


def test_scalar_types():
    src = """
        uint i = thread_position_in_grid.x;
        half h = half(2.5f);
        bfloat16_t b = bfloat16_t(3.0f);
        float16_t f16 = h * h;                    // half * half stays half
        int8_t i8 = int8_t(-100); uint8_t u8 = uint8_t(250);
        int16_t i16 = int16_t(-30000); uint16_t u16 = uint16_t(60000);
        int64_t i64 = int64_t(1) << 40; uint64_t u64 = ~uint64_t(0);
        size_t sz = sizeof(half) + sizeof(bfloat) + sizeof(float);
        bool t = u8 > 200;
        ushort us = 7; uchar uc = 9; ulong ul = 11;
        float v[8] = {float(f16), float(b * b), float(i8 + u8), float(i16) + float(u16), float(i64 >> 38),
                      float(u64 >> 62), float(sz + (t ? 100 : 0)), float(us + uc + ul)};
        out[i] = v[i];
    """
    out = kernel(src, [mx.zeros(1)], (8,), tg=(8, 1, 1))
    np.testing.assert_array_equal(out, [6.25, 9.0, 150.0, 30000.0, 4.0, 3.0, 108.0, 27.0])


def test_half_and_bfloat_round_like_their_formats():
    x = mx.array([1.0001, 3.14159265, 65504.0, 1e-3], dtype=mx.float32)
    src = """
        uint i = thread_position_in_grid.x;
        out[2 * i] = float(half(x[i]));
        out[2 * i + 1] = float(bfloat16_t(x[i]));
    """
    out = kernel(src, [x], (8,), names=["x"], grid=(4, 1, 1), tg=(4, 1, 1)).reshape(4, 2)
    np.testing.assert_array_equal(out[:, 0], np.array(x.astype(mx.float16).astype(mx.float32)))
    np.testing.assert_array_equal(out[:, 1], np.array(x.astype(mx.bfloat16).astype(mx.float32)))


def test_vectors_constructors_swizzles_and_arithmetic():
    src = """
        float2 a = float2(1.0f, 2.0f);
        float4 v = float4(a, 3.0f, 4.0f);
        float3 w = v.zyx;                         // (3, 2, 1)
        v.xy = v.yx;                              // (2, 1, 3, 4)
        v.zw += float2(10.0f);                    // (2, 1, 13, 14)
        float4 s = v * 2.0f + float4(w, 0.0f);    // (7, 4, 27, 28)
        int4 iv = int4(s) / 2;                    // (3, 2, 13, 14)
        half4 h = half4(s.wzyx);                  // (28, 27, 4, 7)
        bool4 gt = s > float4(5.0f);              // (1, 0, 1, 1)
        float4 sel = select(float4(-1.0f), s, gt);
        packed_float3 p = packed_float3(1.0f, 2.0f, 3.0f);
        float vals[20] = {s.x, s.y, s.z, s.w, float(iv.x), float(iv.y), float(iv.z), float(iv.w),
                          float(h.x), float(h[3]), sel.x, sel.y, sel.z, float(all(gt)), float(any(gt)),
                          float(sizeof(float3)), float(sizeof(packed_float3)), float(p[2]), dot(w, w), length(float2(3.0f, 4.0f))};
        out[thread_position_in_grid.x] = vals[thread_position_in_grid.x];
    """
    out = kernel(src, [mx.zeros(1)], (20,), tg=(20, 1, 1))
    np.testing.assert_array_equal(out, [7, 4, 27, 28, 3, 2, 13, 14, 28, 7, 7, -1, 27, 0, 1, 16, 12, 3, 14, 5])


def test_math_library_against_numpy():
    x = mx.array(np.linspace(0.1, 3.0, 64, dtype=np.float32))
    src = """
        uint i = thread_position_in_grid.x;
        float v = x[i];
        float r[12] = {metal::exp(v), log(v), sqrt(v), rsqrt(v), tanh(v), pow(v, 1.5f), fma(v, 2.0f, 1.0f),
                       clamp(v, 0.5f, 2.0f), min(v, 1.0f), max(v, 1.0f), floor(v) + fract(v),
                       precise::exp(v) - fast::exp(v) + metal::precise::sqrt(v)};
        for (int k = 0; k < 12; k++) out[i * 12 + k] = r[k];
    """
    out = kernel(src, [x], (64 * 12,), names=["x"], grid=(64, 1, 1)).reshape(64, 12)
    v = np.array(x)
    expected = np.stack([np.exp(v), np.log(v), np.sqrt(v), 1 / np.sqrt(v), np.tanh(v), v ** 1.5, v * 2 + 1,
                         np.clip(v, 0.5, 2.0), np.minimum(v, 1), np.maximum(v, 1), v, np.sqrt(v)], axis=1)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-6)


def test_as_type_reinterprets_bits():
    x = mx.array([1.0, -2.5, 3e-8], dtype=mx.float32)
    out = emulator.metal_kernel(name="bits", input_names=["x"], output_names=["out"],
                                source="out[thread_position_in_grid.x] = as_type<uint>(x[thread_position_in_grid.x]);")(
        inputs=[x], output_shapes=[(3,)], output_dtypes=[mx.uint32], grid=(3, 1, 1), threadgroup=(3, 1, 1))[0]
    np.testing.assert_array_equal(np.array(out), np.array(x).view(np.uint32))


def test_limits_and_address_space_qualifiers():
    src = """
        thread float local = Limits<float>::finite_max;
        constant float k = 2.0f;
        out[0] = local == FLT_MAX ? k : 0.0f;
        out[1] = float(Limits<half>::finite_max);
        out[2] = Limits<float>::min;
        out[3] = float(Limits<int>::max);
    """
    out = kernel(src, [mx.zeros(1)], (4,), grid=(1, 1, 1), tg=(1, 1, 1))
    np.testing.assert_array_equal(out, [2.0, 65504.0, -np.inf, np.float32(2**31 - 1)])


@pytest.mark.parametrize("metal,dtype", [("float", mx.float32), ("half", mx.float16), ("bfloat", mx.bfloat16)])
def test_numeric_limits_of_the_floating_types(metal, dtype):
    """metal::numeric_limits<T> against MLX's finfo of the same format."""
    src = f"""
        typedef numeric_limits<{metal}> L;
        out[0] = float(L::max()); out[1] = float(L::min()); out[2] = float(L::lowest());
        out[3] = float(L::epsilon()); out[4] = float(L::infinity()); out[5] = isnan(float(L::quiet_NaN())) ? 1.0f : 0.0f;
    """
    out = kernel(src, [mx.zeros(1)], (6,), grid=(1, 1, 1), tg=(1, 1, 1))
    f = mx.finfo(dtype)
    np.testing.assert_array_equal(out, np.array([f.max, f.smallest_normal, f.min, f.eps, np.inf, 1.0], np.float32))


HEADER = """
// A helper taking threadgroup memory by pointer, as MLX kernels do.
inline float tree_sum(threadgroup float* buf, uint i, uint n) {
    for (uint stride = n / 2; stride > 0; stride /= 2) {
        if (i < stride) buf[i] += buf[i + stride];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    return buf[0];
}
"""


def test_threadgroup_arrays_are_shared_per_threadgroup_and_private_between_them():
    x = mx.arange(512, dtype=mx.float32)
    src = """
        uint i = thread_index_in_threadgroup;
        threadgroup float buf[128];
        buf[i] = x[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
        float total = tree_sum(buf, i, 128);
        if (i == 0) out[threadgroup_position_in_grid.x] = total;
    """
    out = kernel(src, [x], (4,), names=["x"], grid=(512, 1, 1), tg=(128, 1, 1), header=HEADER)
    np.testing.assert_array_equal(out, np.arange(512).reshape(4, 128).sum(1))


def lanes(src, x, tg=64, dtype=mx.float32):
    return kernel(src, [x], (x.size,), names=["x"], dtype=dtype, tg=(tg, 1, 1))


@pytest.mark.parametrize("fn, ref", [
    ("simd_sum", lambda g: np.full_like(g, g.sum())),
    ("simd_max", lambda g: np.full_like(g, g.max())),
    ("simd_min", lambda g: np.full_like(g, g.min())),
    ("simd_product", lambda g: np.full_like(g, np.prod(g))),
    ("simd_prod", lambda g: np.full_like(g, np.prod(g))),
    ("simd_prefix_inclusive_sum", np.cumsum),
    ("simd_prefix_exclusive_sum", lambda g: np.cumsum(g) - g),
    ("simd_broadcast_first", lambda g: np.full_like(g, g[0])),
])
def test_simd_reductions_per_simdgroup_including_a_partial_one(fn, ref):
    x = mx.array(np.random.default_rng(1).uniform(0.5, 1.5, 72).astype(np.float32))
    out = lanes(f"uint i = thread_position_in_grid.x; out[i] = {fn}(x[i]);", x, tg=40)
    xs = np.array(x)
    # threadgroups of 40 threads: SIMD-groups of 32 and 8 lanes; the last threadgroup has 32 threads
    groups = [(0, 32), (32, 40), (40, 72)]
    expected = np.concatenate([ref(xs[a:b]) for a, b in groups])
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("expr, src_lane", [
    ("simd_shuffle(v, (lane * 7) % 32)", lambda l: (l * 7) % 32),
    ("simd_shuffle_xor(v, 5)", lambda l: l ^ 5),
    ("simd_shuffle_up(v, 3)", lambda l: l - 3 if l >= 3 else l),
    ("simd_shuffle_down(v, 3)", lambda l: l + 3 if l + 3 < 32 else l),
    ("simd_broadcast(v, 9)", lambda l: 9),
])
def test_simd_shuffles(expr, src_lane):
    x = mx.arange(64, dtype=mx.float32) * 10
    out = lanes(f"uint lane = thread_index_in_simdgroup; float v = x[thread_position_in_grid.x]; "
                f"out[thread_position_in_grid.x] = {expr};", x)
    expected = [10 * (32 * (i // 32) + src_lane(i % 32)) for i in range(64)]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("expr, ref", [
    ("quad_sum(v)", lambda q, i: q.sum()),
    ("quad_max(v)", lambda q, i: q.max()),
    ("quad_min(v)", lambda q, i: q.min()),
    ("quad_shuffle(v, 3 - thread_index_in_quadgroup)", lambda q, i: q[3 - i]),
    ("quad_shuffle_xor(v, 1)", lambda q, i: q[i ^ 1]),
    ("quad_shuffle_down(v, 1)", lambda q, i: q[i + 1] if i < 3 else q[i]),
    ("quad_broadcast(v, 2)", lambda q, i: q[2]),
])
def test_quad_group_functions(expr, ref):
    x = mx.array(np.random.default_rng(5).uniform(-1, 1, 64).astype(np.float32))
    out = lanes(f"float v = x[thread_position_in_grid.x]; out[thread_position_in_grid.x] = {expr};", x)
    xs = np.array(x)
    expected = [ref(xs[4 * (k // 4):4 * (k // 4) + 4], k % 4) for k in range(64)]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_simd_votes_and_vector_operands():
    x = mx.arange(64, dtype=mx.float32)
    src = """
        uint i = thread_position_in_grid.x;
        float2 v = float2(x[i], 1.0f);
        float2 s = simd_sum(v);
        bool big = x[i] > 40.0f;
        out[i] = s.x + s.y * 10000.0f + (simd_any(big) ? 1e6f : 0.0f) + (simd_all(x[i] >= 0.0f) ? 1e7f : 0.0f);
    """
    out = lanes(src, x)
    first = sum(range(32)) + 320000 + 1e7
    second = sum(range(32, 64)) + 320000 + 1e6 + 1e7
    np.testing.assert_array_equal(out, [first] * 32 + [second] * 32)


def test_simdgroup_barrier_and_divergent_simd_calls():
    x = mx.arange(32, dtype=mx.float32)
    src = """
        uint lane = thread_index_in_simdgroup;
        float r;
        if (lane < 8) r = simd_sum(x[lane]);        // only lanes 0-7 are active here
        else r = simd_max(x[lane]);                 // lanes 8-31
        simdgroup_barrier(mem_flags::mem_none);
        out[lane] = r;
    """
    out = lanes(src, x, tg=32)
    np.testing.assert_array_equal(out, [sum(range(8))] * 8 + [31.0] * 24)


@pytest.mark.parametrize("mtype, dtype", [("float", mx.float32), ("half", mx.float16)])
def test_simdgroup_matrix_multiply_accumulate(mtype, dtype):
    rng = np.random.default_rng(2)
    a = mx.array(rng.standard_normal((16, 8)).astype(np.float32)).astype(dtype)
    b = mx.array(rng.standard_normal((8, 8)).astype(np.float32)).astype(dtype)
    src = f"""
        simdgroup_{mtype}8x8 ma, mb;
        simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
        threadgroup {mtype} tile[128];
        for (uint i = thread_index_in_simdgroup; i < 128; i += 32) tile[i] = a[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_load(ma, tile, 8, ulong2(0, 8));        // rows 8..15 of a
        simdgroup_load(mb, b, 8, ulong2(0, 0), true);     // b transposed
        simdgroup_multiply_accumulate(acc, ma, mb, acc);
        acc.thread_elements()[0] += 100.0f;               // each lane edits its own element
        simdgroup_store(acc, out, 8);
    """
    out = kernel(src, [a, b], (8, 8), names=["a", "b"], tg=(32, 1, 1), grid=(32, 1, 1))
    an, bn = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    expected = an[8:] @ bn.T + 1.0
    # lane l owns row (q & 4) + (l / 2) % 4 and column (q & 2) * 2 + (l % 2) * 2, q = l / 4
    for lane in range(32):
        q = lane // 4
        expected[(q & 4) + (lane // 2) % 4, (q & 2) * 2 + (lane % 2) * 2] += 100.0
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
