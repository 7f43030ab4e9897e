"""A random-weight model written in the exact mlx-lm folder format (config.json, safetensors
shards, optionally quantized in MLX's layout, optionally a tokenizer): for tests, benchmarks and
trying the engine without a download."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

from metalforge.intmath import cdiv

ARCHS = {
    "llama": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_model(folder, arch="llama", quantized=None, dtype=mx.float32, layers=2, hidden=128, heads=2, kv_heads=1,
                inter=256, vocab=300, seed=0, shards=2, tokenizer=False, max_positions=4096) -> Path:
    """quantized: None or (bits, group_size)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    config = {**dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=1),
              **ARCHS[arch]}
    if quantized:
        config["quantization"] = {"bits": quantized[0], "group_size": quantized[1]}
    key = mx.random.key(seed)

    def rand(shape, std):
        nonlocal key
        key, sub = mx.random.split(key)
        return (mx.random.normal(shape, key=sub) * std).astype(dtype)

    # tied heads read the embeddings back: small ones keep the residual from echoing the input token
    embed_std = 0.05 if config["tie_word_embeddings"] else 1.0
    w = {"model.embed_tokens.weight": rand((vocab, hidden), embed_std), "model.norm.weight": 1 + rand((hidden,), 0.1)}
    for i in range(layers):
        p = f"model.layers.{i}."
        dims = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
                "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
                "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
        for name, shape in dims.items():
            w[p + name + ".weight"] = rand(shape, 1 / math.sqrt(shape[1]))
        if config["model_type"] == "qwen2":
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                w[p + name + ".bias"] = rand((dims[name][0],), 0.1)
        if config["model_type"] == "qwen3":
            w[p + "self_attn.q_norm.weight"] = 1 + rand((head_dim,), 0.1)
            w[p + "self_attn.k_norm.weight"] = 1 + rand((head_dim,), 0.1)
        w[p + "input_layernorm.weight"] = 1 + rand((hidden,), 0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + rand((hidden,), 0.1)
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rand((vocab, hidden), 2 / math.sqrt(hidden))
    if quantized:
        bits, gs = quantized
        for name in list(w):
            base = name[: -len(".weight")]
            if name.endswith(".weight") and (base.split(".", 3)[-1] in LINEARS or base in ("lm_head", "model.embed_tokens")):
                wq, scales, biases = mx.quantize(w[name], group_size=gs, bits=bits)
                w[name], w[base + ".scales"], w[base + ".biases"] = wq, scales.astype(dtype), biases.astype(dtype)
    names = sorted(w)
    per = cdiv(len(names), shards)
    weight_map = {}
    for s in range(shards):
        part = {n: w[n] for n in names[s * per:(s + 1) * per]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        mx.save_safetensors(str(folder / fname), part, metadata={"format": "mlx"})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        write_tokenizer(folder, vocab)
    return folder


def write_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    words = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))


# ---- the reference ----------------------------------------------------------------------------
