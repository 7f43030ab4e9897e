"""Covering arrays (kernels/covering.py): the configs chosen are valid ones, and between them take
every combination of `strength` tunables' values that some valid config takes, counted here by
brute force over the valid configs."""
import itertools

import pytest

from metalforge.kernels import check
from metalforge.kernels.covering import covering_array
from metalforge.kernels.families import get as family


def combinations(configs, names, strength):
    return {tuple((n, c[n]) for n in group) for c in configs for group in itertools.combinations(names, strength)}


@pytest.mark.parametrize("name, shape, dtype, strength", [
    ("decode_attention", dict(B=1, Hq=4, Hkv=2, S=40, D=64), "float16", 3),
    ("qmm", dict(M=20, N=40, K=96, bits=4, group_size=32), "float16", 2),
    ("prefill_attention", dict(B=1, Hq=4, Hkv=2, L=70, D=64), "float16", 1),
])
def test_every_coverable_combination_is_covered_by_valid_configs(name, shape, dtype, strength):
    fam = family(name)
    valid = [c for c in fam.space() if not check(fam, c, shape, dtype, "m3-max-40")]
    chosen = covering_array(fam.params, valid, strength)
    names = [p.name for p in fam.params]
    assert all(c in valid for c in chosen)
    assert combinations(chosen, names, strength) == combinations(valid, names, strength)
    assert len(chosen) < len(valid) / 10   # a covering array, not the space


def test_a_strength_3_array_of_prefill_is_small_and_an_invalid_value_stays_out():
    """At float32 stage=input and score_type=half are invalid: no chosen config takes them, and
    the array stays near the largest 3-way product of domains (BQ x BK x heads: 100)."""
    fam = family("prefill_attention")
    shape = dict(B=1, Hq=2, Hkv=1, L=33, D=96, prefix=5)
    valid = [c for c in fam.space() if not check(fam, c, shape, "float32", "m3-max-40")]
    chosen = covering_array(fam.params, valid, 3)
    assert {c["stage"] for c in chosen} == {"float"} and {c["score_type"] for c in chosen} == {"float"}
    assert combinations(chosen, [p.name for p in fam.params], 3) == combinations(valid, [p.name for p in fam.params], 3)
    assert len(chosen) <= 150
    assert covering_array(fam.params, [], 3) == []
