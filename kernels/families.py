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

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make a family known to everything that lists families (tuner, engine ops, CLI, tests)."""
    if not family.name or family.name in FAMILIES:
        raise MetalforgeError(f"a family needs a name of its own; {family.name!r} is taken or empty")
    FAMILIES[family.name] = family
    return family


# The one line a new family adds. Order matters where families serve the same engine op: the
# first that serves a call's shape is asked first (qmv before qmm, decode before prefill).
for _family in (Qmv(), Qmm(), DecodeAttention(), PrefillAttention(), GatherQmv(), GateUp(), NormQkv()):
    register(_family)


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise MetalforgeError(f"unknown kernel family '{name}'; valid families: {choices(FAMILIES)}") from None
