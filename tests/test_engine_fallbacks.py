"""Models built and saved by mlx-lm itself with shapes some family does not serve decode on the
emulator backend without raising: head dim 32 (no attention kernel of ours), 3- and 6-bit weights
(our qmv decodes them; prompts over 8 rows go to MLX's op, our qmm takes 4 and 8 bits). Those ops
run MLX's built-ins and the report says why; the tokens are the `mlx` backend's and mlx-lm's own."""
import mlx.core as mx
import pytest

from metalforge import engine

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.utils import quantize_model, save_config, save_model  # noqa: E402

PROMPT = [3, 17, 42, 5, 9, 11, 2, 8, 13, 21, 34, 55]   # over 8 tokens: the prompt takes qmm


def mlx_lm_model(folder, head_dim, bits):
    """A random llama built, quantized and saved by mlx-lm."""
    config = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                  num_attention_heads=128 // head_dim, num_key_value_heads=128 // head_dim // 2, head_dim=head_dim,
                  rms_norm_eps=1e-5, vocab_size=300, rope_theta=10000.0, tie_word_embeddings=False)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    if bits:
        model, config = quantize_model(model, config, group_size=32, bits=bits)
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return model


def mlx_lm_greedy(model, prompt, n):
    from mlx_lm.models.cache import make_prompt_cache
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(n):
        token = int(mx.argmax(logits[0, -1]).item())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return out


def greedy(folder, backend, n):
    with engine.load(folder, backend=backend, device="m3", kv_tokens=64) as e:
        tokens = [t.id for t in e.generate(PROMPT, max_tokens=n)]
        return tokens, e.kernel_report()


@pytest.mark.parametrize("head_dim, bits, unsupported", [(32, 4, "D=32 is not supported"),
                                                         (64, 3, "bits=3 is not supported (valid: 2, 4, 8)"),
                                                         (64, 6, "bits=6 is not supported (valid: 2, 4, 8)")])
def test_unsupported_shapes_fall_back_to_mlx_and_match(tmp_path, head_dim, bits, unsupported):
    model = mlx_lm_model(tmp_path / "model", head_dim, bits)
    theirs = mlx_lm_greedy(model, PROMPT, 4)
    ours, report = greedy(tmp_path / "model", "emulator", 4)
    reference, _ = greedy(tmp_path / "model", "mlx", 4)
    assert ours == reference == theirs
    fallbacks = [v for v in report.values() if v["kernel"].startswith("mx.")]
    assert fallbacks and all(v["why"].startswith("MLX: ") for v in fallbacks)
    assert any(unsupported in v["why"] for v in fallbacks), report
    if bits != 4:
        assert "metalforge qmv (emulator)" in {v["kernel"] for v in report.values()}, "decode runs our qmv"
