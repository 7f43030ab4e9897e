"""What each layer's attention reads of a sequence. Every supported model type attends to the
whole history; a sliding-window layer would be a spec whose first visible position trails the
sequence's end (and whose older blocks could go back to the pool)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FullAttention:
    def first_visible(self, length: int) -> int:
        """The first position a query at the end of a `length`-token sequence attends to."""
        return 0
