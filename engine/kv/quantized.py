"""Quantized K/V storage (engine.load(kv_bits=8|4, kv_group_size=32|64|128)) and attention that
reads it without dequantizing the whole history.

Per layer, three arrays in mx.quantize's layout along head_dim, each holding K then V along its
first axis (as dense storage does): codes (2, kv_heads, slots, head_dim * bits / 32) uint32, and
scales and biases (2, kv_heads, slots, head_dim / group_size) in the model's dtype. Every write
quantizes (prompt, decode, prompt-cache loads), K and V in one call, so with groups of 64 a float16 token's K/V takes 53% of the bytes at 8 bits, 28% at 4
(benchmarks/kv_memory.py).

Attention multiplies the queries by the codes directly (mx.quantized_matmul, transposed for the
scores, plain for the values), as mlx-lm's quantized scaled-dot-product attention does; MLX's
fused attention op takes no quantized operands. Our decode kernel reads the codes in place
(its kv_bits variant, through `paged`).
"""
from __future__ import annotations

import mlx.core as mx

from metalforge.engine.kv.storage import blocked, gather_slots, half, put, stacked, take_runs
from metalforge.errors import MetalforgeError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def check(bits: int, group_size: int, head_dim: int) -> None:
    if bits not in BITS:
        raise MetalforgeError(f"kv_bits={bits} is not supported; supported: {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise MetalforgeError(f"kv_group_size={group_size} is not supported; supported: "
                              f"{', '.join(map(str, GROUP_SIZES))}")
    if head_dim % group_size:
        raise MetalforgeError(f"kv_group_size={group_size} does not divide the model's head_dim={head_dim}")


class QuantizedStorage:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int, dtype,
                 bits: int, group_size: int):
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.block_size, self.num_blocks, self.bits, self.group_size = block_size, num_blocks, bits, group_size
        slots = num_blocks * block_size

        def empty():   # codes, scales, biases, each K then V along the first axis (see storage.py)
            return [mx.zeros((2, kv_heads, slots, head_dim * bits // 32), dtype=mx.uint32),
                    mx.zeros((2, kv_heads, slots, head_dim // group_size), dtype=dtype),
                    mx.zeros((2, kv_heads, slots, head_dim // group_size), dtype=dtype)]
        self.kv = [empty() for _ in range(layers)]
        mx.eval(self.arrays())

    @staticmethod
    def token_bytes(layers: int, kv_heads: int, head_dim: int, dtype, bits: int, group_size: int) -> int:
        """Bytes one token's K and V take in every layer: the codes and a scale and bias per group."""
        return 2 * layers * kv_heads * (head_dim * bits // 8 + 2 * (head_dim // group_size) * dtype.size)

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.token_bytes(self.layers, self.kv_heads, self.head_dim, self.dtype, self.bits,
                                                  self.group_size)

    @property
    def quantization(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}

    def arrays(self) -> list[mx.array]:
        return [a for parts in self.kv for a in parts]

    def write(self, layer: int, where, k: mx.array, v: mx.array, kv: mx.array | None = None) -> None:
        """k, v: (kv_heads, tokens, head_dim), quantized together into the slots `where`: one
        quantization and one write each of codes, scales and biases."""
        self._put(layer, where, mx.quantize(stacked(k, v, kv).astype(self.dtype), group_size=self.group_size,
                                            bits=self.bits))

    def write_quantized(self, layer: int, where, k: list[mx.array], v: list[mx.array]) -> None:
        """Codes, scales and biases (each (kv_heads, tokens, ...)) stored as they are (prompt caches)."""
        self._put(layer, where, [mx.stack([a, b]) for a, b in zip(k, v)])

    def _put(self, layer: int, where, parts) -> None:
        self.kv[layer] = [put(x, where, q.astype(x.dtype)) for x, q in zip(self.kv[layer], parts)]

    def read_quantized(self, layer: int, runs: list[tuple[int, int]]) -> tuple[list[mx.array], list[mx.array]]:
        """The codes, scales and biases of `runs`, each (1, kv_heads, tokens, ...)."""
        parts = [take_runs(x, runs) for x in self.kv[layer]]
        return [half(x, 0)[None] for x in parts], [half(x, 1)[None] for x in parts]

    def read(self, layer: int, runs: list[tuple[int, int]]) -> tuple[mx.array, mx.array]:
        """K and V of `runs` dequantized, (1, kv_heads, tokens, head_dim)."""
        if not runs:
            empty = mx.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
            return empty, empty
        k, v = self.read_quantized(layer, runs)
        return tuple(mx.dequantize(*x, group_size=self.group_size, bits=self.bits).astype(self.dtype) for x in (k, v))

    def gather_quantized(self, layer: int, slots: mx.array) -> tuple[list[mx.array], list[mx.array]]:
        """The codes, scales and biases at `slots` (sequences, keys), each (sequences, kv_heads,
        keys, ...): one Gather per array, K and V together."""
        k, v = zip(*(gather_slots(x, slots) for x in self.kv[layer]))
        return list(k), list(v)

    def gather(self, layer: int, slots: mx.array) -> tuple[mx.array, mx.array]:
        """K and V at `slots` (sequences, keys) dequantized, (sequences, kv_heads, keys, head_dim)."""
        k, v = self.gather_quantized(layer, slots)
        return tuple(mx.dequantize(*x, group_size=self.group_size, bits=self.bits).astype(self.dtype) for x in (k, v))

    def paged(self, layer: int) -> dict[str, mx.array]:
        """Our paged decode kernel's inputs: codes, scales and biases of K and V, each (kv_heads,
        num_blocks, block_size, ...) views, by the names its kv_bits variant reads."""
        out = {}
        for i, name in enumerate(("keys", "values")):
            codes, scales, biases = (blocked(half(x, i), self.num_blocks) for x in self.kv[layer])
            out.update({name: codes, f"{name}_scales": scales, f"{name}_biases": biases})
        return out

    def copy(self, src: slice, dst: slice) -> None:
        for parts in self.kv:
            for x in parts:
                x[:, :, dst] = x[:, :, src]


def attention(q: mx.array, k: list[mx.array], v: list[mx.array], scale: float, mask, bits: int,
              group_size: int) -> mx.array:
    """q (1, Hq, L, D) over quantized k and v ((1, Hkv, T, ...) codes, scales, biases): softmax(q
    k^T * scale) v with both products on the codes. Query heads sharing a KV head are grouped
    as rows of one product. mask: (L, T) or (B, 1, L, T) bool, or None."""
    B, Hq, L, D = q.shape
    Hkv = k[0].shape[1]
    rep = Hq // Hkv
    qg = (q * scale).reshape(B, Hkv, rep, L, D)
    k = [mx.expand_dims(x, 2) for x in k]
    v = [mx.expand_dims(x, 2) for x in v]
    scores = mx.quantized_matmul(qg, *k, transpose=True, group_size=group_size, bits=bits)
    if mask is not None:
        scores = mx.where(mask if mask.ndim < 4 else mx.expand_dims(mask, 2), scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(weights, *v, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(B, Hq, L, D)
