"""The server's parts on their own: chat templates rendered as Hugging Face renders them (checked
against transformers), the engine hooks the server uses (log-probabilities on Tokens, finished
requests kept as prefixes), stop strings held back across tokens, and the `serve` command's
one-line errors."""
import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from metalforge import engine
from metalforge.engine.generation import Stats, Token
from metalforge.testing import write_model
from metalforge.engine.server import chat
from metalforge.engine.server.cli import build
from metalforge.engine.server.output import Answer
from metalforge.errors import MetalforgeError
from reference_model import reference_logits
from serve_fixtures import write_chat_model

# a ChatML template in the style models ship: loop variables, tojson, raise_exception, eos_token
CHATML = """{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be system, user or assistant') }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}
    {%- if loop.last and message['role'] == 'assistant' %}{{ eos_token }}{% endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if tools is defined %}{{ tools | tojson }}{% endif %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

MESSAGES = [{"role": "system", "content": "Tu es un assistant. «Réponds» brièvement."},
            {"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"},
            {"role": "user", "content": "w8"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("parts") / "chat-model")


def test_templates_render_as_hugging_face_renders_them(folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    chatml = tmp_path / "chatml"
    chatml.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (chatml / f).write_text((folder / f).read_text())
    (chatml / "chat_template.jinja").write_text(CHATML)          # a template file wins over the config
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(chatml))
    for messages in (MESSAGES, MESSAGES[:3], MESSAGES[1:2]):
        ours = chat.load(chatml).render(messages)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.load(chatml).render(MESSAGES[:3]).count("</s>") == 1      # eos_token from the config
    hf_plain = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert chat.load(folder).render(MESSAGES[1:]) == hf_plain.apply_chat_template(
        MESSAGES[1:], tokenize=False, add_generation_prompt=True)


def test_template_errors_are_one_line_and_name_the_cause(folder, tmp_path):
    with pytest.raises(chat.ChatTemplateError, match="Conversation roles must be"):
        chat.ChatTemplate(CHATML, "t").render([{"role": "tool", "content": "x"}])
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(chat.ChatTemplateError, match="SecurityError"):      # sandboxed as Hugging Face's
        chat.ChatTemplate(escape, "t").render([])
    bare = write_model(tmp_path / "bare", tokenizer=True)
    with pytest.raises(MetalforgeError, match="has no chat template.*--chat-template"):
        chat.load(bare)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert chat.load(bare, tmp_path / "t.jinja").render([{"role": "user", "content": "w9"}]) == "w9"
    with pytest.raises(MetalforgeError, match="no such file"):
        chat.load(bare, tmp_path / "missing.jinja")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(MetalforgeError, match="does not parse"):
        chat.load(bare, tmp_path / "broken.jinja")


def test_a_folder_without_a_template_serves_completions_and_explains_chat(tmp_path):
    bare = write_model(tmp_path / "bare", arch="qwen3", vocab=300, seed=3, tokenizer=True)
    app, _ = build(bare, backend="mlx", kv_tokens=256)
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "w5"}]})
        assert r.status_code == 400 and "has no chat template" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---- the engine hooks ----------------------------------------------------------------------------
def test_batch_reports_log_probabilities_of_the_model(folder):
    prompts = [[5, 17, 42, 99], [9, 8, 7]]
    with engine.load(folder, backend="mlx", kv_tokens=512, block_size=8) as e:
        batch = e.batch()
        a = batch.add(prompts[0], max_tokens=4, logprobs=3)
        b = batch.add(prompts[1], max_tokens=4, temperature=0.9, seed=1)
        got = {}
        for rid, token in batch:
            got.setdefault(rid, []).append(token)
        alone = list(e.generate(prompts[0], max_tokens=4, logprobs=3))
        bare = list(e.generate(prompts[0], max_tokens=4, logprobs=0))
    assert all(t.logprob is None and t.top_logprobs is None for t in got[b])
    out = [t.id for t in got[a]]
    ref = reference_logits(folder, prompts[0] + out[:-1])[len(prompts[0]) - 1:]
    logp = np.array(ref - mx.logsumexp(ref, axis=-1, keepdims=True))
    for pos, t in enumerate(got[a]):
        np.testing.assert_allclose(t.logprob, logp[pos, t.id], atol=2e-3)
        assert [i for i, _ in t.top_logprobs] == list(np.argsort(-logp[pos])[:3])
        np.testing.assert_allclose([v for _, v in t.top_logprobs], np.sort(logp[pos])[::-1][:3], atol=2e-3)
    assert [(t.id, t.top_logprobs[0][0]) for t in alone] == [(t.id, t.top_logprobs[0][0]) for t in got[a]]
    np.testing.assert_allclose([t.logprob for t in alone], [t.logprob for t in got[a]], atol=1e-5)
    assert all(t.top_logprobs == [] for t in bare)
    np.testing.assert_allclose([t.logprob for t in bare], [t.logprob for t in got[a]], atol=1e-5)
    with engine.load(folder, backend="mlx", kv_tokens=512) as e, pytest.raises(MetalforgeError, match="logprobs"):
        e.batch().add([5], logprobs=-1)


def test_batch_keeps_finished_requests_as_prefixes_the_next_one_forks(folder):
    prompt = [5, 17, 42, 99, 3, 250, 11]
    with engine.load(folder, backend="mlx", kv_tokens=512, block_size=4) as e:
        first = [t.id for t in e.generate(prompt, max_tokens=5)]
        follow_up = prompt + first + [33, 34]
        expected = [t.id for t in e.generate(follow_up, max_tokens=4)]
        batch = e.batch()
        kept_rid, other = batch.add(prompt, max_tokens=5, keep=True), batch.add([9, 8, 7], max_tokens=3)
        assert [t.id for rid, t in batch if rid == kept_rid] == first
        sid = batch.sequence(kept_rid)
        assert e.tokens(sid) == prompt + first[:-1] and sid not in e.prefixes
        assert batch.sequence(other) not in e.pool.seqs
        batch.forget(other)                                  # a long-lived batch drops what it remembers
        with pytest.raises(MetalforgeError, match="no request"):
            batch.stats(other)
        assert e.pool.used_blocks == 3                       # 11 tokens in blocks of 4
        e.keep_prefix(sid)
        batch = e.batch()
        rid = batch.add(follow_up, max_tokens=4)
        assert [t.id for _, t in batch] == expected
        assert batch.stats(rid).cached_tokens == len(prompt) + len(first) - 1


# ---- answers -------------------------------------------------------------------------------------
def test_stop_strings_are_held_back_until_they_can_no_longer_start():
    answer = Answer(lambda ids: f"<{ids[0]}>", ["END!", "xy"], stop_ids={1})
    released = [answer.add(Token(i, text))[0] for i, text in enumerate(["he", "llo E", "N", "D", "? E", "ND!", "z"], 2)]
    assert released == ["he", "llo ", "", "", "END? ", "", ""]     # "END?" is no stop: released at once
    assert answer.text == "hello END? " and answer.finish(Stats(stop_reason="stop string")) == ("", "stop")
    answer = Answer(lambda ids: "", ["xyz"], stop_ids={1})
    assert [answer.add(Token(i, t))[0] for i, t in ((5, "ax"), (6, "y"), (1, "</s>"))] == ["a", "", ""]
    assert answer.finish(Stats(stop_reason="stop token")) == ("xy", "stop")
    assert Answer(lambda ids: "", [], set()).finish(Stats(stop_reason="max_tokens"))[1] == "length"


def test_serve_command_errors_are_one_line(tmp_path, folder):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "metalforge.cli", "serve", *args], capture_output=True,
                              text=True, timeout=120)
    r = run("--help")
    assert r.returncode == 0 and "--max-queue" in r.stdout
    for args, message in ((["--model", str(tmp_path / "nowhere")], "nowhere"),
                          (["--model", str(folder), "--chat-template", str(tmp_path / "none.jinja")], "no such file"),
                          (["--model", str(folder), "--max-concurrency", "0"], "max_concurrency must be"),
                          (["--model", str(folder), "--port", "70000"], "--port must be")):
        r = run(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("metalforge: error:") and message in r.stderr and r.stderr.count("\n") == 1
    imported = subprocess.run([sys.executable, "-c", "import sys; from metalforge.cli import build_parser; "
                               "build_parser(); print(sorted(m for m in ('fastapi', 'uvicorn', 'openai') "
                               "if m in sys.modules))"], capture_output=True, text=True, timeout=60).stdout
    assert json.loads(imported.replace("'", '"')) == []
