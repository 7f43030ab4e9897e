"""Where K and V live: a protocol the pool writes and attention reads through, so a quantized or
rotating store can replace today's dense one without the pool or the model changing.

Dense storage: per layer, K and V are each one (kv_heads, num_blocks * block_size, head_dim)
array; block b holds slots [b * block_size, (b + 1) * block_size) of every head. Head-major,
because a sequence whose blocks are consecutive is then one strided slice per head, which MLX's
attention reads in place: nothing per decoded token copies the sequence. Our decode kernel reads
any block order through a block table. Nothing is allocated per token: writes go into the
existing arrays.
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

    def write(self, layer: int, where, k: mx.array, v: mx.array) -> None: ...

    def read(self, layer: int, runs: list[tuple[int, int]]) -> tuple[mx.array, mx.array]: ...

    def paged(self, layer: int) -> dict[str, mx.array]: ...

    def gather(self, layer: int, slots: mx.array) -> tuple[mx.array, mx.array]: ...

    def copy(self, src: slice, dst: slice) -> None: ...


class DenseStorage:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int, dtype=mx.float16):
        self.layers, self.kv_heads, self.head_dim, self.dtype = layers, kv_heads, head_dim, dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (kv_heads, num_blocks * block_size, head_dim)
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]
        mx.eval(self.k, self.v)

    @staticmethod
    def token_bytes(layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        """Bytes one token's K and V take in every layer (for sizing a pool before making it)."""
        return 2 * layers * kv_heads * head_dim * dtype.size

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.token_bytes(self.layers, self.kv_heads, self.head_dim, self.dtype)

    def arrays(self) -> list[mx.array]:
        return self.k + self.v

    def write(self, layer: int, where, k: mx.array, v: mx.array) -> None:
        """k, v: (kv_heads, tokens, head_dim) into the slots `where` (a slice or an index array)."""
        self.k[layer] = put(self.k[layer], where, k.astype(self.dtype))
        self.v[layer] = put(self.v[layer], where, v.astype(self.dtype))

    def read(self, layer: int, runs: list[tuple[int, int]]) -> tuple[mx.array, mx.array]:
        """The K and V of `runs` ((first slot, count) each) as (1, kv_heads, tokens, head_dim): a
        view when they are one run, else the runs copied together."""
        if not runs:
            empty = mx.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
            return empty, empty

        def take(x):
            parts = [x[:, a:a + n] for a, n in runs]
            return (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1))[None]
        return take(self.k[layer]), take(self.v[layer])

    def paged(self, layer: int) -> dict[str, mx.array]:
        """Our paged decode kernel's keys and values: (kv_heads, num_blocks, block_size, head_dim) views."""
        return {"keys": blocked(self.k[layer], self.num_blocks), "values": blocked(self.v[layer], self.num_blocks)}

    def gather(self, layer: int, slots: mx.array) -> tuple[mx.array, mx.array]:
        """K and V at `slots` (sequences, keys), (sequences, kv_heads, keys, head_dim): one
        Gather each, for attention over several sequences."""
        return gather_slots(self.k[layer], slots), gather_slots(self.v[layer], slots)

    def copy(self, src: slice, dst: slice) -> None:
        for layer in range(self.layers):
            self.k[layer][:, dst] = self.k[layer][:, src]
            self.v[layer][:, dst] = self.v[layer][:, src]


def blocked(x: mx.array, num_blocks: int) -> mx.array:
    """x (kv_heads, slots, features) as (kv_heads, num_blocks, block_size, features): a view."""
    return x.reshape(x.shape[0], num_blocks, -1, x.shape[-1])


def put(x: mx.array, where, rows: mx.array) -> mx.array:
    """x (kv_heads, slots, features) with `rows` (kv_heads, tokens, features) in the slots
    `where`: one kernel, a slice update for a slice, else a scatter along the slot axis
    (indexed assignment adds index arithmetic kernels of its own)."""
    if isinstance(where, slice):
        x[:, where] = rows
        return x
    return mx.put_along_axis(x, where[None, :, None], rows, axis=1)


def gather_slots(x: mx.array, slots: mx.array) -> mx.array:
    """Rows of x (kv_heads, slots, features) at `slots` (sequences, keys), as (sequences,
    kv_heads, keys, features): one Gather, the result a view of its output (gathering whole
    blocks would need a copy to merge the block and in-block axes)."""
    return mx.take(x, slots, axis=1).transpose(1, 0, 2, 3)   # not x[:, slots]: indexing adds index kernels
