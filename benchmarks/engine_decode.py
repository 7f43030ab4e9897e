"""The engine side by side with mlx-lm in one run, on the same backend and the same model folders:
decode tokens/s and time to first token at several context lengths, total tokens/s with 8 and 32
sequences at once (mlx-lm's batch_generate), and peak memory, for float32, float16 and bfloat16
models, quantized and not. Prints ratios (ours / mlx-lm: above 1 is faster, for time to first
token too) and writes JSON and a PNG.

    python benchmarks/engine_decode.py [--contexts 128,1024,4096,8192] [--dtypes float32,float16,bfloat16]
                                       [--quantized yes,no] [--batches 8,32] [--linear]
                                       [--doc docs/benchmarks.md] [--report OUT.json]

`--doc` writes the tables, with the words that explain them (SECTION), into that Markdown file's
"Engine speed against mlx-lm" section (a run with another model type into a section of its own);
`--report` writes OUT.md and that section again from an earlier run's JSON.

The models are random-weight llamas written in the exact mlx-lm format (4 layers, hidden 512, 8
heads of 64, 2 KV heads, MLP 1408, vocabulary 32000; quantized: 4-bit, group 64); with
`--model-types llama,qwen3_moe` also a mixture of experts of the same size (8 experts of MLP 704,
2 a token). Off a Mac both
run MLX's CPU backend: these are CPU numbers, not Metal ones. `--linear` prints the measurements
behind engine/cpu_linear.py instead.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from metalforge.engine import speed
from metalforge.testing import write_model
from metalforge.plotting import figure, write_report
from metalforge import engine
from metalforge.engine.engine import PREFILL_CHUNK
from metalforge.files import write_atomic, write_section
from metalforge.provenance import command, revision

# MLX's CPU quantized matmul in half precision is 10-50x slower than in float32: when mlx-lm needs
# more than this for the shortest prompt's first token, its longer contexts and batches are not run
# (the table says so; the longest would take hours)
SLOW_TTFT_S = 5.0


def model(root: Path, dtype: str, quantized: bool, max_positions: int, model_type: str = "llama") -> Path:
    # the MoE model: 8 experts of half the dense MLP's width, 2 a token (the dense model's active size)
    fields = {"moe_intermediate_size": 704} if model_type == "qwen3_moe" else None
    return write_model(root / f"{model_type}-{dtype}-{'q4' if quantized else 'dense'}", arch=model_type,
                       dtype=getattr(mx, dtype), quantized=(4, 64) if quantized else None, layers=4, hidden=512,
                       heads=8, kv_heads=2, inter=1408, vocab=32000, shards=1, tokenizer=True,
                       max_positions=max_positions, fields=fields)


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(7 * i + 13 * salt) % 31000 + 2 for i in range(n)]


def run_variant(folder, contexts, batches, decode_tokens, batch_prompt):
    from mlx_lm import load as mlx_lm_load
    out = {"contexts": {}, "batches": {}}
    kv = max(max(contexts) + decode_tokens + 64, max(batches) * (batch_prompt + decode_tokens + 16))
    their_model, tokenizer = mlx_lm_load(str(folder))
    with engine.load(folder, kv_tokens=kv, max_seq_len=max(contexts) + decode_tokens + 64) as e:
        slow = None
        for c in contexts:
            ours = speed.engine_generate(e, prompt(c), decode_tokens)
            if slow is None:
                theirs = speed.mlx_lm_generate(their_model, tokenizer, prompt(c), decode_tokens)
                if c == contexts[0] and theirs["ttft_s"] > SLOW_TTFT_S:
                    slow = theirs
            else:
                theirs = {"skipped": f"mlx-lm took {slow['ttft_s']:.0f} s for the first token of the shortest prompt"}
            out["contexts"][c] = {"metalforge": ours, "mlx_lm": theirs}
            report_context(c, ours, theirs)
        for b in batches:
            prompts = [prompt(batch_prompt, salt=i + 1) for i in range(b)]
            if slow is None:
                theirs = speed.mlx_lm_batch(their_model, tokenizer, prompts, decode_tokens)
            else:
                theirs = {"skipped": "mlx-lm too slow in this dtype (see above)"}
            ours = speed.engine_batch(e, prompts, decode_tokens)
            out["batches"][b] = {"metalforge": ours, "mlx_lm": theirs}
            ratio = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if "tokens_per_s" in theirs else "-"
            print(f"  {b:3d} sequences x {batch_prompt}+{decode_tokens} tokens: total {ours['tokens_per_s']:7.1f} tok/s "
                  f"vs mlx-lm {theirs.get('tokens_per_s', float('nan')):7.1f}  ({ratio})", flush=True)
    return out


def report_context(c, ours, theirs):
    if "skipped" in theirs:
        print(f"  context {c:5d}: decode {ours['decode_tokens_per_s']:6.1f} tok/s  TTFT {ours['ttft_s']:7.2f} s  "
              f"(mlx-lm not run: {theirs['skipped']})", flush=True)
        return
    print(f"  context {c:5d}: decode {ours['decode_tokens_per_s']:6.1f} vs {theirs['decode_tokens_per_s']:6.1f} tok/s "
          f"({ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}x)  TTFT {ours['ttft_s']:7.2f} vs "
          f"{theirs['ttft_s']:7.2f} s ({theirs['ttft_s'] / ours['ttft_s']:.2f}x)  peak "
          f"{ours['peak_memory_bytes'] / 2**20:.0f} vs {theirs['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)


def linear_table():
    """quantized_matmul against the two CPU techniques engine/cpu_linear.py uses, per row count."""
    from metalforge.engine.cpu_linear import CpuLinear, DEQUANTIZE_MIN_ROWS
    never = 1 << 30
    ways = {"quantized_matmul": CpuLinear(cores=1, dequantize_from=never), "split": CpuLinear(dequantize_from=never),
            "split+dequantized": CpuLinear(dequantize_from=1), "engine": CpuLinear()}
    print(f"4-bit linear layers on {mx.default_device()}, ms per call (best of 3); split: one part per core "
          f"({len(ways['split'].streams)}); the engine dequantizes from {DEQUANTIZE_MIN_ROWS} rows")
    print(f"{'N x K':>12} {'rows':>5}" + "".join(f"{w:>19}" for w in ways) + f"{'engine speedup':>16}")
    for n, k in ((512, 512), (1408, 512), (512, 1408), (32000, 512)):
        w = dict(zip(("weight", "scales", "biases"), mx.quantize(mx.random.normal((n, k)), group_size=64, bits=4)))
        mx.eval(w)
        for rows in (1, 8, 32, 128, 512):
            x = mx.random.normal((rows, k))
            ms = {name: best(lambda: way(x, w, 4, 64)) for name, way in ways.items()}
            print(f"{n:>5} x {k:<5} {rows:>5}" + "".join(f"{t:19.2f}" for t in ms.values())
                  + f"{ms['quantized_matmul'] / ms['engine']:15.2f}x", flush=True)


def best(f, n=3):
    mx.eval(f())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(f())
        times.append((time.perf_counter() - t) * 1e3)
    return min(times)


def plot(results, out):
    variants = list(results)
    fig, axes = figure(1, 3, figsize=(15, 4))
    for name in variants:
        ctx = results[name]["contexts"]
        cs = [c for c in ctx if "decode_tokens_per_s" in ctx[c]["mlx_lm"]]
        axes[0].plot(cs, [ctx[c]["metalforge"]["decode_tokens_per_s"] / ctx[c]["mlx_lm"]["decode_tokens_per_s"]
                          for c in cs], marker="o", label=name)
        axes[1].plot(cs, [ctx[c]["mlx_lm"]["ttft_s"] / ctx[c]["metalforge"]["ttft_s"] for c in cs], marker="o",
                     label=name)
        bs = [b for b, r in results[name]["batches"].items() if "tokens_per_s" in r["mlx_lm"]]
        axes[2].plot(bs, [results[name]["batches"][b]["metalforge"]["tokens_per_s"]
                          / results[name]["batches"][b]["mlx_lm"]["tokens_per_s"] for b in bs], marker="o", label=name)
    for ax, title, xlabel in ((axes[0], "decode tokens/s, metalforge / mlx-lm", "context"),
                              (axes[1], "time to first token, mlx-lm / metalforge", "prompt tokens"),
                              (axes[2], "total tokens/s, many sequences, metalforge / mlx-lm", "sequences")):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"engine vs mlx-lm on {mx.default_device()} (measured here; not Metal unless run on a Mac)", fontsize=9)
    return fig


HEADING = "Engine speed against mlx-lm"
SECTION = """## {heading}

`{command}` runs the engine and mlx-lm {mlx_lm} side by side in one process on the same
random-weight folders written in mlx-lm's format ({models}; 4-bit group 64, or dense), {decode}
decoded tokens per prompt{took}. **Measured at revision {revision} on {machine}, {cores} cores,
MLX {mlx}'s {device} backend{where}.** Each cell is one run; on a shared machine runs differ by up to about 15%, so
ratios within 0.9-1.1 are parity. Each ratio above 1 favours metalforge (tokens/s ours over
mlx-lm's; seconds and memory mlx-lm's over ours).{notes}

{tables}
{verdict}

Where it comes from: {cpu}decoding is pipelined and reads the KV pool in place; prompts are
prefilled {chunk} tokens at a time into a pool sized at load, which bounds peak memory.{experts}
mlx-lm is "not run" for a model whose shortest prompt took it over {slow:g} s to the first token
(MLX's CPU quantized matmul in half precision; on a CPU the engine computes such models in
float32): its longer prompts would take hours.
"""
ON_CPU = ("on a CPU the engine splits linear layers by output rows across the cores and dequantizes for many "
          "rows (docs/engine.md, \"On a CPU\"); ")
MODELS = {"llama": "llama: 4 layers, hidden 512, 8 heads of 64, 2 KV heads, MLP 1408, vocabulary 32000",
          "qwen3_moe": "qwen3_moe: the same, with 8 experts of MLP 704, 2 a token, in every layer"}


def _cell_ratio(ours, theirs, key, invert):
    return theirs[key] / ours[key] if invert else ours[key] / theirs[key]


def markdown(data) -> str:
    """The report's tables: per model, ours vs mlx-lm and the ratio (above 1: ours is faster)."""
    def cell(ours, theirs, key, invert=False, fmt="{:.1f}"):
        if key not in theirs:
            return f"{fmt.format(ours[key])} vs not run"
        return f"{fmt.format(ours[key])} vs {fmt.format(theirs[key])} (**{_cell_ratio(ours, theirs, key, invert):.2f}x**)"
    results = data["results"]
    contexts = list(next(iter(results.values()))["contexts"])
    batches = list(next(iter(results.values()))["batches"])
    out = []
    for title, key, invert, fmt in (("Decode tokens/s", "decode_tokens_per_s", False, "{:.1f}"),
                                    ("Time to first token, seconds", "ttft_s", True, "{:.2f}")):
        out += [f"{title} at each context length (metalforge vs mlx-lm):", "",
                "| model | " + " | ".join(str(c) for c in contexts) + " |", "|---" * (len(contexts) + 1) + "|"]
        for name, r in results.items():
            out.append(f"| {name} | " + " | ".join(cell(r["contexts"][c]["metalforge"], r["contexts"][c]["mlx_lm"], key,
                                                        invert, fmt) for c in contexts) + " |")
        out.append("")
    out += [f"Total tokens/s, sequences decoded at once ({data['batch_prompt_tokens']}-token prompts, "
            f"{data['decode_tokens']} tokens each, prefill included; mlx-lm: batch_generate):", "",
            "| model | " + " | ".join(f"{b} sequences" for b in batches) + " | peak memory at the longest context, MiB |",
            "|---" * (len(batches) + 2) + "|"]
    for name, r in results.items():
        longest = r["contexts"][contexts[-1]]
        peak = cell({"m": longest["metalforge"]["peak_memory_bytes"] / 2**20},
                    {"m": longest["mlx_lm"]["peak_memory_bytes"] / 2**20} if "peak_memory_bytes" in longest["mlx_lm"]
                    else {}, "m", invert=True, fmt="{:.0f}")
        out.append(f"| {name} | " + " | ".join(cell(r["batches"][b]["metalforge"], r["batches"][b]["mlx_lm"],
                                                    "tokens_per_s") for b in batches) + f" | {peak} |")
    return "\n".join(out) + "\n"


def verdict(data) -> str:
    """The cells below parity (under 0.9x), named; else how many are at parity and above it."""
    below, counts = [], {"below": 0, "parity": 0, "above": 0}
    for name, r in data["results"].items():
        cells = [(f"decode at {c}", r["contexts"][c], "decode_tokens_per_s", False) for c in r["contexts"]]
        cells += [(f"time to first token at {c}", r["contexts"][c], "ttft_s", True) for c in r["contexts"]]
        cells += [(f"{b} sequences", r["batches"][b], "tokens_per_s", False) for b in r["batches"]]
        for what, pair, key, invert in cells:
            if key not in pair["mlx_lm"]:
                continue
            ratio = _cell_ratio(pair["metalforge"], pair["mlx_lm"], key, invert)
            kind = "below" if ratio < 0.9 else "parity" if ratio <= 1.1 else "above"
            counts[kind] += 1
            if kind == "below":
                below.append(f"{name} {what} ({ratio:.2f}x)")
    total = sum(counts.values())
    words = (f"Of {total} cells run on both sides, {counts['above']} favour metalforge beyond 1.1x, "
             f"{counts['parity']} are at parity and {counts['below']} are below it")
    return words + (": " + "; ".join(below) + "." if below else ".")


def _took(seconds) -> str:
    if seconds is None:   # a run published before runs were timed
        return ""
    return f", in {seconds / 60:.0f} minutes" if seconds >= 90 else f", in {seconds:.0f} s"


def section(data) -> tuple[str, str]:
    """(heading, the section's Markdown) for a run's JSON: its tables and the words around them."""
    types = data.get("model_types", ["llama"])
    heading = HEADING if types == ["llama"] else f"{HEADING}: {', '.join(types)}"
    notes = "".join(f" {n}" for n in data.get("notes", ()))
    where = "" if data["device"] == "gpu" else ": these are CPU numbers, not Metal ones"
    experts = (" The expert layers run MLX's `gather_qmm` on the CPU on both sides, as mlx-lm's do."
               if "qwen3_moe" in types and data["device"] == "cpu" else "")
    return heading, SECTION.format(
        heading=heading, command=data["command"], mlx_lm=data["mlx_lm"], models="; ".join(MODELS[t] for t in types),
        decode=data["decode_tokens"], took=_took(data.get("seconds")), revision=data["revision"], machine=data["machine"],
        device=data["device"], mlx=data["mlx"],
        cores=data["cores"], where=where, notes=notes, cpu=ON_CPU if data["device"] == "cpu" else "", tables=markdown(data), verdict=verdict(data),
        chunk=data["prefill_chunk"], experts=experts, slow=SLOW_TTFT_S)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="128,1024,4096,8192")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--quantized", default="yes,no")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--model-types", default="llama", help="llama, and qwen3_moe for the MoE row")
    ap.add_argument("--batch-prompt", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--linear", action="store_true", help="print the CPU linear-layer measurements and stop")
    ap.add_argument("--out", default="benchmarks/results/engine_decode", help="OUT.json, OUT.png and OUT.md")
    ap.add_argument("--doc", type=Path, help=f"also write the tables into this Markdown file's '{HEADING}' section "
                                             "(docs/benchmarks.md)")
    ap.add_argument("--report", metavar="JSON", help="write OUT.md (and --doc's section) from an earlier run's "
                                                     "JSON and stop")
    args = ap.parse_args()
    if args.linear:
        return linear_table()
    if args.report:
        return write_markdown(args.out, json.loads(Path(args.report).read_text()), args.doc)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",") if b]
    results, started = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, dtype, q in itertools.product(args.model_types.split(","), args.dtypes.split(","),
                                                      args.quantized.split(",")):
            name = f"{dtype} {'4-bit' if q == 'yes' else 'dense'}" + ("" if model_type == "llama" else f" {model_type}")
            print(f"{name} (metalforge vs mlx-lm on {mx.default_device()}):", flush=True)
            folder = model(Path(tmp), dtype, q == "yes", max(contexts) + args.decode_tokens + 128, model_type)
            results[name] = run_variant(folder, contexts, batches, args.decode_tokens, args.batch_prompt)
    import mlx_lm

    data = {"device": mx.default_device().type.name, "decode_tokens": args.decode_tokens,
            "batch_prompt_tokens": args.batch_prompt, "results": results,
            "command": command(),
            "revision": revision(), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "cores": os.cpu_count(),
            "machine": f"{platform.system()} {platform.machine()}", "seconds": time.perf_counter() - started,
            "model_types": args.model_types.split(","), "prefill_chunk": PREFILL_CHUNK}
    write_report(args.out, data, plot(results, args.out))
    write_markdown(args.out, data, args.doc)


def write_markdown(out, data, doc=None):
    """OUT.md, and `doc`'s section where given: the same text."""
    data = {**data, "results": {name: {part: {int(k): v for k, v in r[part].items()} for part in ("contexts", "batches")}
                                for name, r in data["results"].items()}}   # JSON turned the sizes into strings
    heading, text = section(data)
    path = Path(out).with_suffix(".md")
    write_atomic(path, text)
    print(f"wrote {path}")
    if doc:
        write_section(doc, heading, text)
        print(f"wrote {doc}: {heading}")


if __name__ == "__main__":
    main()
