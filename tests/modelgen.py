"""Random-weight models written in the exact mlx-lm folder format, and an independent reference
forward pass in plain MLX ops (full recompute, no cache, dense weights) to check the engine."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

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
                inter=256, vocab=300, seed=0, shards=2, tokenizer=False) -> Path:
    """quantized: None or (bits, group_size)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    config = {**dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=1),
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
    per = -(-len(names) // shards)
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
def reference_logits(folder, tokens: list[int]) -> mx.array:
    """Logits (len(tokens), vocab) of the whole sequence, recomputed from scratch in float32."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    raw = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw.update(mx.load(str(f)))
    q = cfg.get("quantization")

    def dense(base):
        if base + ".scales" in raw:
            return mx.dequantize(raw[base + ".weight"], raw[base + ".scales"], raw[base + ".biases"],
                                 group_size=q["group_size"], bits=q["bits"]).astype(mx.float32)
        return raw[base + ".weight"].astype(mx.float32)

    def get(name):
        return raw[name].astype(mx.float32)

    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    T = len(tokens)

    def rms(x, weight):
        return x / mx.sqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    # rotary angles, with llama3 frequency scaling done the long way round
    freqs = [1.0 / (cfg["rope_theta"] ** (2 * i / D)) for i in range(D // 2)]
    sc = cfg.get("rope_scaling")
    if sc and sc.get("rope_type") == "llama3":
        old, factor = sc["original_max_position_embeddings"], sc["factor"]
        lo, hi = sc["low_freq_factor"], sc["high_freq_factor"]
        scaled = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                scaled.append(f)
            elif wavelen > old / lo:
                scaled.append(f / factor)
            else:
                s = (old / wavelen - lo) / (hi - lo)
                scaled.append((1 - s) * f / factor + s * f)
        freqs = scaled
    ang = mx.array([[p * f for f in freqs] for p in range(T)], dtype=mx.float32)   # (T, D/2)

    def rotate(x):   # x: (heads, T, D), halves rotated as in Llama's non-interleaved RoPE
        a, b = x[..., : D // 2], x[..., D // 2:]
        c, s = mx.cos(ang), mx.sin(ang)
        return mx.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    ids = mx.array(tokens)
    h = (dense("model.embed_tokens")[ids])
    mask = mx.triu(mx.full((T, T), -mx.inf), k=1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, get(p + "input_layernorm.weight"))

        def proj(name):
            y = x @ dense(p + name).T
            return y + get(p + name + ".bias") if p + name + ".bias" in raw else y

        qh = proj("self_attn.q_proj").reshape(T, H, D).transpose(1, 0, 2)
        kh = proj("self_attn.k_proj").reshape(T, KV, D).transpose(1, 0, 2)
        vh = proj("self_attn.v_proj").reshape(T, KV, D).transpose(1, 0, 2)
        if cfg["model_type"] == "qwen3":
            qh = rms(qh, get(p + "self_attn.q_norm.weight"))
            kh = rms(kh, get(p + "self_attn.k_norm.weight"))
        qh, kh = rotate(qh), rotate(kh)
        kh, vh = mx.repeat(kh, H // KV, axis=0), mx.repeat(vh, H // KV, axis=0)
        att = mx.softmax(qh @ kh.transpose(0, 2, 1) / math.sqrt(D) + mask, axis=-1) @ vh
        h = h + att.transpose(1, 0, 2).reshape(T, H * D) @ dense(p + "self_attn.o_proj").T
        x = rms(h, get(p + "post_attention_layernorm.weight"))
        g, u = x @ dense(p + "mlp.gate_proj").T, x @ dense(p + "mlp.up_proj").T
        h = h + (g / (1 + mx.exp(-g)) * u) @ dense(p + "mlp.down_proj").T
    h = rms(h, get("model.norm.weight"))
    head = dense("model.embed_tokens") if cfg.get("tie_word_embeddings") else dense("lm_head")
    return h @ head.T


def reference_greedy(folder, prompt: list[int], n: int) -> tuple[list[int], list[mx.array]]:
    tokens, logits_seen = list(prompt), []
    for _ in range(n):
        logits = reference_logits(folder, tokens)[-1]
        logits_seen.append(logits)
        tokens.append(int(mx.argmax(logits).item()))
    return tokens[len(prompt):], logits_seen
