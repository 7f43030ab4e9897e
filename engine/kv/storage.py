"""Where K and V live: a protocol the pool writes and attention reads through, so a quantized or
rotating store can replace today's dense one without the pool or the model changing.

Dense storage: per layer one (2, kv_heads, num_blocks * block_size, head_dim) array, K then V,
so a step writes both with one kernel (after stacking them: a kernel that computes them side by
side would spare that one) and a batch gathers both with one; K and V are views of it.
Block b holds slots [b * block_size, (b + 1) * block_size) of every head. Head-major, because a
sequence whose blocks are consecutive is then one strided slice per head, which MLX's attention
reads in place: nothing per decoded token copies the sequence. Our decode kernel reads any block
order through a block table. Nothing is allocated per token: writes go into the existing arrays.
"""
from __future__ import annotations

from typing import Protocol

import mlx.core as mx


class Storage(Protocol):
    layers: int
    kv_heads: int
    head_dim: int
    dtype: object

    @property
    def block_bytes(self) -> int: ...

    def arrays(self) -> list[mx.array]: ...

    def write(self, layer: int, where, k: mx.array, v: mx.array, kv: mx.array | None = None) -> None: ...

    def read(self, layer: int, runs: list[tuple[int, int]]) -> tuple[mx.array, mx.array]: ...

    def paged(self, layer: int) -> dict[str, mx.array]: ...

    def gather(self, layer: int, slots: mx.array) -> tuple[mx.array, mx.array]: ...

    def copy(self, src: slice, dst: slice) -> None: ...


class DenseStorage:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int, dtype=mx.float16):
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        self.kv = [mx.zeros((2, kv_heads, num_blocks * block_size, head_dim), dtype=dtype) for _ in range(layers)]
        mx.eval(self.kv)

    @staticmethod
    def token_bytes(layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        """Bytes one token's K and V take in every layer (for sizing a pool before making it)."""
        return 2 * layers * kv_heads * head_dim * dtype.size

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.token_bytes(self.layers, self.kv_heads, self.head_dim, self.dtype)

    def arrays(self) -> list[mx.array]:
        return list(self.kv)

    def write(self, layer: int, where, k: mx.array, v: mx.array, kv: mx.array | None = None) -> None:
        """k, v: (kv_heads, tokens, head_dim) into the slots `where` (a slice or an index array):
        one write of both, stacked as the layer holds them (`kv`, where the producer stacked them)."""
        self.kv[layer] = put(self.kv[layer], where, stacked(k, v, kv).astype(self.dtype))

    def read(self, layer: int, runs: list[tuple[int, int]]) -> tuple[mx.array, mx.array]:
        """The K and V of `runs` ((first slot, count) each) as (1, kv_heads, tokens, head_dim): a
        view when they are one run, else the runs copied together."""
        if not runs:
            empty = mx.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
            return empty, empty
        kv = take_runs(self.kv[layer], runs)
        return half(kv, 0)[None], half(kv, 1)[None]

    def paged(self, layer: int) -> dict[str, mx.array]:
        """Our paged decode kernel's keys and values: (kv_heads, num_blocks, block_size, head_dim) views."""
        kv = self.kv[layer]
        return {"keys": blocked(half(kv, 0), self.num_blocks), "values": blocked(half(kv, 1), self.num_blocks)}

    def gather(self, layer: int, slots: mx.array) -> tuple[mx.array, mx.array]:
        """K and V at `slots` (sequences, keys), (sequences, kv_heads, keys, head_dim): one
        Gather of both, for attention over several sequences."""
        return gather_slots(self.kv[layer], slots)

    def copy(self, src: slice, dst: slice) -> None:
        for layer in range(self.layers):
            self.kv[layer][:, :, dst] = self.kv[layer][:, :, src]


def half(kv: mx.array, i: int) -> mx.array:
    """K (i=0) or V (i=1) of an array holding both along its first axis: a view (kv[i] would
    be a Gather in MLX)."""
    return kv[i:i + 1].squeeze(0)


def take_runs(x: mx.array, runs: list[tuple[int, int]]) -> mx.array:
    """x (2, kv_heads, slots, features) at the slots of `runs`: a view for one run, else one concatenation."""
    parts = [x[:, :, a:a + n] for a, n in runs]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)


def blocked(x: mx.array, num_blocks: int) -> mx.array:
    """x (kv_heads, slots, features) as (kv_heads, num_blocks, block_size, features): a view."""
    return x.reshape(x.shape[0], num_blocks, -1, x.shape[-1])


def put(x: mx.array, where, rows: mx.array) -> mx.array:
    """x (2, kv_heads, slots, features) with `rows` (2, kv_heads, tokens, features) in the
    slots `where`: one kernel, a slice update for a slice, else a scatter along the slot axis
    (indexed assignment adds index arithmetic kernels of its own)."""
    if isinstance(where, slice):
        x[:, :, where] = rows
        return x
    return mx.put_along_axis(x, where[None, None, :, None], rows, axis=2)


def gather_slots(x: mx.array, slots: mx.array) -> tuple[mx.array, mx.array]:
    """K and V rows of x (2, kv_heads, slots, features) at `slots` (sequences, keys), each
    (sequences, kv_heads, keys, features): one Gather, the results views of its output."""
    both = mx.take(x, slots, axis=2)   # (2, kv_heads, sequences, keys, features); not x[:, :, slots] (index kernels)
    return half(both, 0).transpose(1, 0, 2, 3), half(both, 1).transpose(1, 0, 2, 3)


def stacked(k: mx.array, v: mx.array, kv: mx.array | None) -> mx.array:
    """k and v as one (2, kv_heads, tokens, head_dim) array: `kv` where a kernel wrote them so,
    else stacked (one more dispatch)."""
    return kv if kv is not None else mx.stack([k, v])
