"""Every architecture against mlx-lm's OWN model class: a tiny model built by mlx-lm
(mlx_lm.models.<type>.Model, random weights), quantized by mlx-lm's quantize_model and saved
with mlx_lm.utils.save_model / save_config, loaded by the engine. Float32: the engine's greedy
tokens are mlx-lm's generate_step's (dense, 4-bit, 8-bit); half precision: teacher-forced logits
within max |difference| / sd <= 0.5 and top-1 agreement >= 0.85; the emulator backend: one
small case per architecture. Prompts run past each sliding window, so the window is exercised."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge import engine

mlx_lm = pytest.importorskip("mlx_lm")
import importlib  # noqa: E402

from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import quantize_model, save_config, save_model  # noqa: E402

COMMON = dict(num_hidden_layers=2, vocab_size=300, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=4096, tie_word_embeddings=False)
WINDOW = 8
# What each architecture's tiny model sets beyond COMMON: its own fields at small sizes, with
# windows shorter than the prompt and scalings that change the answer where it has them.
ARCHITECTURES = {
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=64, sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=48,
                        rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=48),
    "phi3": dict(hidden_size=128, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                 partial_rotary_factor=0.75, max_position_embeddings=256, original_max_position_embeddings=64,
                 rope_scaling={"type": "longrope", "long_factor": [1.0 + i / 8 for i in range(24)],
                               "short_factor": [1.0] * 24}),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
                      moe_intermediate_size=64, norm_topk_prob=True),
    "mixtral": dict(hidden_size=128, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                    num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(hidden_size=128, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128),
    "gpt_oss": dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                    rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32, "beta_slow": 1,
                                  "original_max_position_embeddings": 64}),
    "olmo2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                  attention_bias=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "granite": dict(hidden_size=128, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                    attention_bias=True, mlp_bias=True, embedding_multiplier=4.0, attention_multiplier=0.05,
                    residual_multiplier=0.5, logits_scaling=2.0, tie_word_embeddings=True),
    "starcoder2": dict(hidden_size=128, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                       norm_epsilon=1e-5),
    "glm4": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                 attention_bias=True, partial_rotary_factor=0.5),
    # positions past 4 get larger queries (Llama 4's scaling); yarn with mscale_all_dim, as released
    "ministral3": dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=64, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 4, "llama_4_scaling_beta": 0.3,
                                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
}
# vision-language folders: the text model under text_config, its weights under language_model.
ARCHITECTURES["mistral3"] = dict(text_config={"model_type": "ministral3", **COMMON, **ARCHITECTURES["ministral3"]})
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
PROMPT = [5, 17, 42, 99, 3, 250, 11, 7, 64, 128, 2, 31]   # 12 tokens: past the window, and over 8 rows (qmm)
FORCED = [(37 * i + 8) % 300 for i in range(28)]          # teacher-forced continuation


def config_of(arch: str) -> dict:
    fields = ARCHITECTURES[arch]
    return {"model_type": arch, **({} if "text_config" in fields else COMMON), **fields}


def build(folder, arch: str, bits=None, dtype=mx.float32, quant_predicate=None, seed=0, config=None, mode="affine"):
    """mlx-lm's model for `arch` (or `config`) with random weights (every vector perturbed so
    norms, biases and sinks matter), quantized by mlx-lm when `bits`, saved as mlx-lm saves it."""
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    config = config or config_of(arch)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    params = [(k, v + 0.2 * mx.random.normal(v.shape) if v.ndim == 1 else v) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten([(k, v.astype(dtype)) for k, v in params]))
    mx.eval(model.parameters())
    if bits:
        model, config = quantize_model(model, config, group_size=32 if bits == 8 or mode != "affine" else 64, bits=bits,
                                       quant_predicate=quant_predicate, mode=mode)
    save_model(folder, model)
    save_config(dict(config), folder / "config.json")
    return model


def theirs_greedy(model, prompt, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def ours_greedy(folder, n, backend="mlx", prompt=PROMPT):
    with engine.load(folder, backend=backend, device="m3", kv_tokens=128) as e:
        return [t.id for t in e.generate(prompt, max_tokens=n)], e.kernel_report()


def teacher_forced(folder, tokens, start):
    """Our logits after each of tokens[start-1:] (prompt tokens[:start] prefilled at once)."""
    with engine.load(folder, backend="mlx", kv_tokens=128) as e:
        sid = e.add_sequence()
        out = [e.step([sid], [tokens[:start]])[0]]
        out += [e.step([sid], [[t]])[0] for t in tokens[start:-1]]
        return mx.stack(out)


@pytest.mark.parametrize("bits", [None, 4, 8], ids=["fp32", "q4", "q8"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_float32_greedy_tokens_are_mlx_lms(tmp_path, arch, bits):
    model = build(tmp_path, arch, bits)
    theirs = theirs_greedy(model, PROMPT, 10)
    ours, _ = ours_greedy(tmp_path, 10)
    assert ours == theirs


@pytest.mark.parametrize("bits", [None, 4], ids=["fp16", "q4-fp16"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_half_precision_teacher_forced_logits_match_mlx_lms(tmp_path, arch, bits):
    model = build(tmp_path, arch, bits, dtype=mx.float16)
    if bits is None and arch in MOE:
        model.set_dtype(mx.float32)   # MLX's CPU gather_mm takes float32 only: the exact sums of the same weights
    tokens = PROMPT + FORCED
    want = model(mx.array([tokens]))[0, len(PROMPT) - 1:-1].astype(mx.float32)
    got = teacher_forced(tmp_path, tokens, len(PROMPT))
    want, got = np.array(want), np.array(got)
    assert np.abs(got - want).max() / want.std() <= 0.5
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_emulator_backend_decodes_mlx_lms_tokens(tmp_path, arch):
    model = build(tmp_path, arch, bits=4)
    theirs = theirs_greedy(model, PROMPT, 4)
    ours, report = ours_greedy(tmp_path, 4, backend="emulator")
    assert ours == theirs
    kernels = {v["kernel"] for v in report.values()}
    assert "metalforge qmv (emulator)" in kernels, report
    # every model type decodes through our kernel: gemma2's soft-cap, gpt-oss's sinks and the windows too
    assert "metalforge decode_attention (emulator)" in kernels, report
    # expert layers decode through our gather_qmv (a 12-token prompt, over its 8 tokens, is MLX's gather_qmm)
    assert ("metalforge gather_qmv (emulator)" in kernels) == (arch in MOE), report


def test_per_layer_quantization_overrides_are_honoured(tmp_path):
    """mlx-lm's converter with a quant_predicate: down projections at 8 bits, o_proj left
    unquantized, the rest 4-bit; config.json records the overrides and the engine reads them."""
    def predicate(path, module):
        if path.endswith("mlp.down_proj"):
            return {"group_size": 32, "bits": 8}
        return not path.endswith("o_proj")
    model = build(tmp_path, "gemma3_text", bits=4, quant_predicate=predicate)
    import json
    quant = json.loads((tmp_path / "config.json").read_text())["quantization"]
    assert quant["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    assert theirs_greedy(model, PROMPT, 10) == ours_greedy(tmp_path, 10)[0]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_long_prompts_sort_tokens_by_expert_as_mlx_lm_does(tmp_path, arch):
    """40 prompt tokens x 2 experts = 80 (token, expert) pairs: past SwitchGLU's 64, the tokens are
    sorted by expert before gather_qmm (sorted_indices) and unsorted after."""
    model = build(tmp_path, arch, bits=4)
    prompt = [(7 * i + 3) % 300 for i in range(40)]
    assert ours_greedy(tmp_path, 6, prompt=prompt)[0] == theirs_greedy(model, prompt, 6)


def test_mistral3_with_a_llama_text_model(tmp_path):
    """Mistral Small 3.1's layout: text_config of model type mistral (mlx-lm's llama)."""
    text = {"model_type": "mistral", **COMMON, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 64, "rope_theta": 1e6}
    model = build(tmp_path, "mistral3", bits=4, config={"model_type": "mistral3", "text_config": text})
    assert ours_greedy(tmp_path, 8)[0] == theirs_greedy(model, PROMPT, 8)


@pytest.mark.parametrize("arch, patch, message", [
    ("gpt_oss", {"layer_types": ["sliding_attention", "chunked_attention"]}, r"layer_types must list 2 of "),
    ("phi3", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, r"rope_scaling.type 'yarn' is not supported for phi3"),
    ("gemma3_text", {"hidden_activation": "relu"}, r"hidden_activation='relu' is not supported; supported: "),
    ("qwen2_moe", {"norm_topk_prob": True}, r"norm_topk_prob=True is not supported"),
    ("ministral3", {"rope_parameters": None}, r"rope_parameters must be an object"),
    ("mistral3", {"text_config": {"model_type": "mistral4"}}, r"text_config.model_type 'mistral4' is not supported; "
                                                                r"supported: llama, ministral3"),
    ("qwen3_moe", {"quantization": {"group_size": 32, "bits": 4, "mode": "fp3"}},
     r"quantization.mode 'fp3' is not supported; supported: affine, mxfp4, mxfp8, nvfp4"),
    ("qwen3_moe", {"quantization": {"group_size": 64, "bits": 4, "mode": "mxfp4"}},
     r"quantization \{bits: 4, group_size: 64\} is not supported for mode mxfp4 \(bits 4; group_size 32\)"),
    ("mixtral", {"quantization": {"group_size": 64, "bits": 4, "model.layers.0.block_sparse_moe.gate": {"bits": 7, "group_size": 64}}},
     r"quantization\['model.layers.0.block_sparse_moe.gate'\] \{bits: 7, group_size: 64\} is not supported"),

    # a model type's own sizes are bounded in terms of the generic ones (experts, positions, layers)
    ("mixtral", {"num_local_experts": 1 << 17}, r"num_local_experts=131072 is outside 1\.\.65536"),
    ("gpt_oss", {"sliding_window": 0}, r"sliding_window=0 is outside 1\.\.2147483647"),
    ("gemma3_text", {"sliding_window_pattern": 2000}, r"sliding_window_pattern=2000 is outside 1\.\.1024"),
    ("qwen2_moe", {"shared_expert_intermediate_size": None},
     r"missing required field 'shared_expert_intermediate_size'"),
])
def test_a_config_value_not_implemented_is_one_line_naming_the_field(arch, patch, message):
    from metalforge.engine import models
    from metalforge.errors import MetalforgeError
    with pytest.raises(MetalforgeError, match=message) as e:
        models.parse({**config_of(arch), **patch})
    assert "\n" not in str(e.value)


def test_tuning_a_moe_model_targets_its_expert_layers():
    """`metalforge tune --model` on a MoE folder: its expert layers' decode shapes are gather_qmv
    targets (prompts, over 8 tokens, run MLX's gather_qmm and are not tuned); the router is a qmv."""
    from metalforge.tuner import shapes
    config = config_of("qwen3_moe")
    config["quantization"] = {"group_size": 64, "bits": 4, "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}}
    got = shapes.from_model_config(config)
    a = ARCHITECTURES["qwen3_moe"]   # gate, up and down are all 64 x 64 here: one expert shape
    assert got["gather_qmv"] == [dict(M=1, N=64, K=64, bits=4, group_size=64, experts=8, top_k=2)]
    assert dict(M=1, N=a["num_experts"], K=a["hidden_size"], bits=8, group_size=64) in got["qmv"]   # the router
    assert [t.family.name for t in shapes.targets(got, shapes.model_families())].count("gather_qmv") == 1


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3_moe", "gpt_oss"])
def test_sequences_decoded_together_equal_each_alone(tmp_path, arch):
    """Several sequences in one forward pass (a window per sequence, experts routed per token,
    prompts joining while others decode) give each sequence's own greedy tokens."""
    build(tmp_path, arch, bits=4)
    prompts = [PROMPT, PROMPT[3:] + [9, 10, 11, 12], [1, 2, 3]]
    with engine.load(tmp_path, backend="mlx", kv_tokens=256) as e:
        alone = [[t.id for t in e.generate(p, max_tokens=8)] for p in prompts]
        together = [[] for _ in prompts]
        for i, token in e.generate_batch(prompts, max_tokens=8):
            together[i].append(token.id)
    assert together == alone


@pytest.mark.parametrize("backend", ["mlx", "emulator"])
def test_gpt_oss_in_mxfp4_as_mlx_lm_converts_it(tmp_path, backend):
    """gpt-oss's own format: mlx-lm's quantize_model in mode mxfp4 (one power-of-two scale per 32
    values, no biases) with its predicate keeping the router affine 8-bit. MLX's quantized ops
    run the mxfp4 layers (our kernels take affine); the tokens are mlx-lm's."""
    model = build(tmp_path, "gpt_oss", bits=4, mode="mxfp4")
    import json
    quant = json.loads((tmp_path / "config.json").read_text())["quantization"]
    assert quant["mode"] == "mxfp4" and quant["model.layers.0.mlp.router"] == {"group_size": 64, "bits": 8}
    assert ours_greedy(tmp_path, 8, backend=backend)[0] == theirs_greedy(model, PROMPT, 8)
