"""Count what a Mac would launch for a piece of MLX code: Metal kernels and host synchronisations.

On Linux MLX builds the same lazy graph it would build on a Mac, but runs it on the CPU, where
`mx.fast` ops expand into their composed fallbacks and `mx.fast.metal_kernel` does not exist. So
the count is taken on the graph, not on the CPU's execution:

- inside `counting()`, every `mx.fast` op, every `mx.fast.metal_kernel` launch and every core op
  that Metal runs as one kernel but the CPU composes from others (CORE_OPS: `mx.dequantize`, whose
  CPU graph is some twenty shifts and masks) is recorded as one dispatch and answers with an opaque
  placeholder of its output's shape (a leaf array: nothing under it is counted twice, and its
  inputs are kept so the graph feeding it is still counted);
- the graph of the outputs and of every recorded op's inputs is exported (`mx.export_to_dot`) and
  each primitive in it counted as a kernel, except views, which Metal serves without a dispatch;
- host synchronisations are calls that block on a value (`mx.eval`, `item`, `tolist`, `int()`,
  `float()`, `bool()`, numpy conversion) made inside the block.

Known approximations, the same for every engine counted: a `Reshape` is counted as a copy kernel
when a `Transpose` or `Broadcast` feeds it (MLX copies a non-contiguous array to reshape it; the
graph carries no shapes or strides, so a transpose that moves only size-1 axes, which keeps the
order of the elements, is built as the reshape it is while counting), and a fast op is one
dispatch even where MLX runs it in two kernels (two-pass decode attention) or falls back.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

# Primitives Metal serves as a view of their input (no kernel), by MLX's primitive names.
VIEWS = frozenset({"Broadcast", "BroadcastAxes", "Reshape", "Transpose", "Slice", "ExpandDims", "Squeeze",
                   "Flatten", "Unflatten", "AsStrided", "StopGradient", "Depends", "Split", "Real", "Imag"})
# Views after which a reshape must copy.
_NON_CONTIGUOUS = frozenset({"Transpose", "Broadcast", "BroadcastAxes"})
FAST_OPS = ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")
CORE_OPS = {"dequantize": "Dequantize"}   # mx.<op>: the primitive Metal runs it as
_SYNC_METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "__array__")


@dataclass
class Counts:
    kernels: collections.Counter = field(default_factory=collections.Counter)   # primitive or op name -> launches
    host_syncs: collections.Counter = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self.kernels.values())

    @property
    def syncs(self) -> int:
        return sum(self.host_syncs.values())


def _fast_output_shape(name: str, args, kwargs):
    if name == "scaled_dot_product_attention":
        q, v = args[0], args[2] if len(args) > 2 else kwargs["values"]
        return q.shape[:-1] + (v.shape[-1],), q.dtype
    return args[0].shape, args[0].dtype


def _placeholder(shape, dtype) -> mx.array:
    """A leaf array of the shape: built from host memory, so it brings no primitive into the graph."""
    return mx.array(np.zeros(shape, np.float32), dtype=dtype)


_active: list["_Recorder"] = []     # the innermost counting block's recorder last


def _counted_metal_kernel(real_factory):
    """mx.fast.metal_kernel while counting. A kernel built here may be kept by a cache and called
    later: it records into whichever counting block is open then, else builds the real kernel."""
    def factory(name: str = "metal_kernel", **kwargs):
        real = []

        def launch(*, inputs, output_shapes, output_dtypes, **launch_kwargs):
            if not _active:
                if not real:
                    real.append(real_factory(name=name, **kwargs))
                return real[0](inputs=inputs, output_shapes=output_shapes, output_dtypes=output_dtypes,
                               **launch_kwargs)
            _active[-1].op(f"metal_kernel:{name}", inputs)
            return [_placeholder(tuple(s), d) for s, d in zip(output_shapes, output_dtypes)]
        return launch
    return factory


def _transpose(original):
    """mx.array.transpose while counting: a permutation that keeps the order of the axes longer
    than 1 (a decode step's (1, H, 1, D) <-> (1, 1, H, D)) moves no element, so it is built as
    a reshape and a reshape after it is not counted as a copy."""
    def transpose(self, *axes, **kwargs):
        perm = list(axes[0]) if len(axes) == 1 and isinstance(axes[0], (list, tuple)) else list(axes)
        perm = [p % self.ndim for p in perm] or list(range(self.ndim))[::-1]
        kept = [p for p in perm if self.shape[p] != 1]
        if not kwargs and kept == sorted(kept):
            return self.reshape([self.shape[p] for p in perm])
        return original(self, *axes, **kwargs)
    return transpose


class _Recorder:
    def __init__(self):
        self.counts = Counts()
        self.kept: list[mx.array] = []     # inputs of recorded ops: their graphs are counted too

    def op(self, name: str, inputs) -> None:
        self.counts.kernels[name] += 1
        self.kept.extend(x for x in inputs if isinstance(x, mx.array))

    def fast(self, name: str):
        def run(*args, **kwargs):
            self.op(f"mx.fast.{name}", list(args) + list(kwargs.values()))
            shape, dtype = _fast_output_shape(name, args, kwargs)
            return _placeholder(shape, dtype)
        return run

    def core(self, primitive: str, original):
        def run(*args, **kwargs):
            out = original(*args, **kwargs)   # built, not evaluated: its shape and dtype
            self.op(primitive, list(args) + list(kwargs.values()))
            return _placeholder(out.shape, out.dtype)
        return run



@contextlib.contextmanager
def metal_available():
    """MLX answers that Metal is available inside the block, so an engine loaded there takes the
    paths it takes on a Mac (no CPU-only linear layers or float32 compute). Only for counting:
    nothing may be evaluated on 'Metal' here."""
    saved = mx.metal.is_available
    mx.metal.is_available = lambda: True
    try:
        yield
    finally:
        mx.metal.is_available = saved


@contextlib.contextmanager
def counting():
    """Record fast ops, custom kernels and host syncs made inside the block; finish with `count`."""
    rec = _Recorder()
    saved_fast = {n: getattr(mx.fast, n) for n in FAST_OPS + ("metal_kernel",)}
    saved_core = {n: getattr(mx, n) for n in CORE_OPS}
    saved_methods = {n: getattr(mx.array, n) for n in _SYNC_METHODS}
    saved_eval = mx.eval
    saved_transpose = mx.array.transpose

    def sync(name, original):
        def wrapped(*args, **kwargs):
            rec.counts.host_syncs[name] += 1
            return original(*args, **kwargs)
        return wrapped

    _active.append(rec)
    try:
        for n in FAST_OPS:
            setattr(mx.fast, n, rec.fast(n))
        mx.fast.metal_kernel = _counted_metal_kernel(saved_fast["metal_kernel"])
        for n, primitive in CORE_OPS.items():
            setattr(mx, n, rec.core(primitive, saved_core[n]))
        for n, original in saved_methods.items():
            setattr(mx.array, n, sync(n.strip("_"), original))
        mx.eval = sync("eval", saved_eval)
        mx.array.transpose = _transpose(saved_transpose)
        yield rec
    finally:
        _active.remove(rec)
        for n, f in saved_fast.items():
            setattr(mx.fast, n, f)
        for n, f in saved_core.items():
            setattr(mx, n, f)
        for n, f in saved_methods.items():
            setattr(mx.array, n, f)
        mx.eval = saved_eval
        mx.array.transpose = saved_transpose


_NODE = re.compile(r'\{ (\w+) \[label ="(\w+)", shape=rectangle\]; \}')
_EDGE = re.compile(r'^(\S+) -> (\S+)$')


def _applications(dot: str) -> list[tuple[str, list[str], list[str]]]:
    """(primitive name, input arrays, output arrays) per primitive application, in the order
    `export_to_dot` writes them: a declaration, then its input and output edges. One primitive
    object can serve several applications (a compiled function called per layer), so its id is
    not a key: each declaration is one application."""
    apps: list[tuple[str, list[str], list[str]]] = []
    current = None
    for line in dot.splitlines():
        line = line.strip()
        node = _NODE.match(line)
        if node:
            current = node.group(1)
            apps.append((node.group(2), [], []))
            continue
        edge = _EDGE.match(line)
        if edge and apps:
            src, dst = edge.groups()
            if dst == current:
                apps[-1][1].append(src)
            elif src == current:
                apps[-1][2].append(dst)
    return apps


def graph_kernels(arrays) -> collections.Counter:
    """Kernels Metal would launch to evaluate `arrays` (unevaluated parts only), by primitive name."""
    arrays = [a for a in arrays if isinstance(a, mx.array)]
    if not arrays:
        return collections.Counter()
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *arrays)
        apps = _applications(open(path).read())
    finally:
        os.unlink(path)
    producer = {out: i for i, (_, _, outs) in enumerate(apps) for out in outs}

    def non_contiguous(array: str) -> bool:
        app = producer.get(array)
        while app is not None and apps[app][0] in VIEWS:
            name, inputs, _ = apps[app]
            if name in _NON_CONTIGUOUS:
                return True
            app = producer.get(inputs[0]) if inputs else None
        return False

    counts = collections.Counter()
    for name, inputs, _ in apps:
        if name not in VIEWS:
            counts[name] += 1
        elif name in ("Reshape", "Flatten") and any(non_contiguous(a) for a in inputs):
            counts[f"{name} (copy)"] += 1
    return counts


def count(rec: _Recorder, outputs) -> Counts:
    """The launches of everything built inside `counting()` that `outputs` depend on, plus the
    recorded fast ops and custom kernels."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    rec.counts.kernels.update(graph_kernels(list(outputs) + rec.kept))
    return rec.counts


def engine_pass(e, tokens: dict[int, list[int]], layers: bool = True) -> Counts:
    """Counts of one forward pass of engine `e` appending `tokens[sid]` to each sequence (one
    step, the pool written as in `Engine.step`); `layers=False` counts the pass without its
    decoder layers (the embedding, final norm and head), so a layer's share is (all - outside) / layers."""
    model = e.model
    saved = model.layers
    model.layers = saved if layers else []
    try:
        with metal_available(), counting() as rec:
            step = e.pool.begin({sid: len(ids) for sid, ids in tokens.items()})
            logits = model.forward(step, mx.array([t for ids in tokens.values() for t in ids], dtype=mx.int32))
            step.commit(list(tokens.values()))
        counts = count(rec, [logits] + e.pool.storage.arrays())
    finally:
        model.layers = saved
    mx.eval(logits, e.pool.storage.arrays())
    return counts


def per_layer(full: Counts, outside: Counts, layers: int) -> collections.Counter:
    """Kernels per decoder layer by kind: (a pass - the same pass without its layers) / layers."""
    diff = collections.Counter(full.kernels)
    diff.subtract(outside.kernels)
    return collections.Counter({k: v / layers for k, v in diff.items() if v})


# ---- whole models: the engine and mlx-lm on the same folder ---------------------------------------
def _prompt(context: int) -> list[int]:
    return [1 + i % 200 for i in range(context)]


def engine_counts(folder, backend: str, device, context: int, chunk: int, mlx_for=None):
    """(layers, [decode, decode without layers], [prefill, prefill without layers]) of the
    engine on `backend` for a prefill chunk of `chunk` tokens and one decode step after
    `context` cached tokens, on the paths a Mac takes. `mlx_for(op, values)`: whether a call
    runs MLX's op whatever its decision (a step whose ops run ours or MLX's as another one's do)."""
    from metalforge import engine
    with metal_available():
        e = engine.load(folder, backend=backend, device=device, kv_tokens=context + chunk + 64)
    if mlx_for is not None:
        _run_mlx_for(e.kernels, mlx_for)
    sid = e.add_sequence()
    prompt = _prompt(context)
    engine_pass(e, {sid: prompt[:-chunk]})                 # the cache before the counted passes
    prefill = [engine_pass(e, {sid: prompt[-chunk:]}, layers=flag) for flag in (True, False)]
    decode = [engine_pass(e, {sid: [7]}, layers=flag) for flag in (True, False)]
    return e.args.num_hidden_layers, decode, prefill


def step_counts(folder, backend: str, device, context: int, plain: int, verifying: int, drafts: int):
    """Kernels of one decode step of `plain` sequences of one new token and `verifying`
    sequences verifying `drafts` drafts each (k+1 tokens), every sequence `context` tokens long,
    on the paths a Mac takes: (a pass for the plain ones and one per verifying sequence, summed:
    how the loop ran speculative requests before, one ragged pass of all of them)."""
    from metalforge import engine
    with metal_available():
        e = engine.load(folder, backend=backend, device=device, kv_tokens=2 * (plain + verifying) * (context + 64))
    prompt = _prompt(context)

    def sequences():
        sids = [e.add_sequence() for _ in range(plain + verifying)]
        for sid in sids:
            engine_pass(e, {sid: prompt})   # the cache before the counted passes
        return {sid: [7] * (1 if i < plain else drafts + 1) for i, sid in enumerate(sids)}
    alone, together = sequences(), sequences()
    parts = [{sid: t for sid, t in alone.items() if len(t) == 1}] + \
        [{sid: t} for sid, t in alone.items() if len(t) > 1]
    apart = Counts()
    for counts in (engine_pass(e, p) for p in parts if p):
        apart.kernels.update(counts.kernels)
        apart.host_syncs.update(counts.host_syncs)
    return apart, engine_pass(e, together)


def _run_mlx_for(kernels, mlx_for) -> None:
    """Make `kernels` decide MLX's op for the calls `mlx_for(op, values)` names."""
    from metalforge.engine.ops import Decision
    decide = kernels.decide

    def decided(op: str, values: dict, dtype: str):
        d = decide(op, values, dtype)
        return Decision(None, values, None, None, "MLX: as the counted step runs it") \
            if d.family is not None and mlx_for(op, values) else d
    kernels.decide = decided


class _PassThrough:
    """An mlx-lm layer that hands its input on (its attributes, such as use_sliding, stay)."""

    def __init__(self, layer):
        self._layer = layer

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def __call__(self, h, *_, **__):
        return h


def _mlx_lm_pass(model, cache, ids, layers=True) -> Counts:
    inner = model.model
    saved = inner.layers
    inner.layers = saved if layers else [_PassThrough(layer) for layer in saved]
    try:
        with counting() as rec:
            logits = model(mx.array([ids]), cache=cache)
        states = [a for c in cache for a in c.state if isinstance(a, mx.array)]
        counts = count(rec, [logits] + states)
    finally:
        inner.layers = saved
    mx.eval(logits, states)
    return counts


def mlx_lm_counts(folder, context: int, chunk: int):
    """As engine_counts, for mlx-lm's own model and cache on the same folder."""
    from pathlib import Path

    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model
    with metal_available():
        model, _ = load_model(Path(folder))
    # one real pass first: what the model builds once and keeps (Llama 3's RoPE frequencies) is
    # built there, as on a Mac, not counted in every counted pass (whose recorded ops answer with
    # placeholders, so nothing evaluates their inputs)
    mx.eval(model(mx.array([[1]])))
    prompt = _prompt(context)

    def run(layers):
        cache = make_prompt_cache(model)
        _mlx_lm_pass(model, cache, prompt[:-chunk])
        prefill = _mlx_lm_pass(model, cache, prompt[-chunk:], layers)
        decode = _mlx_lm_pass(model, cache, [7], layers)
        return decode, prefill
    (d_all, p_all), (d_out, p_out) = run(True), run(False)
    return len(model.model.layers), [d_all, d_out], [p_all, p_out]


def decode_dispatches(folder, backend: str = "metal", device=None, context: int = 256) -> dict:
    """Kernels one decode step launches per token and per layer, and host syncs, the engine's
    and mlx-lm's (None when mlx-lm is not installed), for `metalforge bench --model`."""
    def figures(layers, decode):
        return {"per_token": decode[0].total, "per_layer": sum(per_layer(*decode, layers).values()),
                "host_syncs": decode[0].syncs}
    chunk = max(1, min(16, context // 2))   # the prompt before it: a cached part and a chunk
    layers, decode, _ = engine_counts(folder, backend, device, max(context, 2), chunk)
    out = {"metalforge": figures(layers, decode), "mlx-lm": None}
    try:
        import mlx_lm  # noqa: F401  (optional: the figures side by side when installed)
    except ImportError:
        return out
    layers, decode, _ = mlx_lm_counts(folder, max(context, 2), chunk)
    out["mlx-lm"] = figures(layers, decode)
    return out
