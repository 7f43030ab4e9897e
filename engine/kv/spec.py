"""What each layer's attention reads of a sequence. Positions here are indices into the
sequence (token 0, 1, ...). A query at position p reads the keys its spec makes visible, never
past itself; a step of several new tokens reads the union of its queries' keys and masks each.
Positions no later query can see are `dead`: the pool gives their blocks back."""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from metalforge import arguments
from metalforge.errors import MetalforgeError

# First positions a sliding window keeps, as mlx-lm's rotating cache keeps them (its keep=4).
SINKS = 4


@dataclass(frozen=True)
class FullAttention:
    """Every earlier position."""

    def reads(self, first: int, length: int) -> list[tuple[int, int]]:
        """[start, end) ranges the queries at positions first..length-1 read together."""
        return [(0, length)]

    def dead(self, first: int) -> tuple[int, int]:
        """[start, end) of positions no query at `first` or later reads (empty here)."""
        return 0, 0

    def whole(self, length: int) -> bool:
        """Whether every query of a sequence of `length` positions sees every key before it."""
        return True

    def visible(self, keys: mx.array, queries: mx.array) -> mx.array:
        """(queries, keys) bool: whether each query position sees each key position."""
        return keys[None, :] <= queries[:, None]


@dataclass(frozen=True)
class SinkWindow:
    """mlx-lm's RotatingKVCache(max_size=window, keep=sinks) as decoding sees it: a query sees the
    first `sinks` positions (attention sinks) and the last `window - sinks` up to itself, so at
    most `window` keys. mlx-lm's cache only rotates while decoding: within one prompt step longer
    than the window it masks a plain sliding window of `window` keys (no sinks); here every query,
    in a prompt or not, follows the one rule above."""

    window: int
    sinks: int = SINKS

    def _start(self, position: int) -> int:
        return position + 1 - (self.window - self.sinks)

    def reads(self, first: int, length: int) -> list[tuple[int, int]]:
        lo = self._start(first)
        return [(0, length)] if lo <= self.sinks else [(0, self.sinks), (lo, length)]

    def dead(self, first: int) -> tuple[int, int]:
        return self.sinks, max(self.sinks, self._start(first))

    def whole(self, length: int) -> bool:
        return length <= self.window

    def visible(self, keys: mx.array, queries: mx.array) -> mx.array:
        q, k = queries[:, None], keys[None, :]
        return (k <= q) & ((k < self.sinks) | (k >= q + 1 - (self.window - self.sinks)))


def sink_window(max_kv_size: int, kv_tokens: int) -> SinkWindow:
    """A max_kv_size option as a window, checked against the pool's size in tokens."""
    arguments.positive_int("max_kv_size", max_kv_size)
    if max_kv_size <= SINKS or max_kv_size > kv_tokens:
        raise MetalforgeError(f"max_kv_size={max_kv_size} must exceed the {SINKS} attention sinks and fit "
                              f"the pool's kv_tokens={kv_tokens}")
    return SinkWindow(max_kv_size)
