"""Speculative decoding, ours beside mlx-lm's (stream_generate with draft_model=), greedy, on the
same model folders and the same backend: decode tokens/s and how many tokens came from the draft,
with a draft that agrees often (the target itself quantized to 4 bits) and one that rarely does (a
small model of other weights), plus plain decoding and our prompt lookup. Prints one table.

    python benchmarks/speculative.py [--tokens 64] [--num-draft 3] [--hidden 768] [--layers 6]
                                     [--out docs/benchmarks.md]

The models are random-weight llamas in the exact mlx-lm format, float32. Off a Mac both run MLX's
CPU backend: these are CPU numbers, not Metal ones. On the CPU a forward pass costs about the
same for 1 and 4 tokens only while it is bound by reading the weights; a 4-bit draft is not
cheaper to run than the float32 target there, so the figures show what verification costs more
than what a Mac gains. `--out` writes the table, with the words that explain it (SECTION), into
that Markdown file's "Speculative decoding" section (another target size into a section of its
own).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from metalforge import engine
from metalforge.files import write_section
from metalforge.provenance import command, revision
from metalforge.testing import write_model

VOCAB = 8000
HIDDEN, LAYERS = 768, 6
HEADING = "Speculative decoding"
SECTION = """## {heading}

Written by `{command}` at revision {revision} ({machine}, MLX's {device} backend{where}). Ours
(`generate(draft=, num_draft=)`, `prompt_lookup=`) beside mlx-lm's `stream_generate(...,
draft_model=, num_draft_tokens=)`, greedy, {tokens} tokens, k={k}, on random-weight llamas in
mlx-lm's format: the target hidden {hidden} x {layers} layers, float32; an agreeing draft (the
target at 4 bits) and a rarely agreeing one (a small model of other weights). "Same tokens" says
whether ours decoded the plain run's tokens (greedy speculation must).

| greedy, {tokens} tokens, k={k} | ours tok/s | mlx-lm tok/s | ratio | from draft ours / mlx-lm | same tokens as plain |
|---|---:|---:|---:|---:|---|
{rows}

On a CPU a 4-bit draft costs about what the float32 target does and a (k+1)-token pass costs
more than a 1-token one, so speculation slows both implementations there, and host time per
pass weighs most on a small target (a verify pass is a scheduler step plus a separate draft
engine's steps); on a Mac, where decode is bound by reading the weights, the (k+1)-token verify
costs about one decode step.
"""


def folders(root: Path, hidden: int, layers: int) -> dict[str, Path]:
    common = dict(arch="llama", heads=hidden // 64, kv_heads=max(1, hidden // 256), vocab=VOCAB, shards=1,
                  tokenizer=True)
    return {"target": write_model(root / "target", hidden=hidden, layers=layers, inter=hidden * 11 // 4, seed=1,
                                  **common),
            "agreeing": write_model(root / "target-q4", hidden=hidden, layers=layers, inter=hidden * 11 // 4, seed=1,
                                    quantized=(4, 64), **common),
            "rarely": write_model(root / "small", hidden=256, layers=1, inter=512, seed=9,
                                  **{**common, "heads": 4, "kv_heads": 1})}


def prompt() -> list[int]:
    """A prompt with repeats, as code or documents have (prompt lookup needs earlier matches)."""
    phrase = [(37 * i) % (VOCAB - 2) + 2 for i in range(24)]
    return phrase + [5, 6, 7] + phrase + [9, 10]


def ours(e, max_tokens, **spec) -> dict:
    gen = e.generate(prompt(), max_tokens=max_tokens, **spec)
    ids = [t.id for t in gen]
    s = gen.stats
    return {"ids": ids, "tokens_per_s": s.decode_tokens_per_s, "from_draft": s.accepted_tokens / len(ids),
            "acceptance": s.acceptance if s.draft_tokens else None}


def theirs(model, tokenizer, max_tokens, draft_model=None, num_draft=3) -> dict:
    from mlx_lm import stream_generate
    extra = dict(draft_model=draft_model, num_draft_tokens=num_draft) if draft_model is not None else {}
    ids, drafted, first, last = [], 0, None, None
    for r in stream_generate(model, tokenizer, mx.array(prompt()), max_tokens=max_tokens, **extra):
        last = time.perf_counter()
        first = first or last
        ids.append(r.token)
        drafted += bool(getattr(r, "from_draft", False))
    return {"ids": ids, "tokens_per_s": (len(ids) - 1) / (last - first), "from_draft": drafted / len(ids),
            "acceptance": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--out", type=Path, help=f"also write the table into this Markdown file's '{HEADING}' section "
                                             "(docs/benchmarks.md)")
    a = ap.parse_args()
    from mlx_lm import load as mlx_lm_load
    with tempfile.TemporaryDirectory() as tmp:
        f = folders(Path(tmp), a.hidden, a.layers)
        kv = len(prompt()) + a.tokens + 16
        their = {name: mlx_lm_load(str(path)) for name, path in f.items()}
        rows = []
        with engine.load(f["target"], kv_tokens=kv) as target, engine.load(f["agreeing"], kv_tokens=kv) as agree, \
                engine.load(f["rarely"], kv_tokens=kv) as rare:
            ours(target, 4)   # warm-up
            plain = ours(target, a.tokens)
            rows.append(("plain", plain, theirs(*their["target"], a.tokens)))
            for name, draft in (("agreeing (target 4-bit)", agree), ("rarely agreeing (small)", rare)):
                key = "agreeing" if draft is agree else "rarely"
                rows.append((f"draft: {name}", ours(target, a.tokens, draft=draft, num_draft=a.num_draft),
                             theirs(*their["target"], a.tokens, draft_model=their[key][0], num_draft=a.num_draft)))
            rows.append(("prompt lookup n=3", ours(target, a.tokens, prompt_lookup=3, num_draft=a.num_draft), None))
            backend = target.kernels.backend
    if a.out:
        write_doc(a, rows, plain, backend)
    print(f"speculative decoding, greedy, {a.tokens} tokens, num_draft={a.num_draft}, target llama hidden {a.hidden} "
          f"x {a.layers} layers float32; backend {backend} (off a Mac: MLX's CPU)")
    print(f"{'':28} {'ours tok/s':>10} {'mlx-lm tok/s':>12} {'ratio':>6} {'ours from draft':>16} "
          f"{'mlx-lm from draft':>18} {'ours acceptance':>16} {'same tokens':>11}")
    for name, o, t in rows:
        ratio = f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}" if t else "-"
        acc = f"{o['acceptance']:.0%}" if o["acceptance"] is not None else "-"
        print(f"{name:28} {o['tokens_per_s']:10.1f} {t['tokens_per_s'] if t else float('nan'):12.1f} {ratio:>6} "
              f"{o['from_draft']:16.0%} {(t['from_draft'] if t else float('nan')):18.0%} {acc:>16} "
              f"{str(o['ids'] == plain['ids']):>11}")


def write_doc(a, rows, plain, backend) -> None:
    def row(name, o, t):
        theirs = f"{t['tokens_per_s']:.1f}" if t else "-"
        ratio = f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}" if t else "-"
        drafted = "-" if name == "plain" else f"{o['from_draft']:.0%}" + (f" / {t['from_draft']:.0%}" if t else "")
        same = "yes" if o["ids"] == plain["ids"] else "NO"
        return f"| {name} | {o['tokens_per_s']:.1f} | {theirs} | {ratio} | {drafted} | {same} |"
    heading = HEADING if (a.hidden, a.layers) == (HIDDEN, LAYERS) else f"{HEADING}: hidden {a.hidden} x {a.layers} layers"
    on_cpu = not mx.metal.is_available()
    write_section(a.out, heading, SECTION.format(
        heading=heading, command=command(),
        revision=revision(), machine=f"{platform.system()} {platform.machine()}",
        device="CPU" if on_cpu else "Metal", where=": CPU figures, not Metal ones" if on_cpu else "",
        tokens=a.tokens, k=a.num_draft, hidden=a.hidden, layers=a.layers,
        rows="\n".join(row(*r) for r in rows)))
    print(f"wrote {a.out}: {heading}")


if __name__ == "__main__":
    main()
