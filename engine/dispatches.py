"""Count what a Mac would launch for a piece of MLX code: Metal kernels and host synchronisations.

On Linux MLX builds the same lazy graph it would build on a Mac, but runs it on the CPU, where
`mx.fast` ops expand into their composed fallbacks and `mx.fast.metal_kernel` does not exist. So
the count is taken on the graph, not on the CPU's execution:

- inside `counting()`, every `mx.fast` op and every `mx.fast.metal_kernel` launch is recorded as one
  dispatch and answers with an opaque placeholder of its output's shape (a leaf array: nothing
  under it is counted twice, and its inputs are kept so the graph feeding it is still counted);
- the graph of the outputs and of every recorded op's inputs is exported (`mx.export_to_dot`) and
  each primitive in it counted as a kernel, except views, which Metal serves without a dispatch;
- host synchronisations are calls that block on a value (`mx.eval`, `item`, `tolist`, `int()`,
  `float()`, `bool()`, numpy conversion) made inside the block.

Known approximations, the same for every engine counted: a `Reshape` is counted as a copy kernel
when a `Transpose` or `Broadcast` feeds it (MLX copies a non-contiguous array to reshape it; the
graph carries no shapes, so a transpose that only moves size-1 axes is counted too), and a fast op
is one dispatch even where MLX runs it in two kernels (two-pass decode attention) or falls back.
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
    host = np.zeros(shape, np.float32)
    return mx.array(host).astype(dtype) if dtype != mx.float32 else mx.array(host)


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

    def metal_kernel(self, name: str = "metal_kernel", **_):
        def launch(*, inputs, output_shapes, output_dtypes, **__):
            self.op(f"metal_kernel:{name}", inputs)
            return [_placeholder(tuple(s), d) for s, d in zip(output_shapes, output_dtypes)]
        return launch


@contextlib.contextmanager
def counting():
    """Record fast ops, custom kernels and host syncs made inside the block; finish with `count`."""
    rec = _Recorder()
    saved_fast = {n: getattr(mx.fast, n) for n in FAST_OPS + ("metal_kernel",)}
    saved_methods = {n: getattr(mx.array, n) for n in _SYNC_METHODS}
    saved_eval = mx.eval

    def sync(name, original):
        def wrapped(*args, **kwargs):
            rec.counts.host_syncs[name] += 1
            return original(*args, **kwargs)
        return wrapped

    try:
        for n in FAST_OPS:
            setattr(mx.fast, n, rec.fast(n))
        mx.fast.metal_kernel = rec.metal_kernel
        for n, original in saved_methods.items():
            setattr(mx.array, n, sync(n.strip("_"), original))
        mx.eval = sync("eval", saved_eval)
        yield rec
    finally:
        for n, f in saved_fast.items():
            setattr(mx.fast, n, f)
        for n, f in saved_methods.items():
            setattr(mx.array, n, f)
        mx.eval = saved_eval


_NODE = re.compile(r'\{ (\w+) \[label ="(\w+)", shape=rectangle\]; \}')
_EDGE = re.compile(r'^(\S+) -> (\S+)$')


def graph_kernels(arrays) -> collections.Counter:
    """Kernels Metal would launch to evaluate `arrays` (unevaluated parts only), by primitive name."""
    arrays = [a for a in arrays if isinstance(a, mx.array)]
    if not arrays:
        return collections.Counter()
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *arrays)
        text = open(path).read()
    finally:
        os.unlink(path)
    label = dict(_NODE.findall(text))
    producer: dict[str, str] = {}      # array node -> primitive node that wrote it
    feeds: dict[str, list[str]] = collections.defaultdict(list)   # primitive node -> its input arrays
    for line in text.splitlines():
        m = _EDGE.match(line.strip())
        if not m:
            continue
        src, dst = m.groups()
        if src in label:
            producer[dst] = src
        elif dst in label:
            feeds[dst].append(src)

    def non_contiguous(array_node: str) -> bool:
        prim = producer.get(array_node)
        while prim is not None and label[prim] in VIEWS:
            if label[prim] in _NON_CONTIGUOUS:
                return True
            inputs = feeds.get(prim, [])
            prim = producer.get(inputs[0]) if inputs else None
        return False

    counts = collections.Counter()
    for node, name in label.items():
        if name not in VIEWS:
            counts[name] += 1
        elif name in ("Reshape", "Flatten") and any(non_contiguous(a) for a in feeds.get(node, [])):
            counts[f"{name} (copy)"] += 1
    return counts


def count(rec: _Recorder, outputs) -> Counts:
    """The launches of everything built inside `counting()` that `outputs` depend on, plus the
    recorded fast ops and custom kernels."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    rec.counts.kernels.update(graph_kernels(list(outputs) + rec.kept))
    return rec.counts
