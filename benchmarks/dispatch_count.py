"""What a Mac would launch per decoded token and per prefill chunk: the engine's Metal path (our
kernels), the engine's MLX path, and mlx-lm, on the same model folders.

    python benchmarks/dispatch_count.py FOLDER [FOLDER ...] [--context 256] [--chunk 128]
    python benchmarks/dispatch_count.py --demo      # mlx-lm-built 4-bit llama and qwen3 folders

Counted on MLX's lazy graph (engine/dispatches.py): each primitive that launches a kernel on
Metal, each mx.fast op and each of our metal_kernel calls as one, views as none; host
synchronisations made while the pass is built are counted apart. Per layer = (the whole pass -
the pass without its decoder layers) / layers. Counts, not times: they say nothing of a kernel's
length. The last line reads
    dispatches per layer (decode): ours N, mlx-lm M; host syncs per forward: K
for the last folder (ours: the Metal path).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from metalforge import engine
from metalforge.engine import dispatches
from metalforge.files import write_section

SIDES = ("ours (metal)", "ours (mlx)", "mlx-lm")


def ours(folder, backend, device, context, chunk):
    with dispatches.metal_available():
        e = engine.load(folder, backend=backend, device=device, kv_tokens=context + chunk + 64)
    sid = e.add_sequence()
    prompt = [1 + i % 200 for i in range(context)]
    dispatches.engine_pass(e, {sid: prompt[:-chunk]})                 # the cache before the counted passes
    prefill = [dispatches.engine_pass(e, {sid: prompt[-chunk:]}, layers=flag) for flag in (True, False)]
    decode = [dispatches.engine_pass(e, {sid: [7]}, layers=flag) for flag in (True, False)]
    return e.args.num_hidden_layers, decode, prefill


class _PassThrough:
    """An mlx-lm layer that hands its input on (its attributes, such as use_sliding, stay)."""

    def __init__(self, layer):
        self._layer = layer

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def __call__(self, h, *_, **__):
        return h


def _mlx_lm_pass(model, cache, ids, layers=True):
    inner = model.model
    saved = inner.layers
    inner.layers = saved if layers else [_PassThrough(layer) for layer in saved]
    try:
        with dispatches.counting() as rec:
            logits = model(mx.array([ids]), cache=cache)
        states = [a for c in cache for a in c.state if isinstance(a, mx.array)]
        counts = dispatches.count(rec, [logits] + states)
    finally:
        inner.layers = saved
    mx.eval(logits, states)
    return counts


def theirs(folder, context, chunk):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model
    with dispatches.metal_available():
        model, _ = load_model(Path(folder))
    prompt = [1 + i % 200 for i in range(context)]

    def run(layers):
        cache = make_prompt_cache(model)
        _mlx_lm_pass(model, cache, prompt[:-chunk])
        prefill = _mlx_lm_pass(model, cache, prompt[-chunk:], layers)
        decode = _mlx_lm_pass(model, cache, [7], layers)
        return decode, prefill
    (d_all, p_all), (d_out, p_out) = run(True), run(False)
    return len(model.model.layers), [d_all, d_out], [p_all, p_out]


def per_layer(pair, layers) -> collections.Counter:
    return dispatches.per_layer(*pair, layers)


def demo_folders(root: Path) -> list[Path]:
    """A 4-bit llama and qwen3 built and saved by mlx-lm's own model classes."""
    from mlx_lm.models import llama, qwen3
    from mlx_lm.utils import quantize_model, save_config, save_model
    out = []
    for name, module, extra in (("llama", llama, {}), ("qwen3", qwen3, {"head_dim": 64, "tie_word_embeddings": True})):
        config = dict(model_type=name, hidden_size=256, num_hidden_layers=4, intermediate_size=512,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
                      rope_theta=10000.0, max_position_embeddings=4096, **{"tie_word_embeddings": False, **extra})
        mx.random.seed(0)
        model = module.Model(module.ModelArgs.from_dict(config))
        mx.eval(model.parameters())
        model, config = quantize_model(model, config, group_size=64, bits=4)
        folder = root / f"{name}-4bit"
        save_model(folder, model)
        save_config(config, folder / "config.json")
        out.append(folder)
    return out


def report(folder, results) -> tuple[float, float, int]:
    print(f"\n== {folder}")
    for what in ("decode", "prefill"):
        print(f"  {what}: kernels per token / per layer / outside the layers; host syncs per forward")
        rows = {}
        for side in SIDES:
            layers, pair = results[side]["layers"], results[side][what]
            rows[side] = per_layer(pair, layers)
            full, outside = pair
            print(f"    {side:13} {full.total:6d} / {sum(rows[side].values()):6.1f} / {outside.total:4d};"
                  f" host syncs {full.syncs}")
        kinds = sorted(set(rows["ours (metal)"]) | set(rows["mlx-lm"]))
        delta = {k: rows["ours (metal)"].get(k, 0) - rows["mlx-lm"].get(k, 0) for k in kinds}
        shown = ", ".join(f"{k} {v:+g}" for k, v in delta.items() if v)
        print(f"    per layer, ours (metal) - mlx-lm by kind: {shown or 'none'}")
    ours_layer = sum(per_layer(results["ours (metal)"]["decode"], results["ours (metal)"]["layers"]).values())
    theirs_layer = sum(per_layer(results["mlx-lm"]["decode"], results["mlx-lm"]["layers"]).values())
    syncs = results["ours (metal)"]["decode"][0].syncs
    return ours_layer, theirs_layer, syncs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", type=Path)
    p.add_argument("--demo", action="store_true", help="count mlx-lm-built 4-bit llama and qwen3 folders")
    p.add_argument("--device", default="m3-max-40", help="the device profile whose tuned configs the Metal path uses")
    p.add_argument("--context", type=int, default=300, help="tokens in the cache before the counted passes")
    p.add_argument("--chunk", type=int, default=128, help="prompt tokens in the counted prefill pass")
    p.add_argument("--out", type=Path, help="also write the report into this Markdown file's 'Dispatches' section")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    folders = list(args.folders) + (demo_folders(Path(tmp.name)) if args.demo else [])
    if not folders:
        p.error("give model folders or --demo")
    line = ""
    printed = io.StringIO()
    for folder in folders:
        results = {}
        for side, backend in (("ours (metal)", "metal"), ("ours (mlx)", "mlx")):
            layers, decode, prefill = ours(folder, backend, args.device, args.context, args.chunk)
            results[side] = dict(layers=layers, decode=decode, prefill=prefill)
        layers, decode, prefill = theirs(folder, args.context, args.chunk)
        results["mlx-lm"] = dict(layers=layers, decode=decode, prefill=prefill)
        with contextlib.redirect_stdout(Tee(printed)):
            n, m, k = report(folder.name if args.demo else folder, results)
        line = f"dispatches per layer (decode): ours {n:g}, mlx-lm {m:g}; host syncs per forward: {k}"
    print(line)
    if args.out:
        write_section(args.out, "Dispatches per token", SECTION.format(
            command=" ".join(["python benchmarks/dispatch_count.py"] + (argv if argv is not None else sys.argv[1:])),
            report=printed.getvalue().strip() + "\n" + line))
    return 0


class Tee(io.TextIOBase):
    """Print and keep: the report goes to the terminal and into the Markdown file."""

    def __init__(self, kept: io.StringIO):
        self.kept = kept

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)
        return self.kept.write(text)


SECTION = """## Dispatches per token

Written by `{command}`: Metal kernels a Mac would launch for one decode step and one prefill
chunk (counted on MLX's graph; see `engine/dispatches.py` for what counts and its two
approximations), the engine's Metal path (our kernels), its MLX path, and mlx-lm, side by side.

```
{report}
```
"""


if __name__ == "__main__":
    sys.exit(main())
