"""The price of one decode step of a model on a device (and of a prompt, chunk by chunk), in one
place: the whole-model fit (engine/whole_model.py) prices mlx-lm's published runs with it,
benchmarks/modelled_decode.py prices the engine's step against mlx-lm's with it.

A step is the model's op plan (engine/models/: `op_plan`; step_ops and chunk_ops count how often
a step or a prompt chunk runs each op) priced op by op - MLX's real kernels chosen by MLX's rules (`compare.mlx_counted`, the job
`metalforge compare` prices against the first family serving the op), or our family's chosen
config from its trace - plus every other dispatch of the step (engine/step_glue.py, counted on
MLX's graph). Its time is linear in the two constants the whole-model fit finds (Cost): the
kernels' time but for their DRAM reads and dispatch cost (the per-kernel fit's constants), the
DRAM factor times bytes / bandwidth, and a per-dispatch cost `d` for every dispatch, priced
kernels and others alike. A kernel's own `launch` constant is left out: it is the host round
trip of a kernel timed alone, which a pipelined step does not pay per kernel.

The other dispatches' bytes are an ANALYTIC count, not a trace (MLX's elementwise kernels are not
run in the emulator yet): each reads two and writes one fp16 vector of the residual stream's
width (the SwiGLU product, one a layer on every side, moves intermediate / hidden times more:
left out). Sampling is left out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from metalforge.engine import models
from metalforge.engine.step_glue import GlueCounts, Roles
from metalforge.errors import MetalforgeError
from metalforge.kernels import dtypes
from metalforge.kernels.families import get as get_family
from metalforge.kernels.timing import compare, fit, model

DTYPE = "float16"


@dataclass(frozen=True)
class Cost:
    """Seconds of dispatches in a step = fixed_s + dram x dram_s + d x dispatches, for the
    whole-model fit's DRAM factor `dram` and per-dispatch cost `d`."""

    fixed_s: float = 0.0      # the per-kernel model's price but for its DRAM and launch terms
    dram_s: float = 0.0       # bytes / bandwidth (per active share): the DRAM factor's coefficient
    dispatches: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.fixed_s + other.fixed_s, self.dram_s + other.dram_s, self.dispatches + other.dispatches)

    def times(self, n: float) -> "Cost":
        return Cost(self.fixed_s * n, self.dram_s * n, self.dispatches * n)

    def seconds(self, dram: float, d: float) -> float:
        return self.fixed_s + dram * self.dram_s + d * self.dispatches

    def shipped_seconds(self) -> float:
        """Seconds under the shipped whole-model constants."""
        whole = fit.shipped()["whole_model"]
        return self.seconds(whole["dram"], whole["dispatch_s"])


def counted_cost(counted, device, constants) -> Cost:
    """The Cost of traced dispatches (traces.Counted) queued in a step, priced with `constants`."""
    t = model.terms(counted, device)
    c = constants.vector()
    dram, launch = model.TERMS.index("dram"), model.TERMS.index("launch")
    c[dram] = c[launch] = 0.0
    return Cost(float(t @ c), float(t[dram]), float(t[launch]))


def _linear_times(args, cls, rows: int, head: bool) -> dict:
    """How often a pass of `rows` rows runs each linear's sizes (the model's linears of that shape)."""
    table = cls.forward_linears(args)
    if not head:
        table.pop("lm_head")
    times: dict = {}
    for name, shape in table.items():
        bits, group_size, _ = args.quant_of(name)
        key = tuple(dict(M=rows, N=shape[-2], K=shape[-1], bits=bits, group_size=group_size).items())
        times[key] = times.get(key, 0) + 1
    return times


def _with_times(args, plan, times: dict) -> list[tuple[str, dict, int]]:
    """The plan's ops with how often a pass runs each: a plain linear as often as the model holds
    it, every other op (a projection with its residual add included) once per layer."""
    out = []
    for p in plan:
        plain = p.op == "linear" and not p.values.get("residual")   # a residual one: o_proj or down_proj, once a layer
        n = times.get(tuple(p.values.items()), 0) if plain else args.num_hidden_layers
        out.append((p.op, p.values, n))
    return out


def step_ops(config: dict, context: int) -> list[tuple[str, dict, int]]:
    """(op, sizes, times per step) of the op plan's decode ops after `context` tokens."""
    args = models.parse(config, "config")
    cls = models.get(args.model_type)
    return _with_times(args, cls.op_plan(args, contexts=[context], batch=1), _linear_times(args, cls, 1, head=True))


def chunk_ops(config: dict, start: int, n: int) -> list[tuple[str, dict, int]]:
    """(op, sizes, times) of a prompt chunk of `n` tokens after `start` cached ones: the op plan's
    prefill ops (each linear but the LM head at M = n, attention over the chunk and the keys
    before it)."""
    if n < 2:
        raise MetalforgeError(f"a prompt chunk of {n} token is a decode step, not priced as a prefill chunk")
    args = models.parse(config, "config")
    cls = models.get(args.model_type)
    plan = [p for p in cls.op_plan(args, prefill=[n])
            if (p.op == "linear" and p.values["M"] == n) or (p.op == "attention" and p.values["new"] == n)]
    plan = [dataclasses.replace(p, values=dict(p.values, context=start + n)) if p.op == "attention" else p
            for p in plan]
    return _with_times(args, plan, _linear_times(args, cls, n, head=False))


def mlx_price(op: str, values: dict, device, constants) -> Cost:
    """MLX's real kernels for one op as mlx-lm runs it: the job `metalforge compare` prices
    against the first family serving the op (compare.mlx_counted), at the call as mlx-lm makes
    it (Family.mlx_op_shape)."""
    from metalforge.kernels.families import FAMILIES
    serving = ((f.name, f.mlx_op_shape(values)) for f in FAMILIES.values() if f.op == op)
    family, fields = next(((name, s) for name, s in serving if s is not None), (None, None))
    if fields is None:
        raise MetalforgeError(f"op '{op}' {values}: not a job of any family (Family.op): MLX's kernels for it are not priced")
    return counted_cost(compare.mlx_counted(family, fields, dtypes.get(DTYPE), device), device, constants)


def mlx_prices(device, constants):
    """mlx_price for `device` and `constants`, once per op: MLX's kernel for an op costs the same
    whichever side runs it and in every prompt chunk of its size, and each price reads the op's
    traces from the disk cache, so a step's sides and a prompt's chunks share one price."""
    memo: dict = {}

    def price(op: str, values: dict) -> Cost:
        key = (op, tuple(values.items()))
        if key not in memo:
            memo[key] = mlx_price(op, values, device, constants)
        return memo[key]
    return price


def ours_price(decision, device, constants) -> Cost:
    """Our family's chosen config for an op the engine decided (ops.Decision), from its trace."""
    fam = get_family(decision.family)
    counted = compare.ours_counted(fam, fam.config(decision.config), decision.shape, dtypes.get(DTYPE), device)
    return counted_cost(counted, device, constants)


def glue_cost(config: dict, dispatches: float, device) -> Cost:
    """`dispatches` other dispatches of a step (not priced kernels): each moves three fp16 vectors
    of the residual stream's width (the module docstring's analytic count)."""
    bytes_ = 3 * config["hidden_size"] * 2
    return Cost(0.0, dispatches * bytes_ / (device.memory_bandwidth_gbs * 1e9), dispatches)


@dataclass(frozen=True)
class Step:
    """One side's decode step under the shipped constants: its op plan's kernels, every other
    dispatch, and how many dispatches it makes in all."""

    kernels_s: float
    glue_s: float
    dispatches: float

    @classmethod
    def of(cls, kernels: Cost, glue: Cost) -> "Step":
        return cls(kernels.shipped_seconds(), glue.shipped_seconds(), kernels.dispatches + glue.dispatches)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / (self.kernels_s + self.glue_s)


def _glue_of(config: dict, g, device) -> Cost:
    return glue_cost(config, g.per_layer * models.parse(config, "config").num_hidden_layers + g.outside, device)


def mlx_lm_parts(config: dict, context: int, device, constants, glue_counts: GlueCounts,
                 price=None) -> tuple[Cost, Cost]:
    """(kernels, other dispatches) of mlx-lm's decode step after `context` tokens: MLX's real
    kernels for every op of the plan (by `price`, one of mlx_prices: a caller pricing the ops
    for other sides too shares its own), and mlx-lm's other dispatches as its graph launches them."""
    price = price or mlx_prices(device, constants)
    kernels = sum((price(op, values).times(n) for op, values, n in step_ops(config, context)), Cost())
    return kernels, _glue_of(config, glue_counts.mlx_lm, device)


def prefill_parts(config: dict, tokens: int, chunk: int, device, constants, glue_counts: GlueCounts) -> tuple[Cost, Cost]:
    """(kernels, other dispatches) of mlx-lm's prefill of a `tokens`-token prompt in chunks of
    `chunk`: per chunk its ops (chunk_ops) by MLX's real kernels, and mlx-lm's other dispatches
    of a chunk (counted on a 16-token chunk), each moving three fp16 vectors a token."""
    kernels, glue = Cost(), Cost()
    price = mlx_prices(device, constants)
    one = _glue_of(config, glue_counts.mlx_lm_prefill, device)   # a chunk's dispatches, bytes of one token
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        kernels += sum((price(op, values).times(k) for op, values, k in chunk_ops(config, start, n)), Cost())
        glue += Cost(0.0, one.dram_s * n, one.dispatches)
    return kernels, glue


def steps(config: dict, context: int, device, glue_counts: GlueCounts) -> dict[str, Step]:
    """Per side ("ours (auto)", "ours (metal)", "mlx-lm"): the modelled decode step under
    the shipped constants, each op priced by whichever side runs it (MLX's kernel for an op
    priced once for every side: mlx_prices), and the other dispatches as that mix launches them."""
    from metalforge.engine.ops import Kernels
    constants = fit.shipped()["constants"]
    price = mlx_prices(device, constants)
    roles = Roles(models.parse(config, "config"))
    auto = Kernels("emulator", device)
    auto.by_evidence = True            # what `auto` does on a Mac
    ours = {"ours (auto)": auto, "ours (metal)": Kernels("emulator", device)}
    kernels = {side: Cost() for side in ours}
    mlx_roles = {side: set() for side in ours}   # per side: the roles of the ops MLX's op runs
    for op, values, n in step_ops(config, context):
        for side, k in ours.items():
            d = k.decide(op, values, DTYPE)
            if d.family:
                kernels[side] += ours_price(d, device, constants).times(n)
                continue
            kernels[side] += price(op, values).times(n)
            if roles.of(op, values) is not None:
                mlx_roles[side].add(roles.of(op, values))
    # a fused op the small folder has and the model not (no family of ours serves its size) runs MLX's
    unserved = set(glue_counts.roles.all()) - set(roles.all())
    out = {side: Step.of(kernels[side], _glue_of(config, glue_counts.ours(mlx_roles[side] | unserved), device))
           for side in ours}
    out["mlx-lm"] = Step.of(*mlx_lm_parts(config, context, device, constants, glue_counts, price))
    return out
