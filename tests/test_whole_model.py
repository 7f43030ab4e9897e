"""The whole-model check (engine/whole_model.py): a published decode point priced as mlx-lm's step
of its model's config.json, and a published prompt as its chunks, against the same counted by
hand, and the fit of its two constants recovering the ones that made synthetic speeds."""
import dataclasses

import pytest

from metalforge.engine import step_glue, step_price, whole_model
from metalforge.engine.step_price import Cost
from metalforge.kernels import model_measurements
from metalforge.kernels.timing import fit, mlx_jobs

pytestmark = pytest.mark.usefixtures("mlx_kernel_headers")


@pytest.fixture(scope="module")
def points():
    return model_measurements.load_points()


def _point(points, **match):
    return next(p for p in points if all(getattr(p, k) == v for k, v in match.items()))


def _mlx(op, shape, dev, constants) -> Cost:
    """MLX's kernels for one job (kernels/timing/mlx_jobs.py), priced as in a step."""
    return step_price.counted_cost(mlx_jobs.counted(op, shape, "float16", dev), dev, constants)


def _matmul(M, N, K):
    return dict(M=M, N=N, K=K, bits=4, group_size=64)


def _llama_7b_projections(M, dev, constants) -> Cost:
    """LLaMA-7B's 32 layers of q, k, v, o (4096 x 4096), gate and up (11008 x 4096) and down
    (4096 x 11008) at M rows, 4-bit."""
    return (_mlx("matmul", _matmul(M, 4096, 4096), dev, constants).times(4 * 32)
            + _mlx("matmul", _matmul(M, 11008, 4096), dev, constants).times(2 * 32)
            + _mlx("matmul", _matmul(M, 4096, 11008), dev, constants).times(32))


def test_a_llama_step_is_its_projections_attention_head_and_other_dispatches_by_hand(points):
    """LLaMA-7B (32 layers, 32 heads of 128, MLP 11008, vocabulary 32000) at 4 bits after 512
    tokens, hand-listed: per layer q, k, v, o (4096 x 4096), gate and up (11008 x 4096), down
    (4096 x 11008) and attention over 512 keys; the LM head once; mlx-lm's 9 other dispatches a
    layer and 5 outside (the embedding row's 3 gathers and dequantize, the final norm), each
    moving 3 x 4096 fp16 values."""
    p = _point(points, chip="m2-pro", model="llama-7b", weights="Q4_0")
    constants = fit.shipped()["constants"]
    dev = p.device
    kernels = (_llama_7b_projections(1, dev, constants) + _mlx("matmul", _matmul(1, 32000, 4096), dev, constants)
               + _mlx("decode", dict(B=1, Hq=32, Hkv=32, S=512, D=128), dev, constants).times(32))
    others = 9 * 32 + 5
    got = whole_model.decode_step(p, constants)
    assert got.dispatches == kernels.dispatches + others == (7 + 1 + 9) * 32 + 1 + 5
    assert got.fixed_s == pytest.approx(kernels.fixed_s, rel=1e-9)
    assert got.dram_s == pytest.approx(kernels.dram_s + others * 3 * 4096 * 2 / (dev.memory_bandwidth_gbs * 1e9),
                                       rel=1e-9)


def test_mlx_lm_attends_over_the_contexts_keys_not_the_pools_bucket(points):
    """After 600 tokens the engine reads its pool through a table of the 1,024-token bucket, but
    mlx-lm's contiguous cache holds the 600 keys: its step prices MLX's decode over 600 keys."""
    p = _point(points, chip="m2-pro", model="llama-7b", weights="Q4_0")
    constants, dev = fit.shipped()["constants"], p.device
    attention = [v for op, v, _ in step_price.step_ops(whole_model.config_of(p), 600) if op == "attention"]
    assert len(attention) == 1
    got = step_price.mlx_price("attention", attention[0], dev, constants)
    keys = {S: _mlx("decode", dict(B=1, Hq=32, Hkv=32, S=S, D=128), dev, constants) for S in (600, 1024)}
    assert got.dram_s == pytest.approx(keys[600].dram_s, rel=1e-9) and keys[600].dram_s < keys[1024].dram_s
    assert got.fixed_s == pytest.approx(keys[600].fixed_s, rel=1e-9)
    assert got.dispatches == keys[600].dispatches


def test_a_points_quantization_follows_its_bits_per_weight(points):
    """4 bits below 6 bits a weight, 8 above, group 64; unquantized runs are left out with the reason."""
    q4 = _point(points, chip="m2-ultra", model="llama-7b", weights="Q4_0", kind="decode")
    q8 = _point(points, chip="m2-ultra", model="llama-7b", weights="Q8_0", kind="decode")
    f16 = _point(points, chip="m2-pro", model="llama-7b", weights="F16")
    assert whole_model.config_of(q4)["quantization"] == {"bits": 4, "group_size": 64}
    assert whole_model.config_of(q8)["quantization"] == {"bits": 8, "group_size": 64}
    assert whole_model.bits_per_weight(q4) == pytest.approx(3.56 * 2**30 * 8 / 6.738e9, rel=1e-3)
    _, skipped = whole_model.rows([f16], fit.shipped()["constants"])
    assert [why for _, why in skipped] == ["F16 weights: MLX's unquantized matmul kernels are not emulated"]


def test_the_fit_recovers_the_constants_that_made_the_speeds(points):
    """Steps of known parts, speeds made with a DRAM factor of 0.9 and 8 us a dispatch: the fit
    finds both, and predicts every point exactly, held out or not."""
    decode = list({p.chip: p for p in points if p.kind == "decode"}.values())[:6]   # six chips
    assert len(decode) == 6
    rows = []
    for i, p in enumerate(decode):
        cost = Cost(fixed_s=1e-3 * (1 + i), dram_s=4e-3 * (6 - i), dispatches=300 + 150 * i)
        rows.append((dataclasses.replace(p, tokens_per_s=1 / cost.seconds(0.9, 8e-6)), cost))
    dram, d = whole_model.fit(rows)
    assert dram == pytest.approx(0.9, rel=1e-9) and d == pytest.approx(8e-6, rel=1e-9)
    err, errs = whole_model.held_out(rows)
    assert err == pytest.approx(0, abs=1e-9) and len(errs) == len(rows)
    assert whole_model.predict(rows[0], dram, d) == pytest.approx(rows[0][0].tokens_per_s, rel=1e-9)
    # a prompt of 512 tokens made with the same constants: checked against the decode fit, held out by chip
    prompt = dataclasses.replace(next(p for p in points if p.kind == "prefill"), tokens=512)
    cost = Cost(fixed_s=0.2, dram_s=0.01, dispatches=600)
    prompt_row = (dataclasses.replace(prompt, tokens_per_s=512 / cost.seconds(0.9, 8e-6)), cost)
    err, _ = whole_model.held_out([prompt_row], fitted_on=rows)
    assert err == pytest.approx(0, abs=1e-9)


def test_a_prompt_chunk_is_the_op_plans_prefill_ops_by_hand(points):
    """LLaMA-7B's chunk of 512 tokens after 1024 cached ones, hand-listed: per layer q, k, v, o
    (4096 x 4096), gate and up (11008 x 4096) and down (4096 x 11008) at M = 512, attention of the
    512 queries over 1536 keys; no LM head (mlx-lm evaluates only the cache while it prefills)."""
    from metalforge.engine.step_price import chunk_ops
    config = whole_model.config_of(_point(points, chip="m2-ultra", model="llama-7b", weights="Q4_0", kind="prefill"))
    ops = {(op, v.get("N"), v.get("K"), v.get("M") or v.get("new"), v.get("context")): n
           for op, v, n in chunk_ops(config, 1024, 512)}
    assert ops == {("linear", 4096, 4096, 512, None): 4 * 32, ("linear", 11008, 4096, 512, None): 2 * 32,
                   ("linear", 4096, 11008, 512, None): 32, ("attention", None, None, 512, 1536): 32}


def test_a_prefill_is_its_chunks_kernels_and_other_dispatches_by_hand(points):
    """A 512-token prompt in one chunk (llama.cpp's pp512 on the M2 Ultra): MLX's qmm for each
    linear at M = 512, its causal attention over the 512 keys once a layer, and mlx-lm's other
    dispatches of a chunk, each moving three fp16 vectors a token."""
    p = _point(points, chip="m2-ultra", model="llama-7b", weights="Q4_0", kind="prefill", tokens=512)
    constants = fit.shipped()["constants"]
    dev = p.device
    kernels = (_llama_7b_projections(512, dev, constants)
               + _mlx("prefill", dict(B=1, Hq=32, Hkv=32, L=512, D=128, prefix=0, causal=True), dev, constants).times(32))
    config = whole_model.config_of(p)
    glue = step_glue.counts_for(config, whole_model.PREFILL_COUNTED_AT).mlx_lm_prefill
    others = glue.per_layer * 32 + glue.outside
    got = whole_model.prefill(p, constants)
    assert got.dispatches == kernels.dispatches + others
    assert got.fixed_s == pytest.approx(kernels.fixed_s, rel=1e-9)
    assert got.dram_s == pytest.approx(kernels.dram_s + others * 512 * 3 * 4096 * 2 / (dev.memory_bandwidth_gbs * 1e9),
                                       rel=1e-9)
