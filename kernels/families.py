"""The registry of kernel families."""
from __future__ import annotations

from metalforge.errors import MetalforgeError, choices
from metalforge.kernels.decode_attention import DecodeAttention
from metalforge.kernels.family import Family
from metalforge.kernels.gate_up import GateUp
from metalforge.kernels.gather_qmv import GatherQmv
from metalforge.kernels.norm_qkv import NormQkv
from metalforge.kernels.prefill_attention import PrefillAttention
from metalforge.kernels.qmm import Qmm
from metalforge.kernels.qmv import Qmv

FAMILIES: dict[str, Family] = {f.name: f for f in (Qmv(), Qmm(), DecodeAttention(), PrefillAttention(), GatherQmv(),
                                             GateUp(), NormQkv())}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise MetalforgeError(f"unknown kernel family '{name}'; valid families: {choices(FAMILIES)}") from None
