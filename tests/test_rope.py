"""RoPE with each scaling type mlx-lm configs use, through mx.fast.rope: against mlx-lm's own
implementation, and against the elementwise rotation the engine used before (kept here as the
reference) on real ragged steps of the KV pool (one-token sequences, verify passes, prompts), each
step one call with a position per token."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge.engine.kv import KVPool
from metalforge.engine.kv.storage import DenseStorage
from metalforge.engine.models import rope

rope_utils = pytest.importorskip("mlx_lm.models.rope_utils")

D, THETA, MAX_POS = 64, 10000.0, 256
SCALINGS = {
    "default": None,
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0},
    "longrope": {"type": "longrope", "original_max_position_embeddings": 64,
                 "long_factor": [1.0 + i / 16 for i in range(D // 2)], "short_factor": [1.0] * (D // 2)},
}


def elementwise(r: rope.Rope, x: mx.array, positions: mx.array, longest: int) -> mx.array:
    """The engine's former RoPE: cos/sin of position x inv_freq in float32, the halves (or
    adjacent pairs) rotated, times the magnitude factor. x (1, H, T, D), positions (T,)."""
    inv = r.inv_freq
    if isinstance(r, rope.DynamicRope) and longest > r.max_positions:
        d, f = r.dims, r.factor
        inv = r.base_frequencies(r.theta * ((f * longest / r.max_positions) - (f - 1)) ** (d / (d - 2)))
    angles = positions.astype(mx.float32)[None, None, :, None] * inv
    cos, sin = mx.cos(angles) * r.mscale, mx.sin(angles) * r.mscale
    half, d = r.dims // 2, r.dims
    if r.traditional:
        pairs = x[..., :d].astype(mx.float32).reshape(*x.shape[:-1], half, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
        rotated = mx.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(*x.shape[:-1], d)
    else:
        x1, x2 = x[..., :half].astype(mx.float32), x[..., half:d].astype(mx.float32)
        rotated = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    rotated = rotated.astype(x.dtype)
    return rotated if d == x.shape[-1] else mx.concatenate([rotated, x[..., d:]], axis=-1)


def ragged_step(lengths: list[int], counts: list[int]):
    """A real step of a pool whose sequences already hold `lengths` tokens, adding `counts`."""
    pool = KVPool(DenseStorage(1, 1, 8, 16, 64), 16, 64, 1024)
    sids = [pool.add_sequence() for _ in lengths]
    for sid, n in zip(sids, lengths):
        if n:
            pool.begin({sid: n}).commit([[0] * n])
    return pool.begin(dict(zip(sids, counts)))


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("offset", [0, 37, 300])   # 300: past max_position_embeddings (dynamic NTK kicks in)
def test_rope_matches_mlx_lm(kind, offset):
    scaling = SCALINGS[kind]
    theirs = rope_utils.initialize_rope(D, THETA, False, scaling, MAX_POS)
    ours = rope.make(D, THETA, scaling, MAX_POS)
    x = mx.random.normal((1, 2, 5, D), key=mx.random.key(3))
    step = ragged_step([offset], [5])
    np.testing.assert_allclose(np.array(ours(x, step)), np.array(theirs(x, offset=offset)), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("dims,traditional", [(D, False), (D, True), (D // 2, False)])
@pytest.mark.parametrize("lengths,counts", [
    ([0, 5, 17, 290], [1, 1, 1, 1]),          # one decode group: (B, H, 1, D) with four offsets
    ([12], [9]),                              # a prompt chunk after a prefix
    ([3, 40, 0, 7, 260], [1, 1, 6, 1, 1]),   # ragged: a decode group, a prompt, a decode group
    ([3, 40, 9, 260], [1, 4, 4, 1]),          # plain tokens beside two sequences verifying 3 drafts each
])
def test_fast_rope_equals_the_elementwise_rotation_at_every_position(kind, dims, traditional, lengths, counts):
    scaling = SCALINGS[kind]
    if kind == "longrope" and dims != D:
        scaling = {**scaling, "long_factor": scaling["long_factor"][:dims // 2]}
    ours = rope.make(D, THETA, scaling, MAX_POS, dims=dims, traditional=traditional)
    step = ragged_step(lengths, counts)
    x = mx.random.normal((1, 3, step.tokens, D), key=mx.random.key(5))
    want = elementwise(ours, x, step.positions[0], step.longest)
    np.testing.assert_allclose(np.array(ours(x, step)), np.array(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["yarn", "longrope"])
def test_the_magnitude_factor_is_applied(kind):
    """Yarn with mscale above mscale_all_dim and an extended longrope scale the rotated features."""
    scaling = {**SCALINGS[kind], "mscale": 2.0} if kind == "yarn" else SCALINGS[kind]
    ours = rope.make(D, THETA, scaling, MAX_POS)
    assert ours.mscale > 1.0
    step = ragged_step([4, 9], [1, 1])
    x = mx.random.normal((1, 2, 2, D), key=mx.random.key(7))
    want = elementwise(ours, x, step.positions[0], step.longest)
    np.testing.assert_allclose(np.array(ours(x, step)), np.array(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lengths,counts", [
    ([3, 300, 8], [1, 1, 1]),                 # a decode step
    ([3, 40, 9, 0, 7], [1, 4, 4, 6, 1]),     # ragged: plain tokens, two verify passes, a prompt
])
def test_a_step_is_one_rope_dispatch_without_host_reads(lengths, counts):
    """However ragged the step, RoPE is one mx.fast.rope call: positions are explicit per token."""
    from metalforge.engine import dispatches
    ours = rope.make(D, THETA, SCALINGS["dynamic"], MAX_POS)
    step = ragged_step(lengths, counts)
    x = mx.random.normal((1, 2, step.tokens, D), key=mx.random.key(1))
    mx.eval(x)
    with dispatches.counting() as rec:
        out = ours(x, step)
    counts = dispatches.count(rec, out)
    assert counts.kernels == {"mx.fast.rope": 1} and counts.syncs == 0


def test_an_unknown_rope_type_is_one_line_naming_the_field():
    from metalforge.errors import MetalforgeError
    with pytest.raises(MetalforgeError, match=r"^config.json: rope_scaling.rope_type 'proportional' is not supported; "
                                              r"supported: default, dynamic, linear, llama3, longrope, su, yarn$"):
        rope.make(D, THETA, {"rope_type": "proportional", "factor": 2.0}, MAX_POS)
