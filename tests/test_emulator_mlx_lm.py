"""Every Metal kernel shipped in the installed mlx-lm runs in the emulator, unchanged, and matches an
independent reference: mlx-lm's own ops path where it has one (gated delta, SSM, RWKV-7, the
distillation losses and their gradients), else the kernel's documented formula in numpy.
(test_emulator_conformance.py checks that all of them pass the front end.)"""
import contextlib
import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from metalforge import emulator
from metalforge.emulator.kernel import EmulatedKernel

pytest.importorskip("mlx_lm")


@contextlib.contextmanager
def on_gpu():
    """mx.default_device() answers mx.gpu, for code that asks before taking its kernel path (the
    ops still run where MLX runs them; only the question is answered differently)."""
    default_device = mx.default_device
    mx.default_device = lambda: mx.gpu
    try:
        yield
    finally:
        mx.default_device = default_device


@contextlib.contextmanager
def emulated(name: str):
    """The mlx-lm module reloaded with the emulator as Metal (its kernels are made at import, and
    only where Metal is available), and reloaded back to the real thing afterwards."""
    import mlx_lm.utils as utils
    module = importlib.import_module(name)
    can_run_metal = utils.can_run_metal
    utils.can_run_metal = lambda: True   # mlx-lm's losses also ask for the GPU device
    try:
        with emulator.patch(metal_available=True):
            importlib.reload(module)
        assert any(isinstance(v, EmulatedKernel) for v in vars(module).values()), "its kernels are the emulator's"
        yield module
    finally:
        utils.can_run_metal = can_run_metal
        importlib.reload(module)


def normal(*shape, scale=1.0, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * scale


def uniform(*shape, lo=0.0, hi=1.0, seed=0):
    return mx.random.uniform(lo, hi, shape, key=mx.random.key(seed))


def close(got, want, tol=2e-5):
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=tol, atol=tol)


def rms(x, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


# ---- mlx_lm.kernels: fused kernels without an ops path, against their documented formulas ------
def test_qk_norm_and_qk_norm_rope():
    N, L, HQ, HK, D = 2, 3, 4, 2, 64
    qkvg = normal(N, L, 2 * (HQ + HK) * D)
    args = dict(n_heads=HQ, n_kv_heads=HK, head_dim=D, eps=1e-6, query_scale=0.125)
    rows = rms(np.array(qkvg).reshape(N, L, 2 * (HQ + HK), D)[:, :, :HQ + HK], 1e-6)
    with emulated("mlx_lm.kernels.qk_norm") as m:
        q, k = m.qk_norm(qkvg, **args)
    close(q, rows[:, :, :HQ] * 0.125)
    close(k, rows[:, :, HQ:])
    with emulated("mlx_lm.kernels.qk_norm_rope") as m:
        q, k = m.qk_norm_rope(qkvg, **args, rope_base=10000.0, offset=5)

    def rope(x):   # MLX's own rope on (N, heads, L, D): positions 5, 6, 7
        t = mx.array(x).transpose(0, 2, 1, 3)
        return np.array(mx.fast.rope(t, D, traditional=True, base=10000.0, scale=1.0, offset=5).transpose(0, 2, 1, 3))
    close(q, rope(rows[:, :, :HQ] * 0.125), 1e-4)
    close(k, rope(rows[:, :, HQ:]), 1e-4)


def test_rms_norm_sigmoid_gate():
    B, H, L, D = 2, 3, 4, 64
    x, gate = normal(B, H, L, D), normal(B, L, H * D, seed=1)
    with emulated("mlx_lm.kernels.rms_norm_sigmoid_gate") as m:
        got = m.rms_norm_sigmoid_gate(x, gate, eps=1e-5)
    normed = rms(np.array(x), 1e-5).transpose(0, 2, 1, 3).reshape(B, L, H * D)
    close(got, normed / (1 + np.exp(-np.array(gate))))


def test_expert_routing():
    N, E, K = 5, 40, 4
    logits, bias = normal(N, E), normal(E, scale=0.1, seed=1)
    with emulated("mlx_lm.kernels.expert_routing") as m:
        inds, weights = m.expert_routing(logits, bias, top_k=K, multiplier=1.5, score_eps=1e-20, route_scale=2.0)
    score = 1 / (1 + np.exp(-np.array(logits) * 1.5))
    order = np.argsort(-(score + np.array(bias)), axis=-1, kind="stable")[:, :K]
    chosen = np.take_along_axis(score, order, -1)
    np.testing.assert_array_equal(np.array(inds), order)
    close(weights, chosen / (chosen.sum(-1, keepdims=True) + 1e-20) * 2.0)


@pytest.mark.parametrize("post_scale,next_norm", [(True, True), (False, False)])
def test_norm_add_norm_and_pre_norm(post_scale, next_norm):
    N, D = 3, 96
    branch, stream = normal(N, D), normal(N, D, seed=1)
    alpha, beta, post_w = uniform(D, seed=2), uniform(D, seed=3), uniform(D, lo=0.5, hi=1.5, seed=4)
    norm = nn.RMSNorm(D, eps=1e-5)
    norm.weight = uniform(D, lo=0.5, hi=1.5, seed=5)
    with emulated("mlx_lm.kernels.norm_add_norm") as m:
        new_stream, normed = m.norm_add_norm(branch, stream, alpha=alpha, beta=beta,
                                             post_weight=post_w if post_scale else None, post_eps=1e-6,
                                             next_norm=norm if next_norm else None)
        pre = m.pre_norm(stream, norm, dtype=mx.float32)
    v = np.array(branch) * (np.array(post_w) if post_scale else 1)
    want = np.array(alpha) * np.array(stream) + np.array(beta) * rms(v, 1e-6)
    close(new_stream, want)
    if next_norm:
        close(normed, rms(want, 1e-5) * np.array(norm.weight))
    else:
        assert normed is None
    close(pre, rms(np.array(stream), 1e-5) * np.array(norm.weight))


def test_post_expert_norm_combine():
    N, K, D = 3, 4, 80
    experts, weights, w = normal(N, K, D), uniform(N, K, seed=1), uniform(D, lo=0.5, hi=1.5, seed=2)
    with emulated("mlx_lm.kernels.post_expert_norm_combine") as m:
        got = m.post_expert_norm_combine(experts, weights, norm_weight=w, eps=1e-6)
    v = np.array(experts) * np.array(w)
    close(got, (rms(v, 1e-6) * np.array(weights)[..., None]).sum(-2))


# ---- model kernels with mlx-lm's own ops path as the reference -----------------------------------
def _gated_delta_inputs(B=2, T=3, Hk=2, Hv=4, Dk=32, Dv=8, vector_gate=False, dtype=mx.float32):
    q, k = normal(B, T, Hk, Dk, scale=0.2), normal(B, T, Hk, Dk, scale=0.2, seed=1)
    v = normal(B, T, Hv, Dv, seed=2)
    g = uniform(*((B, T, Hv, Dk) if vector_gate else (B, T, Hv)), lo=0.6, hi=1.0, seed=3)
    beta = uniform(B, T, Hv, seed=4)
    state = normal(B, Hv, Dv, Dk, scale=0.1, seed=5)
    return [x.astype(dtype) for x in (q, k, v)] + [g, beta, state]


@pytest.mark.parametrize("vector_gate,masked", [(False, False), (False, True), (True, False), (True, True)])
def test_gated_delta_kernels(vector_gate, masked):
    inputs = _gated_delta_inputs(vector_gate=vector_gate)
    mask = mx.array([[True, True, False], [True, False, True]]) if masked else None
    with emulated("mlx_lm.models.gated_delta") as m:
        y, state = m.gated_delta_kernel(*inputs, mask)
        want_y, want_state = m.gated_delta_ops(*inputs, mask)
    if masked:   # the kernel writes 0 at a masked (padding) step; the ops path computes it anyway
        want_y = want_y * mask[..., None, None]
    close(y, want_y, 1e-4)
    close(state, want_state, 1e-4)


def test_gated_delta_packed_and_explicit_tree_kernels():
    inputs = _gated_delta_inputs(B=1, T=2, Hk=1, Hv=2, Dk=128, Dv=16)
    with emulated("mlx_lm.models.gated_delta") as m:
        packed = m.gated_delta_kernel(*inputs)       # Dk 128, scalar float32 gate: the packed kernel
        tree = m.gated_delta_kernel_xtree(*inputs)
        want = m.gated_delta_ops(*inputs)
    for got in (packed, tree):
        close(got[0], want[0], 1e-4)
        close(got[1], want[1], 1e-4)


def test_ssm_update_kernel():
    n, h, d, groups, ds = 2, 4, 16, 2, 64
    x, B, C = normal(n, 1, h, d), normal(n, 1, groups, ds, seed=1), normal(n, 1, groups, ds, seed=2)
    A_log, D, dt, dt_bias = normal(h, scale=0.5, seed=3), normal(h, seed=4), normal(n, 1, h, seed=5), normal(h, seed=6)
    state = normal(n, h, d, ds, scale=0.1, seed=7)
    with emulated("mlx_lm.models.ssm") as m:
        y, new_state = m.ssm_update_kernel(x, A_log, B, C, D, dt, dt_bias, state, (0.001, 100.0))
        want_y, want_state = m.ssm_attn(x, A_log, B, C, D, dt, dt_bias, state, (0.001, 100.0))
    close(y, want_y, 1e-4)
    close(new_state, want_state, 1e-4)


def test_rwkv7_kernel():
    B, T, H, D = 1, 3, 2, 64
    r, k, v = normal(B, T, H, D, scale=0.3), normal(B, T, H, D, scale=0.3, seed=1), normal(B, T, H, D, seed=2)
    w = uniform(B, T, H, D, lo=0.8, hi=1.0, seed=3)
    a = normal(B, T, H, D, scale=0.1, seed=4)
    b = -a * uniform(B, T, H, D, seed=5)
    state = normal(B, H, D, D, scale=0.1, seed=6)
    with emulated("mlx_lm.models.rwkv7") as m:
        y, new_state = m.wkv7_kernel(r, w, k, v, a, b, state)
        ys, s = [], state
        for t in range(T):
            yt, s = m._wkv7_step_ops(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], s)
            ys.append(yt)
    close(y, mx.stack(ys, axis=1).reshape(B, T, H, D), 1e-4)
    close(new_state, s, 1e-4)


@pytest.mark.parametrize("invert", [False, True])
def test_bitlinear_kernel(invert):
    n_in, n_out = 256, 64
    x = normal(3, n_in)
    packed = mx.random.randint(0, 256, (n_out // 4, n_in), key=mx.random.key(1)).astype(mx.uint8)
    with emulated("mlx_lm.models.bitlinear_layers") as m:
        layer = m.BitLinear(n_in, n_out, bias=False, invert_weight_scales=invert)
        layer.weight = packed
        layer.weight_scale = mx.array([2.0])
        got = layer(x)
    p = np.array(packed).astype(np.int32)
    # four ternary weights per byte: bits 2j..2j+1 of row r hold output r + j * n_out / 4
    full = np.concatenate([((p >> (2 * j)) & 3) - 1 for j in range(4)], axis=0)
    close(got, np.array(x) @ full.T * (0.5 if invert else 2.0), 1e-4)


@pytest.mark.parametrize("loss", ["kl_div_loss", "js_div_loss"])
def test_distillation_losses_and_their_gradients(loss):
    q, p = normal(2, 3, 5000, scale=2.0), normal(2, 3, 5000, scale=2.0, seed=1)
    module = importlib.import_module("mlx_lm.tuner.losses")
    want = getattr(module, loss)(q, p)                       # the ops path (no Metal here)
    want_grad = mx.grad(lambda a: getattr(module, loss)(a, p).sum())(q)
    with emulated("mlx_lm.tuner.losses") as m:
        fn = getattr(m, loss)
        got = fn(q, p)                                       # the kernels, forward and backward
        got_grad = mx.grad(lambda a: fn(a, p).sum())(q)
    close(got, want, 1e-4)
    close(got_grad, want_grad, 1e-5)


def test_deepseek_v41_sinkhorn_kernel():
    comb = uniform(6, 4, 4, lo=0.1, hi=2.0)
    eps = mx.array([1e-6])
    with emulated("mlx_lm.models.deepseek_v41") as m:
        with on_gpu():
            got = m._sinkhorn(comb, iters=3, eps=eps)    # the kernel
        want = m._sinkhorn(comb, iters=3, eps=eps)       # mlx-lm's ops path
    close(got, want, 1e-5)


def test_kimi_k3_attention_residual_mix_kernel():
    K, N, D = 3, 4, 200
    with emulated("mlx_lm.models.kimi_k3") as m:
        blocks = m.ResidualBlocks(1e-6)
        for k in range(K):
            blocks.append(normal(N, D, seed=k))
        partial, w_eff = normal(N, D, seed=10), normal(D, scale=0.1, seed=11)
        with on_gpu():
            got = m._attn_res_mix(blocks, partial, w_eff, 1e-6)     # the kernel
        want = m._attn_res_mix(blocks, partial, w_eff, 1e-6)        # mlx-lm's ops path
    close(got, want, 1e-4)
