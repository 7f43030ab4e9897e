"""`metalforge serve`: an OpenAI-compatible HTTP server over the engine's continuous batching.

    from metalforge.engine.server import build
    app, server = build("path/to/model", kv_tokens=8192)      # a FastAPI app; run it with uvicorn

Modules by job: `schemas` (request bodies), `chat` (chat templates), `scheduler` (the engine
thread, admission and the bounded queue), `prefix_cache` (prompt caching across requests),
`output` (OpenAI's answer shapes), `metrics` (Prometheus text), `app` (the routes), `cli`.
Nothing here is imported by `metalforge --help`."""
