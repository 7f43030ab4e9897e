"""A model folder a server can serve (random weights in mlx-lm's format, a word-level tokenizer
and a chat template), and the real `metalforge serve` started on a loopback port."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from metalforge.testing import write_model
from metalforge.engine.server.process import free_port, running

# system, user and assistant turns as the words w2, w3 and w4; any other role is refused
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}w2 {{ m['content'] }} "
                 "{% elif m['role'] == 'user' %}w3 {{ m['content'] }} "
                 "{% elif m['role'] == 'assistant' %}w4 {{ m['content'] }} "
                 "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}w4 {% endif %}")


def write_chat_model(folder) -> Path:
    folder = write_model(folder, arch="qwen3", layers=2, vocab=300, seed=3, tokenizer=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return folder


class RunningServer:
    def __init__(self, url: str, model: str, process: subprocess.Popen, log: Path, api_key: str | None):
        self.url, self.model, self.process, self.log, self.api_key = url, model, process, log, api_key

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        from metalforge.engine.server.metrics import parse
        return parse(httpx.get(self.url + "/metrics", timeout=10).text)

    def openai(self, asynchronous: bool = False):
        import openai
        cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        return cls(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=60)

    def wait_idle(self, cache_blocks_ok: bool = True, timeout: float = 10.0) -> dict[str, float]:
        """Metrics once no request runs or waits and the pool holds only the prefix cache."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            held = m["metalforge_prefix_cache_blocks"] if cache_blocks_ok else 0
            if (m["metalforge_requests_running"] == 0 and m["metalforge_queue_length"] == 0
                    and m["metalforge_kv_blocks_used"] <= held):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not go idle in {timeout} s: {m}")
            time.sleep(0.02)


@contextlib.contextmanager
def serve(folder, tmp_path, *flags, api_key: str | None = None):
    port = free_port()
    log = Path(tmp_path) / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "metalforge.cli", "serve", "--model", str(folder), "--port", str(port),
           "--backend", "mlx", *flags] + (["--api-key", api_key] if api_key else [])
    url = f"http://127.0.0.1:{port}"
    with running(cmd, url, log, timeout_s=90, env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        yield RunningServer(url, str(folder), process, log, api_key)
