"""`metalforge generate` and `metalforge cache save|info|clear` (imports when a command runs, as
in metalforge.cli, so that `--help` starts at once)."""
from __future__ import annotations

import sys
from pathlib import Path

from metalforge.errors import MetalforgeError


def _engine_arguments(p) -> None:
    p.add_argument("--model", required=True, help="mlx-lm model folder")
    p.add_argument("--device", help="device profile for tuned configs (default: detect)")
    p.add_argument("--backend", default=None,
                   help="auto (metal on a Mac, else mlx), metal, mlx, emulator; default $METALFORGE_BACKEND, else auto")
    p.add_argument("--kv-tokens", type=int, default=4096, help="KV pool budget in tokens")
    p.add_argument("--max-kv-size", type=int, help="sliding KV window in tokens (the first 4 kept as attention sinks)")
    p.add_argument("--kv-bits", type=int, help="store K/V quantized to this many bits (8 or 4)")
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of quantized K/V (32, 64, 128)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    prompt.add_argument("--prompt-tokens", help="prompt as comma-separated token ids")


def add_generate_arguments(p) -> None:
    _engine_arguments(p)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable; not empty)")
    p.add_argument("--prompt-cache", help="load this prompt cache first (its prefix is not prefilled again)")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft-model", help="speculative decoding: a smaller model folder of the same tokenizer")
    spec.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                      help="speculative decoding: draft from an earlier match of the last N tokens")
    p.add_argument("--num-draft", type=int, default=None, help="draft tokens verified per forward pass (default 3)")


def add_cache_arguments(p) -> None:
    sub = p.add_subparsers(dest="cache_command", required=True)
    save = sub.add_parser("save", help="prefill a prompt and save its KV cache")
    _engine_arguments(save)
    save.add_argument("--out", required=True, help="file to write (.safetensors)")
    info = sub.add_parser("info", help="describe a prompt cache file")
    info.add_argument("path")
    clear = sub.add_parser("clear", help="delete prompt cache files (a file, or every cache in a folder)")
    clear.add_argument("path")


def _prompt(args):
    if args.prompt is not None:
        return args.prompt
    try:
        return [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    except ValueError:
        raise MetalforgeError(f"--prompt-tokens must be comma-separated integers, got '{args.prompt_tokens}'") from None


def _load(args):
    from metalforge import engine
    return engine.load(args.model, device=args.device, backend=args.backend, kv_tokens=args.kv_tokens,
                       max_kv_size=args.max_kv_size, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)


def generate(args) -> int:
    if "" in (args.stop or []):   # every text "contains" it: generation would end after one token
        raise MetalforgeError("--stop: an empty stop string would stop at the first token; give the text to stop at")
    with _load(args) as e:
        if args.prompt_cache:
            e.load_prompt_cache(args.prompt_cache)
        speculative = {}
        if args.draft_model or args.prompt_lookup:
            speculative = dict(draft=args.draft_model, prompt_lookup=args.prompt_lookup)
            if args.num_draft is not None:
                speculative["num_draft"] = args.num_draft
        elif args.num_draft is not None:
            raise MetalforgeError("--num-draft needs --draft-model or --prompt-lookup")
        gen = e.generate(_prompt(args), max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, seed=args.seed, stop=args.stop, **speculative)
        for token in gen:
            sys.stdout.write(token.text if token.text is not None else f"{token.id} ")
            sys.stdout.flush()
        s = gen.stats
        print(f"\n[{s.prompt_tokens} prompt tokens ({s.cached_tokens} cached), {s.generated_tokens} generated; "
              f"time to first token {s.time_to_first_token_s * 1e3:.1f} ms, prefill {s.prefill_tokens_per_s:.1f} tok/s, "
              f"decode {s.decode_tokens_per_s:.1f} tok/s; stop: {s.stop_reason}; backend {e.kernels.backend}]",
              file=sys.stderr)
        if s.verify_steps:
            print(f"[speculative: {s.verify_steps} verify passes, {s.accepted_tokens} of {s.draft_tokens} drafts "
                  f"accepted ({s.acceptance:.0%}), {s.accepted_per_step:.2f} accepted per pass]", file=sys.stderr)
    return 0


def cache(args) -> int:
    from metalforge.engine import prompt_cache
    if args.cache_command == "info":
        i = prompt_cache.info(args.path)
        print(f"{i['path']}: {i['tokens']} tokens, {i['layers']} layers, {i['dtype']}, "
              f"{i['bytes'] / 2**20:.2f} MiB, model fingerprint {i['fingerprint']}")
        return 0
    if args.cache_command == "clear":
        path = Path(args.path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        removed = 0
        for f in files:
            try:
                prompt_cache.read(f)
            except prompt_cache.PromptCacheError as e:
                if path.is_dir():
                    continue     # only prompt caches are deleted from a folder
                raise MetalforgeError(f"refusing to delete: {e}") from None
            f.unlink()
            removed += 1
        print(f"removed {removed} prompt cache file(s)")
        return 0
    prompt_cache.destination(args.out)   # a refused --out before the model loads
    with _load(args) as e:
        ids = e.encode(_prompt(args))
        sid = e.add_sequence()
        e.step([sid], [ids])
        path = e.save_prompt_cache(args.out, sid)
    print(f"saved {len(ids)} tokens to {path}")
    return 0
