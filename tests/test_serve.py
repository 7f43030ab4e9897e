"""`metalforge serve` started for real on a loopback port and driven with the official `openai`
client: chat and completions, streaming and not, stop strings, usage, log-probabilities against an
independent forward pass, 32 clients at once, clients that vanish, the bad-request catalogue, the
bounded queue, and prompt caching across the turns of a chat. Expected prompts come from Hugging
Face's own chat-template rendering (transformers), expected tokens from `Engine.generate`."""
import asyncio
import json
import os
import signal
import socket
import time

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest

from metalforge import engine
from reference_model import reference_logits
from serve_fixtures import serve, write_chat_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

KEY = "sekrit-key"
SYSTEM = " ".join(f"w{i}" for i in range(40, 60))          # a 20-word system prompt


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("serve") / "chat-model")


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def local(folder):
    """The engine in this process: what each prompt gives alone."""
    with engine.load(folder, backend="mlx", kv_tokens=4096) as e:
        yield e


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """No prefix cache (so an idle pool holds zero blocks), an API key."""
    with serve(folder, tmp_path_factory.mktemp("log"), "--prefix-cache-tokens", "0", api_key=KEY) as s:
        yield s
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


def chat_ids(hf_tokenizer, messages) -> list[int]:
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf_tokenizer.encode(text, add_special_tokens=False)


def alone(local, ids, n) -> tuple[list[int], str, str]:
    """ids, text and finish reason of the prompt generated alone (greedy), as the server should answer."""
    gen = local.generate(ids, max_tokens=n)
    tokens = list(gen)
    ids_out = [t.id for t in tokens]
    text = local.tokenizer.decode([i for i in ids_out if i != 1])          # id 1 is </s>, never shown
    return ids_out, text, "length" if gen.stats.stop_reason == "max_tokens" else "stop"


def words(i: int, n: int = 4) -> str:
    return " ".join(f"w{(7 * i + 3 * k) % 280 + 10}" for k in range(n))


# ---- answers --------------------------------------------------------------------------------------
def test_chat_and_completions_streaming_or_not_equal_engine_generate(server, local, hf_tokenizer):
    client = server.openai()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [{"type": "text", "text": "w5 w6"},
                                                                                   {"type": "text", "text": " w7"}]}]
    ids = chat_ids(hf_tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "w5 w6 w7"}])
    _, text, reason = alone(local, ids, 7)

    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=7, temperature=0,
                                       user="someone", extra_body={"a_field_openai_may_add": 1})
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == reason
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 7, len(ids) + 7)
    assert r.usage.prompt_tokens_details.cached_tokens == 0

    chunks = list(client.chat.completions.create(messages=messages, max_completion_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 model=server.model))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])

    prompt = "w9 w8 w7 w200"
    _, text, reason = alone(local, local.tokenizer.encode(prompt), 6)
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].text == text and r.object == "text_completion"
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 6
    streamed = list(client.completions.create(model=server.model, prompt=[9, 8, 7, 200], max_tokens=6,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == reason

    # sampled: a seeded request draws what the same seed draws alone
    ids = local.tokenizer.encode(prompt)
    sampled = local.tokenizer.decode([t.id for t in local.generate(ids, max_tokens=6, temperature=0.9, top_k=50,
                                                                    seed=7) if t.id != 1])
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0.9, seed=7,
                                  extra_body={"top_k": 50})
    assert r.choices[0].text == sampled

    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model


def test_logprobs_match_an_independent_forward_pass(server, folder, local, hf_tokenizer):
    client = server.openai()
    ids = chat_ids(hf_tokenizer, [{"role": "user", "content": "w11 w12 w13"}])
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "w11 w12 w13"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    out = [hf_tokenizer.convert_tokens_to_ids(c.token) for c in content]
    assert out == alone(local, ids, 5)[0] and len(content) == r.usage.completion_tokens
    ref = reference_logits(folder, ids + out[:-1])[len(ids) - 1:]
    logp = np.array(ref - mx.logsumexp(ref, axis=-1, keepdims=True))
    for pos, c in enumerate(content):
        np.testing.assert_allclose(c.logprob, logp[pos, out[pos]], atol=2e-3)
        best = np.argsort(-logp[pos])[:3]
        assert [hf_tokenizer.convert_tokens_to_ids(t.token) for t in c.top_logprobs] == list(best)
        np.testing.assert_allclose([t.logprob for t in c.top_logprobs], logp[pos, best], atol=2e-3)
        assert c.bytes == list(c.token.encode())

    r = client.completions.create(model=server.model, prompt=ids, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert [hf_tokenizer.convert_tokens_to_ids(t) for t in lp.tokens] == out
    np.testing.assert_allclose(lp.token_logprobs, [logp[p, t] for p, t in enumerate(out)], atol=2e-3)
    assert [len(alts) for alts in lp.top_logprobs] == [2] * 5
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_stop_strings_end_the_answer_before_them_streaming_or_not(server, local):
    client = server.openai()
    prompt = "w20 w21 w22"
    _, full, _ = alone(local, local.tokenizer.encode(prompt), 12)
    tokens = full.split(" ")
    # a whole later word, and a string across a word boundary (held back over two tokens)
    for stop in (tokens[4], f"{tokens[5][1:]} {tokens[6][:2]}"):
        cut = full[:full.index(stop)]
        r = client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0,
                                      stop=[stop, "never-there"])
        assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
        chunks = list(client.completions.create(model=server.model, prompt=prompt, max_tokens=12,
                                                temperature=0, stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"


# ---- many clients --------------------------------------------------------------------------------
def test_32_clients_at_once_each_get_their_answer_alone_and_no_block_leaks(server, local, hf_tokenizer):
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": words(i)}] for i in range(32)]
    expected = [alone(local, chat_ids(hf_tokenizer, m), 5)[1] for m in prompts]
    client = server.openai(asynchronous=True)

    async def one(i):
        if i % 2:
            stream = await client.chat.completions.create(model=server.model, messages=prompts[i],
                                                          max_tokens=5, temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])
        r = await client.chat.completions.create(model=server.model, messages=prompts[i], max_tokens=5,
                                                 temperature=0)
        return r.choices[0].message.content

    async def everyone():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), timeout=60)

    before = server.metrics()
    got = asyncio.run(everyone())
    assert got == expected
    m = server.wait_idle(cache_blocks_ok=False)
    assert m["metalforge_kv_blocks_used"] == 0
    finished = m['metalforge_requests_finished_total{reason="max_tokens"}'] + m.get(
        'metalforge_requests_finished_total{reason="stop token"}', 0)
    assert finished - (before.get('metalforge_requests_finished_total{reason="max_tokens"}', 0)
                       + before.get('metalforge_requests_finished_total{reason="stop token"}', 0)) == 32
    # the shared system prompt was prefilled once per step's first request, then forked
    assert m["metalforge_cached_prompt_tokens_total"] - before["metalforge_cached_prompt_tokens_total"] >= 16 * 16
    ttft_count = "metalforge_time_to_first_token_seconds_count"
    assert m[ttft_count] - before[ttft_count] == 32
    assert m["metalforge_generation_tokens_total"] - before["metalforge_generation_tokens_total"] == 32 * 5
    assert m["metalforge_decode_tokens_per_second"] > 0 and m["metalforge_kv_blocks_free"] == 4096 // 16


def _cancelled(m) -> float:
    return m.get('metalforge_requests_finished_total{reason="cancelled"}', 0)


def test_a_client_that_vanishes_frees_its_blocks(server, local):
    prompt = "w30 w31 w32"
    assert alone(local, local.tokenizer.encode(prompt), 300)[2] == "length", "the prompt runs long (no </s>)"
    before = server.metrics()
    body = json.dumps({"prompt": prompt, "max_tokens": 3000, "temperature": 0, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    received = b""
    while received.count(b"data:") < 3:
        received += sock.recv(4096)
    assert server.metrics()["metalforge_requests_running"] == 1
    sock.close()                                                       # killed mid-stream
    gone = time.monotonic()
    m = server.wait_idle(cache_blocks_ok=False, timeout=5)
    assert time.monotonic() - gone < 2 and m["metalforge_kv_blocks_used"] == 0
    assert _cancelled(m) == _cancelled(before) + 1
    assert m["metalforge_generation_tokens_total"] - before["metalforge_generation_tokens_total"] < 1000

    # a non-streaming client that gives up waiting cancels its request too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", headers=server.headers(), timeout=httpx.Timeout(10, read=0.5),
                   json={"prompt": prompt, "max_tokens": 3000, "temperature": 0})
    m = server.wait_idle(cache_blocks_ok=False, timeout=5)
    assert _cancelled(m) == _cancelled(before) + 2 and m["metalforge_kv_blocks_used"] == 0


# ---- bad requests --------------------------------------------------------------------------------
LONG = " ".join(["w7"] * 4100)
CATALOGUE = [  # (name, path, body (dict, or raw bytes), headers, status, error code, message fragment)
    ("invalid JSON", "/v1/chat/completions", b'{"messages": [', {}, 400, None, "not valid JSON"),
    ("body not an object", "/v1/completions", b'[1, 2]', {}, 400, None, "JSON object"),
    ("messages missing", "/v1/chat/completions", {"max_tokens": 3}, {}, 400, None, "messages"),
    ("messages a string", "/v1/chat/completions", {"messages": "hi"}, {}, 400, None, "messages"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "w5"}]}, {}, 400, None,
     "role"),
    ("role the template refuses", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "w5"}]}, {}, 400,
     None, "unknown role tool"),
    ("max_tokens 0", "/v1/completions", {"prompt": "w5", "max_tokens": 0}, {}, 400, None, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_tokens": -2},
     {}, 400, None, "max_tokens"),
    ("max_tokens a word", "/v1/completions", {"prompt": "w5", "max_tokens": "ten"}, {}, 400, None, "max_tokens"),
    ("temperature a word", "/v1/completions", {"prompt": "w5", "temperature": "hot"}, {}, 400, None, "temperature"),
    ("top_p 0", "/v1/completions", {"prompt": "w5", "top_p": 0}, {}, 400, None, "top_p"),
    ("n 2", "/v1/completions", {"prompt": "w5", "n": 2}, {}, 400, None, "n"),
    ("empty stop string", "/v1/completions", {"prompt": "w5", "stop": ""}, {}, 400, None, "stop"),
    ("seed too large", "/v1/completions", {"prompt": "w5", "seed": 2**40}, {}, 400, None, "seed"),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [5, 300]}, {}, 400, None, "vocabulary"),
    ("prompt longer than the context", "/v1/completions", {"prompt": LONG}, {}, 400, "context_length_exceeded", "4096"),
    ("prompt and max_tokens beyond the context", "/v1/completions", {"prompt": "w5 w6", "max_tokens": 4095}, {}, 400,
     "context_length_exceeded", "4097"),
    ("unknown model", "/v1/completions", {"prompt": "w5", "model": "gpt-9"}, {}, 404, "model_not_found", "gpt-9"),
    ("wrong API key", "/v1/completions", {"prompt": "w5"}, {"Authorization": "Bearer nope"}, 401, "invalid_api_key",
     "API key"),
    ("no API key", "/v1/models", None, {"Authorization": ""}, 401, "invalid_api_key", "API key"),
    ("unknown route", "/v1/embeddings", {"input": "w5"}, {}, 404, None, "Not Found"),
    ("unknown model's card", "/v1/models/gpt-9", None, {}, 404, "model_not_found", "gpt-9"),
]


def _state(server) -> dict:
    m = server.metrics()
    return {k: v for k, v in m.items() if not k.startswith(("metalforge_http_requests_total",))}


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_requests_get_openai_errors_and_change_nothing(server, case):
    name, path, body, headers, status, code, fragment = case
    before = _state(server)
    send = {**server.headers(), "Content-Type": "application/json", **headers}
    if body is None:
        r = httpx.get(server.url + path, headers=send, timeout=30)
    else:
        r = httpx.post(server.url + path, headers=send, timeout=30,
                       content=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert fragment in error["message"] and "\n" not in error["message"]
    assert _state(server) == before


def test_the_openai_client_raises_its_own_errors(server):
    client = server.openai()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=server.model, prompt="w5", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "w5"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


# ---- the queue and the prefix cache --------------------------------------------------------------
@pytest.fixture(scope="module")
def small(folder, tmp_path_factory):
    """A 512-token pool, two requests at once, one waiting, a 128-token prefix cache."""
    with serve(folder, tmp_path_factory.mktemp("log"), "--kv-tokens", "512", "--max-concurrency", "2",
               "--max-queue", "1", "--prefix-cache-tokens", "128", "--allow-origin", "http://localhost:3000") as s:
        yield s
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


def test_a_browser_page_of_an_allowed_origin_may_call_the_server(small):
    def preflight(origin):
        return httpx.options(small.url + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    allowed = preflight("http://localhost:3000")
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in preflight("http://evil.example").headers
    r = httpx.get(small.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_requests_wait_for_room_and_beyond_the_queue_get_429(small, local):
    model = small.model
    client = small.openai()
    long_run = client.completions.create(model=model, prompt="w30 w31 w32", max_tokens=400, temperature=0, stream=True)
    next(iter(long_run))                                     # running: 26 of 32 blocks reserved
    waiting = client.completions.create(model=model, prompt="w40 w41", max_tokens=100, temperature=0, stream=True)
    deadline = time.monotonic() + 5
    while small.metrics()["metalforge_queue_length"] != 1:   # 7 more blocks do not fit: it waits
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError, match="queue"):
        client.completions.create(model=model, prompt="w5", max_tokens=2)
    long_run.close()                                         # the first leaves: the waiting one runs
    text = "".join(c.choices[0].text for c in waiting)
    assert text == alone(local, local.tokenizer.encode("w40 w41"), 100)[1]
    small.wait_idle()


def test_the_next_turn_of_a_chat_prefills_only_its_new_tokens(small, local, hf_tokenizer):
    model = small.model
    client = small.openai()
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "w61 w62 w63"}]
    r1 = client.chat.completions.create(model=model, messages=turn1, max_tokens=6, temperature=0)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    reply = r1.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "w64 w65"}]
    ids1, ids2 = chat_ids(hf_tokenizer, turn1), chat_ids(hf_tokenizer, turn2)
    r2 = client.chat.completions.create(model=model, messages=turn2, max_tokens=6, temperature=0)
    # kept: the first prompt and its reply but the reply's last token (never fed to the model)
    assert r2.usage.prompt_tokens_details.cached_tokens == len(ids1) + 6 - 1
    assert r2.choices[0].message.content == alone(local, ids2, 6)[1]
    assert small.metrics()["metalforge_prefix_cache_blocks"] > 0

    # another conversation with the same system prompt: the shared part of the kept prefix is forked
    other = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "w70"}]
    r3 = client.chat.completions.create(model=model, messages=other, max_tokens=4, temperature=0)
    shared = len(os.path.commonprefix([chat_ids(hf_tokenizer, other), ids1]))   # w2, the system words, w3
    assert shared >= 16 and r3.usage.prompt_tokens_details.cached_tokens == shared
    assert r3.choices[0].message.content == alone(local, chat_ids(hf_tokenizer, other), 4)[1]
    m = small.wait_idle()
    assert m["metalforge_prefix_cache_blocks"] <= 128 // 16


def test_ctrl_c_ends_running_streams_and_the_server_cleanly(folder, tmp_path):
    with serve(folder, tmp_path, "--prefix-cache-tokens", "0") as s:
        stream = s.openai().completions.create(model=s.model, prompt="w30 w31 w32", max_tokens=3000, temperature=0,
                                               stream=True)
        next(iter(stream))
        s.process.send_signal(signal.SIGINT)
        start = time.monotonic()
        with pytest.raises((openai.APIError, httpx.HTTPError)):    # the stream ends early, whichever way
            chunks = list(stream)
            assert chunks and chunks[-1].choices[0].finish_reason is None
            raise httpx.HTTPError("the stream ended without a finish reason")
        assert s.process.wait(15) == 130 and time.monotonic() - start < 10      # 130: interrupted, as the CLI says
    log = s.log.read_text()
    assert "Traceback" not in log and log.strip().endswith("metalforge: interrupted"), log


def test_the_documented_openai_client_runs(server, local):
    """docs/engine.md's openai block as written, pointed at this server: it streams the answer."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).parents[1] / "docs" / "engine.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("## Serving", 1)[1], re.S).group(1)
    code = (code.replace("http://localhost:8080", server.url).replace("path/to/mlx-lm-model", server.model)
            .replace('"KEY, or anything without --api-key"', repr(KEY)).replace("print(", "printed.append(")
            .replace(', end="", flush=True)', ")"))
    printed: list = []
    exec(compile(code, "docs/engine.md", "exec"), {"printed": printed})
    assert len(printed) >= 2          # the role chunk, then text
