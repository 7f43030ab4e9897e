"""llama.cpp's FLASH_ATTN_EXT (ggml-metal's vec kernel + reduction, matrix kernel + block map, pad
kernel; llama-cpp-python's sdist) run in the emulator as ggml-metal-ops.cpp dispatches it, against
numpy's softmax(q k^T / sqrt(D) + mask) v."""
import numpy as np
import pytest

from metalforge import devices
from metalforge.errors import MetalforgeError
from metalforge.kernels import llamacpp_attention as A


def _reference(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    kk, vv = (np.repeat(t.astype(np.float64), g, 1) for t in (k, v))
    s = q.astype(np.float64) @ kk.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = s + mask[:, None].astype(np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ vv


def _inputs(B, Hq, Hkv, L, S, D, masked=True, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, L, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, S, D)).astype(np.float16) for _ in range(2))
    mask = None
    if masked:   # some keys masked out (-inf), the rest a bias, as test-backend-ops' random mask
        mask = np.where(rng.random((B, L, S)) < 0.2, -np.inf, 0.5 * rng.standard_normal((B, L, S))).astype(np.float16)
        mask[..., 0] = 0
    return q, k, v, mask


def test_vec_host_side_is_ggml_metals(llamacpp_sources):
    """One decode query over 4,096 keys, D = 128, on an M4 Max (Apple9): 32 workgroups of keys,
    SIMD-groups doubled while 2 x 32 x nsg x 32 < 4096 (nsg = 2), no pad (4096 = 128 x 32), the
    tuning table's Apple9 rows name no f16 128/128 decode bucket: the baseline instance (Q = 1,
    NE = 1). Threadgroup memory (PAD2(128,128) + 4 x 32 + 2 x 128) x Q x nsg halfs = 2,048 B;
    the reduction: one threadgroup of 32 x 32 threads per output row."""
    s = A.Shape(1, 32, 8, 1, 4096, 128)
    main, reduce = A.launches(s, devices.get("m4-max-40"))
    assert main.host_name == "kernel_flash_attn_ext_vec_f16_dk128_dv128"
    assert (main.threadgroups, main.threadgroup, main.threadgroup_memory) == ((1, 32, 32), (32, 2, 1), {0: 2048})
    assert main.constants[422] == 2 and main.constants[423] == 32 and main.constants[404] is False
    assert (int(main.args["ne11"]), int(main.args["ne_12_2"]), int(main.args["nb11"])) == (4096, 8, 256)
    assert main.buffers[7] == "tmp" and reduce.buffers == {1: "tmp", 2: "dst"}
    assert (reduce.host_name, reduce.threadgroups, reduce.threadgroup) == ("kernel_flash_attn_ext_vec_reduce", (32, 1, 1), (1024, 1, 1))
    assert reduce.constants == {500: 128, 501: 32}


def test_vec_configuration_follows_the_tuning_table(llamacpp_sources):
    """ggml-metal-tuning.cpp: fewer than 1,024 keys take the baseline; the M1's (Apple7) f16 64/64
    decode default row is { 1, 4 }: the q1_ne4 instance; the M5 (generation 17) is Apple10."""
    m1 = devices.get("m1")
    assert A.gpu_family(m1) == 7 and A.gpu_family(devices.get("m2-ultra")) == 8
    assert A.gpu_family(devices.get("m3-max-40")) == A.gpu_family(devices.get("m4-max-40")) == 9
    assert A.gpu_family(devices.get("m5-max-40")) == 10
    assert A.vec_config(7, A.Shape(1, 8, 8, 1, 512, 64)) == (1, A.baseline_ne(64, 64)) == (1, 2)
    assert A.vec_config(7, A.Shape(1, 8, 8, 1, 4096, 64)) == (1, 4)
    assert A.launches(A.Shape(1, 8, 8, 1, 4096, 64), m1)[0].host_name == "kernel_flash_attn_ext_vec_f16_dk64_dv64_q1_ne4"


def test_matrix_host_side_is_ggml_metals(llamacpp_sources):
    """100 queries over 1,000 keys: the matrix kernel (ne01 >= 20), 8 queries a threadgroup of 4
    SIMD-groups; 1000 % 64 = 40 keys left: the pad kernel (64 x Hkv threadgroups of 32); the
    mask's block map over ceil(1000 / 64) x ceil(100 / 8) blocks; threadgroup memory
    8 x (128 + 2 x 128 + 4 x 64) halfs = 10,240 B."""
    s = A.Shape(1, 32, 8, 100, 1000, 128)
    pad, blk, main = A.launches(s, devices.get("m3-max-40"))
    assert (pad.host_name, pad.threadgroups, pad.threadgroup, pad.constants) == \
        ("kernel_flash_attn_ext_pad", (64, 8, 1), (32, 1, 1), {100: True, 125: 64})
    assert (blk.threadgroups, blk.constants) == ((16, 13, 1), {224: 8, 225: 64})
    assert main.host_name == "kernel_flash_attn_ext_f16_dk128_dv128"
    assert (main.threadgroups, main.threadgroup, main.threadgroup_memory) == ((13, 32, 1), (32, 4, 1), {0: 10240})
    assert main.constants[304] is True and main.constants[310] is True      # kvpad; mask rows 100 % 8 != 0
    with pytest.raises(MetalforgeError, match="no \\(Q, NE\\) configuration"):
        A.launches(s, devices.get("m3-max-40"), (1, 1))


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D", [
    (1, 4, 2, 1, 100, 64),      # GQA, keys not a multiple of 32: the pad kernel
    (2, 8, 2, 1, 100, 64),      # two batches
    (1, 8, 2, 3, 300, 64),      # three queries
    (1, 2, 1, 1, 256, 32),      # no pad
    (1, 8, 2, 3, 300, 128),     # NE = 1: each lane's own scores; wrong unless the lanes run in lockstep
    (1, 4, 1, 1, 4100, 128),    # 4 SIMD-groups a workgroup
])
def test_vec_matches_numpy(llamacpp_sources, B, Hq, Hkv, L, S, D):
    q, k, v, mask = _inputs(B, Hq, Hkv, L, S, D)
    out, plan = A.run(q, k, v, mask, devices.get("m4-max-40"))
    assert "vec" in plan[-2].host_name and (plan[0].host_name == "kernel_flash_attn_ext_pad") == bool(S % 32)
    np.testing.assert_allclose(out, _reference(q, k, v, mask), atol=2e-3)


@pytest.mark.parametrize("B,Hq,Hkv,L,S,D,masked", [
    (1, 8, 2, 24, 100, 64, True),
    (1, 8, 2, 40, 200, 128, True),
    (1, 4, 4, 32, 128, 64, False),
])
def test_matrix_matches_numpy(llamacpp_sources, B, Hq, Hkv, L, S, D, masked):
    q, k, v, mask = _inputs(B, Hq, Hkv, L, S, D, masked)
    out, plan = A.run(q, k, v, mask, devices.get("m3-max-40"))
    assert plan[-1].host_name == f"kernel_flash_attn_ext_f16_dk{D}_dv{D}"
    np.testing.assert_allclose(out, _reference(q, k, v, mask), atol=2e-3)


def test_the_two_query_vec_kernel_matches_numpy(llamacpp_sources):
    """Q = 2 (the configuration PR 23114's points time): two query rows a threadgroup."""
    q, k, v, mask = _inputs(1, 4, 2, 2, 300, 128)
    out, plan = A.run(q, k, v, mask, devices.get("m2-ultra"), (2, 1))
    assert plan[-2].host_name == "kernel_flash_attn_ext_vec_f16_dk128_dv128_q2_ne1" and plan[-2].threadgroups == (1, 4, 32)
    np.testing.assert_allclose(out, _reference(q, k, v, mask), atol=2e-3)


def test_a_tuning_that_writes_past_its_threadgroup_memory_is_refused(llamacpp_sources):
    """ggml's vec kernel zeroes its output rows with every lane, NE = 4 at D = 64: lane 31 reaches
    float4 31 + 8 of a 32-float4 region, past the 1,024 bytes the host allocates for one SIMD-group
    (Metal does not check; the emulator names it rather than corrupt its own memory)."""
    q, k, v, mask = _inputs(1, 2, 1, 1, 64, 64)
    with pytest.raises(MetalforgeError, match="kernel_flash_attn_ext_vec_f16_dk64_dv64_q1_ne4 writes past the 1024 "
                                              "bytes of threadgroup memory ggml-metal gives it"):
        A.run(q, k, v, mask, devices.get("m4-max-40"), (1, 4))


def test_bad_shapes_are_named(llamacpp_sources):
    with pytest.raises(MetalforgeError, match="Hq = 6 is not a multiple of Hkv = 4"):
        A.Shape(1, 6, 4, 1, 64, 64)
    with pytest.raises(MetalforgeError, match="K/V type 'q8_0' is not bound"):
        A.Shape(1, 4, 4, 1, 64, 64, kv="q8_0")


@pytest.mark.parametrize("shape", [
    dict(B=1, Hq=4, Hkv=2, L=1, S=8196, D=128),    # vec: 4 SIMD-groups, keys scaled from 4,100 (a pad)
    dict(B=1, Hq=4, Hkv=2, L=72, S=600, D=64),     # matrix: queries from 32, keys from 280
])
def test_counters_scaled_from_proxies_match_a_trace_at_the_real_shape(llamacpp_sources, shape):
    """What the fit prices (counters traced at proxy shapes, scaled) against one traced run at the
    shape itself: K and V read once per head (matrix loads from device memory counted), the grid
    and the synchronisation as ggml-metal dispatches them."""
    device = devices.get("m4-max-40")
    s = A.Shape(*(shape[f] for f in ("B", "Hq", "Hkv", "L", "S", "D")))
    scaled = A.counted(shape, device)
    plan = A.launches(s, device)
    q, k, v, mask = _inputs(s.B, s.Hq, s.Hkv, s.L, s.S, s.D, masked=False)
    _, fns = A.execute(s, plan, q, k, v, np.zeros((s.B, s.L, s.S), np.float16), "traced")
    direct = [fn.last_trace for fn in fns]
    assert [c.kernel for c in scaled] == [fn.host_name for fn in fns]
    # whole blocks of keys from K and V, the last S mod C rows copied by the pad kernel and read from its buffer
    block = 32 if s.vec else 64
    main, pad = scaled[-2] if s.vec else scaled[-1], scaled[0]
    assert pad.kernel == "kernel_flash_attn_ext_pad"
    for name in ("k", "v"):
        assert main.features[f"dram_bytes/{name}"] == pytest.approx(s.B * s.Hkv * (s.S - s.S % block) * s.D * 2)
        assert pad.features[f"dram_bytes/{name}"] == pytest.approx(s.B * s.Hkv * (s.S % block) * s.D * 2)
    for c, t in zip(scaled, direct):
        assert c.features["threadgroups"] == t.threadgroups
        assert c.features["barriers"] == pytest.approx(t.barriers * t.threadgroups, rel=0.02)
        assert c.features["simd_functions"] == pytest.approx(t.simd_functions, rel=0.02)
        for name, b in t.device.items():
            # the pad buffer holds K/V rows per head plus mask rows per query, shared by the heads: a
            # sum over axes, which the product of per-axis factors overstates (by 10% here)
            padded = name == "pad" or (c.kernel, name) == ("kernel_flash_attn_ext_pad", "dst")
            rel = 0.12 if padded and not s.vec else 0.02
            assert c.features[f"dram_bytes/{name}"] == pytest.approx(b.footprint_bytes, rel=rel), name
            assert c.features[f"sector_bytes/{name}"] == pytest.approx(32 * b.sectors[32], rel=rel), name


def _flash_points():
    from metalforge.kernels import kernel_measurements
    return [p for p in kernel_measurements.usable(kernel_measurements.load()) if "FLASH_ATTN_EXT" in p.kernel]


def test_the_fit_routes_flash_attn_ext_points_to_ggml_metals_kernels(llamacpp_sources):
    """A published FLASH_ATTN_EXT point names its job (heads, queries, keys, head size); "(Q=2)" in
    its kernel text is the vec configuration it ran; the vec kernel's 2 query rows count for
    decode attention, a matrix kernel's prompt for prefill attention; a point without its head
    counts is left out saying so."""
    from metalforge.kernels.timing import fit
    ultra = [p for p in _flash_points() if p.profile == "m2-ultra"]
    jobs = {p.kernel: fit.job(p) for p in ultra}
    assert sorted(shape["Q"] for _, shape in jobs.values()) == [1, 2]
    op, shape = next(iter(jobs.values()))
    assert op == fit.LLAMA_CPP_ATTENTION_OP and {f: shape[f] for f in fit.ATTENTION_FIELDS} == \
        {"B": 1, "Hq": 32, "Hkv": 4, "L": 2, "S": 16384, "D": 128}
    assert fit.family_of(op, shape) == "decode_attention"
    assert fit.family_of(op, {**shape, "L": 512, "S": 4096}) == "prefill_attention"
    unstated = next(p for p in _flash_points() if p.get("Hq") is None)
    with pytest.raises(MetalforgeError, match="FLASH_ATTN_EXT's B, Hq, Hkv not stated"):
        fit.job(unstated)
    (q2,) = [s for s in jobs.values() if s[1]["Q"] == 2]
    kernels = [c.kernel for c in fit.counted(*q2, "float16", devices.get("m2-ultra"))]
    assert kernels == ["kernel_flash_attn_ext_vec_f16_dk128_dv128_q2_ne1", "kernel_flash_attn_ext_vec_reduce"]
