"""An independent reference forward pass in plain MLX ops (full recompute, no cache, dense
weights) for models written by metalforge.testing, to check the engine."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

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
