"""`metalforge serve`: the flags (argparse only, so `--help` imports nothing heavy) and the run."""
from __future__ import annotations

import os
import sys

from metalforge import arguments
from metalforge.errors import MetalforgeError


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="mlx-lm model folder; also the model name clients send")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--device", help="device profile for tuned configs (default: detect)")
    p.add_argument("--backend", default=None,
                   help="auto (metal on a Mac, else mlx), metal, mlx, emulator; default $METALFORGE_BACKEND, else auto")
    p.add_argument("--kv-tokens", type=int, default=4096,
                   help="KV pool budget in tokens, shared by all requests: a request joins when its prompt and "
                        "max_tokens (default 512) fit, else waits in the queue")
    p.add_argument("--max-concurrency", type=int, default=32, help="requests decoded together at most (default 32)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests waiting for room at most; beyond it requests get 429 (default 128)")
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="tokens of finished conversations kept for the next turn (default a quarter of "
                        "--kv-tokens; 0: off)")
    p.add_argument("--chat-template", help="a Jinja chat template file instead of the model folder's")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web page origin allowed to call the server from a browser (CORS), e.g. "
                        "http://localhost:3000, or * for any (repeatable; default none)")
    p.add_argument("--api-key", default=os.environ.get("METALFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default $METALFORGE_API_KEY; none: open)")


def build(model, chat_template=None, max_concurrency: int = 32, max_queue: int = 128, prefix_cache_tokens=None,
          api_key=None, device=None, backend=None, allow_origins=(), **engine_options):
    """The app and its Server for a model folder; the engine thread starts and stops with the app."""
    from metalforge import engine as engines
    from metalforge.engine.server import chat
    from metalforge.engine.server.app import Server, create_app
    from metalforge.engine.server.metrics import Metrics
    from metalforge.engine.server.scheduler import Scheduler

    arguments.positive_int("max_concurrency", max_concurrency)
    arguments.positive_int("max_queue", max_queue, minimum=0)
    if prefix_cache_tokens is not None:
        arguments.positive_int("prefix_cache_tokens", prefix_cache_tokens, minimum=0)
    try:
        template, template_error = chat.load(model, chat_template), None
    except MetalforgeError as err:
        if chat_template is not None:      # a template the user named must work
            raise
        template, template_error = None, str(err)
    metrics = Metrics()
    scheduler = Scheduler(metrics, max_concurrency, max_queue, prefix_cache_tokens)
    e = scheduler.start(lambda: engines.load(model, device=device, backend=backend, **engine_options))
    server = Server(e, str(model), template, template_error, scheduler, metrics, api_key)
    return create_app(server, allow_origins), server


def serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise MetalforgeError("metalforge serve needs FastAPI and uvicorn: pip install 'metalforge[serve]'") from None
    if not 0 <= args.port < 65536:
        raise MetalforgeError(f"--port must be in 0..65535, got {args.port}")
    app, server = build(args.model, args.chat_template, args.max_concurrency, args.max_queue, args.prefix_cache_tokens,
                        args.api_key, args.device, args.backend, args.allow_origin, kv_tokens=args.kv_tokens)
    if server.template is None:
        print(f"metalforge: warning: {server.template_error}; /v1/chat/completions answers 400", file=sys.stderr)
    e = server.engine
    print(f"metalforge: serving {args.model} on http://{args.host}:{args.port}/v1 (backend {e.kernels.backend}, "
          f"{e.pool.capacity_tokens} KV tokens, up to {args.max_concurrency} requests at once)", file=sys.stderr)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # end the requests first (each stream gets a 503 event and its end), so that the
            # connections close by themselves instead of being cancelled mid-write
            server.scheduler.stop(timeout=0)
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=5)).run()
    return 0
