"""The fused quantized families (gate_up, norm_qkv, qmv's residual variant) against the unfused
MLX composition for every value of every tunable, every bit width and the architecture variants
(biases, q/k norms, partial and traditional RoPE, GeGLU), and the engine decoding mlx-lm-built
llama, qwen2 and qwen3 models through them on the emulator backend to mlx-lm's tokens."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge import engine
from metalforge.engine import ops
from metalforge.engine.models import get as get_model
from metalforge.errors import MetalforgeError
from metalforge.kernels import get_family as family

from test_families_emulated import covering, valid_configs, verify

# Two shapes a family: a short K (every simdgroups/rows/width value) and a long one (every k_split)
SWEPT = {
    "gate_up": [(dict(M=2, N=40, K=256, bits=4, group_size=64), "float16"),
                (dict(M=3, N=37, K=4096, bits=2, group_size=64, gelu=1), "float32")],
    "norm_qkv": [(dict(M=2, K=256, Hq=4, Hkv=2, D=64, bits=4, group_size=64), "float16"),
                 (dict(M=3, K=4096, Hq=2, Hkv=1, D=64, bits=2, group_size=64, bias=1, qk_norm=1), "float32")],
    "qmv": [(dict(M=2, N=40, K=256, bits=4, group_size=64, residual=1), "bfloat16"),
            (dict(M=3, N=37, K=4096, bits=2, group_size=64, residual=1), "float32")],
}


def sweep(fam, shape, dtype) -> list[dict]:
    """Each parameter over its domain with the others at their defaults; where that config cannot
    serve the shape, the first valid config holding the value (none: the value is left out)."""
    valid = valid_configs(fam, fam.shape(shape), dtype)
    out = []
    for p in fam.params:
        for value in p.domain:
            config = {**fam.default_config(), p.name: value}
            pick = config if config in valid else next((c for c in valid if c[p.name] == value), None)
            if pick is not None and pick not in out:
                out.append(pick)
    return out


@pytest.mark.parametrize("name", list(SWEPT))
def test_the_swept_shapes_take_every_value_of_every_tunable(name):
    fam = family(name)
    taken = {(p.name, c[p.name]) for shape, dtype in SWEPT[name] for c in sweep(fam, shape, dtype) for p in fam.params}
    assert taken == {(p.name, v) for p in fam.params for v in p.domain}


@pytest.mark.parametrize("name, shape, dtype", [(n, s, d) for n, cases in SWEPT.items() for s, d in cases])
def test_every_tunable_value_matches_the_unfused_composition(name, shape, dtype):
    fam = family(name)
    configs = sweep(fam, shape, dtype)
    assert verify(name, shape, dtype, configs=configs) == len(configs)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("name", ["gate_up", "norm_qkv"])
def test_every_bit_width_qmv_serves(name, bits):
    """Default config and one more at each width mx.quantize writes, 1 and 8 rows."""
    sizes = dict(N=48, K=512) if name == "gate_up" else dict(K=512, Hq=2, Hkv=1, D=64)
    for M, dtype in ((1, "float16"), (8, "float32")):
        shape = dict(M=M, bits=bits, group_size=32 if bits in (3, 5, 6) else 64, **sizes)
        fam = family(name)
        configs = [fam.default_config(), {**fam.default_config(), "values_per_lane": 32, "k_split": 2}]
        assert verify(name, shape, dtype, configs=configs) == 2


@pytest.mark.parametrize("shape, dtype", [
    (dict(M=4, K=384, Hq=4, Hkv=1, D=80, bits=4, group_size=64, rope_dims=40), "float16"),        # partial (phi)
    (dict(M=2, K=256, Hq=2, Hkv=2, D=64, bits=8, group_size=32, traditional=1, bias=1), "bfloat16"),  # glm-4
    (dict(M=5, K=256, Hq=2, Hkv=1, D=128, bits=4, group_size=64, qk_norm=1, rope_dims=64, traditional=1), "float32"),
])
def test_norm_qkv_rope_variants(shape, dtype):
    fam = family("norm_qkv")
    configs = [fam.default_config(), {**fam.default_config(), "simdgroups": 8, "rows_per_simdgroup": 8}]
    assert verify("norm_qkv", shape, dtype, configs=configs) == 2


@pytest.mark.parametrize("name, shape, dtype", [(n, s, d) for n, cases in SWEPT.items() for s, d in cases[:1]])
def test_fused_kernels_are_clean_in_checked_mode(name, shape, dtype, monkeypatch):
    """No out-of-bounds access and no threadgroup-memory race (the head's values, the K splits'
    partial sums, staged x) in configs that together take every value valid at the shape."""
    monkeypatch.setenv("METALFORGE_EMULATOR_CHECKED", "1")
    fam = family(name)
    configs = covering(fam, valid_configs(fam, fam.shape(shape), dtype))
    assert verify(name, shape, dtype, configs=configs) == len(configs)


@pytest.mark.parametrize("name, shape", [
    ("gate_up", dict(M=3, N=40, K=256, bits=4, group_size=64, gelu=1)),
    ("norm_qkv", dict(M=3, K=256, Hq=4, Hkv=2, D=64, bits=4, group_size=64, bias=1, qk_norm=1)),
    ("qmv", dict(M=3, N=40, K=256, bits=4, group_size=64, residual=1)),
])
def test_the_reference_is_mlx_lms_composition(name, shape):
    """The fp32 reference (weights dequantised with plain ops) agrees with mlx-lm's composition of
    MLX's own kernels (quantized_matmul, nn.silu / gelu_approx, mx.fast.rope) in float32."""
    fam = family(name)
    s = fam.shape(shape)
    inputs = fam.make_inputs(s, "float32", seed=3)
    np.testing.assert_allclose(np.array(fam.reference(s, "float32", inputs)),
                               np.array(fam.baseline(s, "float32", inputs)), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name, shape, message", [
    ("norm_qkv", dict(M=1, K=256, Hq=3, Hkv=2, D=64), "Hq=3 is not a positive multiple of Hkv=2"),
    ("norm_qkv", dict(M=1, K=256, Hq=2, Hkv=1, D=64, rope_dims=65), "rope_dims=65 is not an even count"),
    ("norm_qkv", dict(M=9, K=256, Hq=2, Hkv=1, D=64), "M=9 is outside 1..8"),
    ("gate_up", dict(M=1, N=40, K=250), "K=250 is not a multiple of group_size=64"),
    ("gate_up", dict(M=1, N=40, K=256, gelu=2), "gelu=2 is not 0 or 1"),
    ("qmv", dict(M=1, N=40, K=256, residual=3), "residual=3 is not 0 or 1"),
])
def test_bad_shapes_are_one_line_naming_the_problem(name, shape, message):
    with pytest.raises(MetalforgeError, match=message) as e:
        family(name).shape(shape)
    assert "\n" not in str(e.value)


def test_a_block_wider_than_a_head_is_refused():
    from metalforge.kernels import check
    fam = family("norm_qkv")
    problems = check(fam, {**fam.default_config(), "simdgroups": 8, "rows_per_simdgroup": 8},
                     dict(M=1, K=256, Hq=2, Hkv=1, D=32), "float16", "m3-max-40")
    assert any("more than a head's D=32" in str(p) for p in problems)


# ---- the engine ----------------------------------------------------------------------------------
mlx_lm = pytest.importorskip("mlx_lm")
from test_architectures import COMMON, PROMPT, FORCED, build, ours_greedy, theirs_greedy  # noqa: E402

SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
ARCHS = {"llama": {}, "qwen2": {}, "qwen3": dict(head_dim=64)}


def config_of(arch: str) -> dict:
    return dict(model_type=arch, **COMMON, **SIZES, **ARCHS[arch])


FUSED_KERNELS = {"metalforge norm_qkv (emulator)", "metalforge gate_up (emulator)"}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_emulator_backend_decodes_mlx_lms_tokens_through_the_fused_kernels(tmp_path, arch, bits):
    model = build(tmp_path, arch, bits, config=config_of(arch))
    theirs = theirs_greedy(model, PROMPT, 5)
    ours, report = ours_greedy(tmp_path, 5, backend="emulator")
    assert ours == theirs
    kernels = {v["kernel"] for v in report.values()}
    assert FUSED_KERNELS <= kernels, report
    residual = [v for k, v in report.items() if k.startswith("qmv") and "residual=1" in k]
    assert len(residual) == 2 and all(v["kernel"] == "metalforge qmv (emulator)" for v in residual), report


def test_half_precision_teacher_forced_logits_through_the_fused_kernels(tmp_path):
    model = build(tmp_path, "qwen3", 4, dtype=mx.float16, config=config_of("qwen3"))
    tokens = PROMPT + FORCED
    want = np.array(model(mx.array([tokens]))[0, len(PROMPT) - 1:-1].astype(mx.float32))
    with engine.load(tmp_path, backend="emulator", device="m3", kv_tokens=128) as e:
        sid = e.add_sequence()
        got = [e.step([sid], [tokens[:len(PROMPT)]])[0]] + [e.step([sid], [[t]])[0] for t in tokens[len(PROMPT):-1]]
        assert FUSED_KERNELS <= {v["kernel"] for v in e.kernel_report().values()}
    got = np.array(mx.stack(got))
    assert np.abs(got - want).max() / want.std() <= 0.5
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85


def test_sequences_decoded_together_through_the_fused_kernels_equal_each_alone(tmp_path):
    """Three sequences at different positions in one norm_qkv dispatch (M = 3, a position each)."""
    build(tmp_path, "qwen3", 4, config=config_of("qwen3"))
    prompts = [PROMPT, PROMPT[3:] + [9, 10, 11, 12], [1, 2, 3]]
    with engine.load(tmp_path, backend="emulator", device="m3", kv_tokens=256) as e:
        alone = [[t.id for t in e.generate(p, max_tokens=5)] for p in prompts]
        together = [[] for _ in prompts]
        for i, token in e.generate_batch(prompts, max_tokens=5):
            together[i].append(token.id)
        assert any(k.startswith("norm_qkv M=3") for k in e.kernel_report()), e.kernel_report()
    assert together == alone


@pytest.mark.parametrize("arch, fused", [
    ("llama", {"attention_input": "norm_qkv", "gated_mlp": "gate_up", "residual linear": "qmv"}),
    ("gemma2", {"attention_input": "norm_qkv", "gated_mlp": "gate_up"}),   # post-norms: the adds stay MLX's
    ("phi3", {"residual linear": "qmv"}),                                 # fused qkv and gate_up weights
])
def test_the_op_plan_lists_the_fused_ops_for_the_tuner(arch, fused):
    from test_architectures import config_of as arch_config
    config = config_of(arch) if arch == "llama" else arch_config(arch)
    config["quantization"] = {"bits": 4, "group_size": 64}
    module = get_model(arch)
    args = module.Args.from_config(config)
    plan = module.op_plan(args, contexts=(64,), batch=2)

    def kind(p):   # a projection with its residual add is a linear with `residual` set
        return "residual linear" if p.values.get("residual") else p.op
    planned = {kind(p) for p in plan} - {"linear", "attention"}
    assert planned == set(fused)
    decoded = [p.values for p in plan if kind(p) == "linear" and p.values["M"] == 2]
    if len(fused) == 3:   # every linear of a layer runs inside a fused op: only the output head is left
        assert decoded == [dict(M=2, N=args.vocab_size, K=args.hidden_size, bits=4, group_size=64)]
    shapes = ops.kernel_shapes(plan)
    for op, name in fused.items():
        values = [p.values for p in plan if kind(p) == op]
        assert values and all(v in shapes[name] for v in values) and all(v["M"] == 2 for v in values)
