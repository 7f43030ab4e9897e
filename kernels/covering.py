"""Covering arrays over a family's tunables: a few valid configs that between them take every
combination of `strength` tunables' values that some valid config takes.

A space too large to run whole (prefill's 153,600 configs at about a second a compile) is
checked by a strength-3 array: a defect that needs three tunables at particular values to show
is met by at least one config run. Built greedily, as AETG (Cohen et al., 1997) does but with
the valid configs themselves as the candidates (so constraints between tunables are never
broken): each step takes the config that covers the most combinations not yet covered, until
every coverable combination is; deterministic (ties go to the earlier config of the space's order).
"""
from __future__ import annotations

import itertools

import numpy as np


def covering_array(params, configs: list[dict], strength: int) -> list[dict]:
    """Configs from `configs` (the valid ones) covering every `strength`-way combination of
    `params`' values that any of `configs` takes (strength 1: every value of every tunable)."""
    if not configs:
        return []
    names = [p.name for p in params]
    index = [{v: i for i, v in enumerate(p.domain)} for p in params]
    values = np.array([[index[k][c[n]] for k, n in enumerate(names)] for c in configs], dtype=np.int64)
    sizes = [len(p.domain) for p in params]
    strength = min(strength, len(names))
    # each group of `strength` tunables: one code per combination of their values, per config
    codes, uncovered = [], []
    for group in itertools.combinations(range(len(names)), strength):
        code = np.zeros(len(configs), dtype=np.int64)
        for k in group:
            code = code * sizes[k] + values[:, k]
        missing = np.zeros(int(np.prod([sizes[k] for k in group])), dtype=bool)
        missing[code] = True   # coverable: some valid config takes it
        codes.append(code)
        uncovered.append(missing)
    chosen = []
    while any(m.any() for m in uncovered):
        gain = sum(m[c].astype(np.int64) for c, m in zip(codes, uncovered))
        best = int(np.argmax(gain))
        chosen.append(configs[best])
        for c, m in zip(codes, uncovered):
            m[c[best]] = False
    return chosen
