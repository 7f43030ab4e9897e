"""Random-weight models written in the exact mlx-lm folder format (config.json, safetensors
shards, optionally quantized in MLX's layout, optionally a tokenizer): for tests, benchmarks and
trying the engine without a download. The tensors are the model type's own weight table
(engine/models/base.py), so a new model type needs only its config here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

from metalforge.engine import models
from metalforge.intmath import cdiv

# What each model type's random model sets beyond the sizes (llama: a scaled RoPE to exercise).
CONFIGS = {
    "llama": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True),
    # a mixture of experts (8 experts, 2 a token, every layer sparse), for benchmarks/engine_decode.py's MoE row
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True, moe_intermediate_size=128),
}


def write_model(folder, arch="llama", quantized=None, dtype=mx.float32, layers=2, hidden=128, heads=2, kv_heads=1,
                inter=256, vocab=300, seed=0, shards=2, tokenizer=False, max_positions=4096, fields=None) -> Path:
    """quantized: None or (bits, group_size); fields: config.json fields over the model type's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=1),
              **CONFIGS[arch], **(fields or {})}
    if quantized:
        config["quantization"] = {"bits": quantized[0], "group_size": quantized[1]}
    args = models.parse(config)
    key = mx.random.key(seed)

    def rand(shape, std):
        nonlocal key
        key, sub = mx.random.split(key)
        return (mx.random.normal(shape, key=sub) * std).astype(dtype)

    def vector(name, n):   # norms near one, biases near zero
        return rand((n,), 0.1) if name.endswith(".bias") else 1 + rand((n,), 0.1)

    model = models.get(args.model_type)
    matrices, vecs = model.linears(args), model.vectors(args)
    # tied heads read the embeddings back: small ones keep the residual from echoing the input token
    w = {"model.embed_tokens.weight": rand((vocab, hidden), 0.05 if args.tie_word_embeddings else 1.0),
         "model.norm.weight": vector("model.norm.weight", hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in matrices.items():   # (out, in), or (experts, out, in)
            if name.startswith(p):
                w[name + ".weight"] = rand(shape, 1 / math.sqrt(shape[-1]))
        for name, n in vecs.items():
            if name.startswith(p):
                w[name] = vector(name, n)
    if "lm_head" in matrices:
        w["lm_head.weight"] = rand((vocab, hidden), 2 / math.sqrt(hidden))
    if quantized:
        bits, gs = quantized
        for name in matrices:
            wq, scales, biases = mx.quantize(w[name + ".weight"], group_size=gs, bits=bits)
            w[name + ".weight"], w[name + ".scales"], w[name + ".biases"] = wq, scales.astype(dtype), biases.astype(dtype)
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
