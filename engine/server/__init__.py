"""`metalforge serve`: an OpenAI-compatible HTTP server over the engine's continuous batching.

    from metalforge.engine.server.cli import build
    app, server = build("path/to/model", kv_tokens=8192)   # a FastAPI app (its engine thread running)
    uvicorn.run(app, port=8080)

Modules by job: `schemas` (request bodies), `chat` (chat templates), `scheduler` (the engine
thread, admission and the bounded queue), `prefix_cache` (prompt caching across requests),
`output` (OpenAI's answer shapes), `metrics` (Prometheus text), `app` (the routes), `cli` (the
command and `build`), `process` (a server in a child process, for scripts).
Nothing here is imported by `metalforge --help`."""
