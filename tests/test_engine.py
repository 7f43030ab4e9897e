"""The decoding engine on real mlx-lm style folders, against an independent reference forward pass."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from metalforge import engine
from metalforge.errors import MetalforgeError

from metalforge.testing import write_model
from reference_model import reference_greedy, reference_logits

PROMPT = [5, 17, 42, 99, 3, 250, 11]
CASES = [("llama", None), ("llama", (8, 32)), ("mistral", None), ("mistral", (4, 64)), ("qwen2", None),
         ("qwen2", (4, 32)), ("qwen3", None), ("qwen3", (8, 64))]


def test_every_model_type_has_its_test_case():
    """A model type is one file in engine/models/ plus its case here or in
    test_architectures.py (checked against mlx-lm's own model class)."""
    from metalforge.engine import models
    from test_architectures import ARCHITECTURES
    assert set(models.model_types()) == {arch for arch, _ in CASES} | set(ARCHITECTURES)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch, quant in CASES:
        name = f"{arch}-{'q%d-%d' % quant if quant else 'fp32'}"
        out[(arch, quant)] = write_model(root / name, arch=arch, quantized=quant, tokenizer=(arch == "qwen2"),
                                         shards=2 if quant else 1)
    out["other"] = write_model(root / "other", arch="llama", seed=7)
    return out


def drive(e, prompt, n):
    """Greedy decode through engine.step, returning tokens and each step's logits."""
    sid = e.add_sequence()
    logits = e.step([sid], [prompt])[0]
    tokens, seen = [], []
    for _ in range(n):
        seen.append(logits)
        tokens.append(int(mx.argmax(logits).item()))
        logits = e.step([sid], [[tokens[-1]]])[0]
    return sid, tokens, seen


@pytest.mark.parametrize("arch, quant", CASES)
def test_greedy_tokens_and_logits_match_the_reference(models, arch, quant):
    folder = models[(arch, quant)]
    ref_tokens, ref_logits = reference_greedy(folder, PROMPT, 6)
    with engine.load(folder, backend="mlx", kv_tokens=128) as e:
        _, tokens, logits = drive(e, PROMPT, 6)
        assert tokens == ref_tokens
        for got, want in zip(logits, ref_logits):
            np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-3, rtol=2e-3)
        streamed = [t.id for t in e.generate(PROMPT, max_tokens=6)]
        assert streamed == ref_tokens


@pytest.mark.parametrize("arch, quant, prompt", [("qwen2", (4, 32), PROMPT), ("qwen3", (8, 64), PROMPT + [7] * 5),
                                                ("llama", None, PROMPT)])
def test_emulator_backend_runs_our_kernels_and_agrees(models, arch, quant, prompt):
    folder = models[(arch, quant)]
    ref_tokens, ref_logits = reference_greedy(folder, prompt, 4)
    with engine.load(folder, backend="emulator", device="m2", kv_tokens=128) as e:
        _, tokens, logits = drive(e, prompt, 4)
        report = e.kernel_report()
    assert tokens == ref_tokens
    for got, want in zip(logits, ref_logits):
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-3, rtol=2e-3)
    kernels = {v["kernel"] for v in report.values()}
    # a prompt of up to 8 tokens is decode attention's (as MLX's sdpa_vector), a longer one prefill's
    assert "metalforge decode_attention (emulator)" in kernels
    assert ("metalforge prefill_attention (emulator)" in kernels) == (len(prompt) > 8)
    assert len(prompt) > 8 or any(k.startswith("decode_attention ") and f",L={len(prompt)}" in k for k in report)
    if quant:
        assert "metalforge qmv (emulator)" in kernels
        assert ("metalforge qmm (emulator)" in kernels) == (len(prompt) > 8), "prompts over 8 tokens use qmm"
        assert all("config" in v for v in report.values() if v["kernel"].startswith("metalforge"))


def test_half_precision_model_stays_close_to_the_reference(tmp_path):
    folder = write_model(tmp_path / "fp16", arch="llama", quantized=(4, 64), dtype=mx.float16)
    with engine.load(folder, backend="mlx", kv_tokens=64) as e:
        sid = e.add_sequence()
        got = e.step([sid], [PROMPT])[0]
    want = reference_logits(folder, PROMPT)[-1]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=0.1, rtol=0.05)


def test_text_in_text_out_and_stop_strings(models):
    folder = models[("qwen2", (4, 32))]
    with engine.load(folder, backend="mlx", kv_tokens=128) as e:
        gen = e.generate("w5 w17 w42", max_tokens=5)
        pieces = list(gen)
        assert [p.id for p in pieces] == reference_greedy(folder, [5, 17, 42], 5)[0]
        assert "".join(p.text for p in pieces).split() == [f"w{p.id}" for p in pieces]
        second = pieces[1].text.strip()
        stopped = list(e.generate("w5 w17 w42", max_tokens=5, stop=[second]))
        assert len(stopped) == 2
        assert gen.stats.prompt_tokens == 3 and gen.stats.generated_tokens == 5
        assert gen.stats.time_to_first_token_s > 0 and gen.stats.decode_tokens_per_s > 0


def test_streamed_text_is_the_whole_decode_and_costs_a_few_tokens_per_step(models):
    """The pieces join to exactly what decoding all the tokens at once gives, and each step
    decodes a short window: streaming n tokens decodes O(n) tokens in all, not O(n^2)."""
    folder = models[("qwen2", (4, 32))]
    with engine.load(folder, backend="mlx", kv_tokens=256) as e:
        decoded = []
        real = e.tokenizer.decode
        e.tokenizer.decode = lambda ids: decoded.append(len(ids)) or real(ids)
        pieces = list(e.generate("w5 w17 w42", max_tokens=60))
        e.tokenizer.decode = real
        assert "".join(p.text for p in pieces) == real([p.id for p in pieces])
        assert sum(decoded) <= 6 * len(pieces), "a window of a few tokens per step"


def test_prompts_without_a_tokenizer_are_token_ids(models):
    with engine.load(models[("llama", None)], backend="mlx", kv_tokens=64) as e:
        with pytest.raises(MetalforgeError, match="no tokenizer.json: pass the prompt as a list of token ids"):
            e.generate("hello")
        with pytest.raises(MetalforgeError, match="outside the vocabulary"):
            list(e.generate([5, 300]))


def test_sampling_is_seeded(models):
    with engine.load(models[("llama", None)], backend="mlx", kv_tokens=128) as e:
        a = [t.id for t in e.generate(PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=3)]
        b = [t.id for t in e.generate(PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=3)]
        c = [t.id for t in e.generate(PROMPT, max_tokens=8, temperature=1.0, top_k=1, seed=4)]
    assert a == b
    assert c == reference_greedy(models[("llama", None)], PROMPT, 8)[0], "top_k=1 is greedy"


# ---- the KV pool -------------------------------------------------------------------------------------
def test_batched_decode_of_many_sequences_equals_each_alone(models):
    folder = models[("qwen3", (8, 64))]
    prompts = [PROMPT, [9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    expected = [reference_greedy(folder, p, 5)[0] for p in prompts]
    with engine.load(folder, backend="mlx", kv_tokens=256, block_size=8) as e:
        sids = [e.add_sequence() for _ in prompts]
        last = [int(mx.argmax(e.step([s], [p])[0]).item()) for s, p in zip(sids, prompts)]
        outs = [[t] for t in last]
        for _ in range(4):
            logits = e.step(sids, [[t] for t in last])
            last = [int(mx.argmax(row).item()) for row in logits]
            for o, t in zip(outs, last):
                o.append(t)
    assert outs == expected


@pytest.mark.parametrize("backend", ["mlx", "emulator"])
def test_a_ragged_step_mixes_prompts_and_single_tokens(models, backend):
    """Two sequences decode a token while a third's prompt goes in, in one forward pass; the
    logits are each sequence's own, and a sequence may ask for logits after every new token."""
    folder = models[("qwen3", (8, 64))]
    third = list(range(1, 20))
    with engine.load(folder, backend=backend, device="m2", kv_tokens=256, block_size=8) as e:
        a, b, c = e.add_sequence(), e.add_sequence(), e.add_sequence()
        e.step([a], [PROMPT])
        e.step([b], [[9, 8, 7]])
        got = e.step([a, c, b], [[10], third, [20]], logits_at={c: list(range(len(third)))})
        assert e.tokens(c) == third and e.tokens(a) == PROMPT + [10]
        with pytest.raises(MetalforgeError, match=r"logits_at\[.*\]=\[5\] are not indices"):
            e.step([a], [[1]], logits_at={a: [5]})
    assert got.shape[0] == 1 + len(third) + 1
    want = mx.concatenate([reference_logits(folder, PROMPT + [10])[-1:], reference_logits(folder, third),
                           reference_logits(folder, [9, 8, 7, 20])[-1:]])
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-3, rtol=2e-3)


def test_fork_shares_the_prefix_copy_on_write(models):
    folder = models[("llama", (8, 32))]
    with engine.load(folder, backend="mlx", kv_tokens=128, block_size=4) as e:
        parent = e.add_sequence()
        e.step([parent], [PROMPT])                       # 7 tokens: one full block, one partial
        used = e.pool.used_blocks
        child = e.fork(parent)
        assert e.pool.used_blocks == used, "a fork allocates nothing until it writes"
        a = int(mx.argmax(e.step([child], [[10]])[0]).item())
        assert e.pool.used_blocks == used + 1, "writing into the shared partial block copied it"
        b = int(mx.argmax(e.step([parent], [[20]])[0]).item())
        assert e.tokens(child) == PROMPT + [10] and e.tokens(parent) == PROMPT + [20]
    ref = lambda toks: int(mx.argmax(reference_logits(folder, toks)[-1]).item())
    assert a == ref(PROMPT + [10]) and b == ref(PROMPT + [20])


def test_removing_a_suffix_then_continuing(models):
    folder = models[("mistral", (4, 64))]
    with engine.load(folder, backend="mlx", kv_tokens=128, block_size=4) as e:
        sid = e.add_sequence()
        e.step([sid], [PROMPT + [1, 2, 3, 4, 5]])
        e.remove(sid, len(PROMPT))
        assert e.tokens(sid) == PROMPT
        got = int(mx.argmax(e.step([sid], [[77]])[0]).item())
        with pytest.raises(MetalforgeError, match="only a suffix"):
            e.remove(sid, 1, 3)
        e.remove(sid)
        assert e.pool.used_blocks == 0
    assert got == int(mx.argmax(reference_logits(folder, PROMPT + [77])[-1]).item())


def test_exhaustion_names_the_budget_and_corrupts_nothing(models):
    folder = models[("llama", None)]
    with engine.load(folder, backend="mlx", kv_tokens=16, block_size=4) as e:
        keep = e.add_sequence()
        e.step([keep], [PROMPT])                            # 2 of 4 blocks
        other = e.add_sequence()
        with pytest.raises(engine.PoolExhausted, match=r"KV pool exhausted: 3 more blocks .* 2 free of 4 \(budget 16 tokens"):
            e.step([other], [list(range(2, 12))])
        assert e.tokens(other) == [] and e.pool.used_blocks == 2
        got = int(mx.argmax(e.step([keep], [[12]])[0]).item())
        e.clear()
        assert e.pool.used_blocks == 0 and not e.pool.seqs
    assert got == int(mx.argmax(reference_logits(folder, PROMPT + [12])[-1]).item())


def test_generate_keeps_its_sequence_for_a_later_prompt(models):
    folder = models[("llama", None)]
    with engine.load(folder, backend="mlx", kv_tokens=128) as e:
        e.args = dataclasses.replace(e.args, eos_token_id=())
        gen = e.generate(PROMPT, max_tokens=4, keep=True)
        tokens = [t.id for t in gen]
        assert e.tokens(gen.sequence) == PROMPT + tokens[:-1], "the prompt and every token but the last"
        e.keep_prefix(gen.sequence)
        follow = PROMPT + tokens + [7]
        again = e.generate(follow, max_tokens=3)
        assert [t.id for t in again] == reference_greedy(folder, follow, 3)[0]
        assert again.stats.cached_tokens == len(PROMPT) + 3
        assert sorted(e.pool.seqs) == [gen.sequence]


def test_generate_raises_when_the_pool_cannot_hold_its_prompt(models):
    with engine.load(models[("llama", None)], backend="mlx", kv_tokens=16, block_size=4) as e:
        hog = e.add_sequence()
        e.step([hog], [list(range(2, 14))])                   # 3 of the 4 blocks
        gen = e.generate(list(range(2, 12)), max_tokens=2)
        with pytest.raises(engine.PoolExhausted, match=r"3 more blocks .* 1 free of 4"):
            list(gen)
        assert sorted(e.pool.seqs) == [hog] and e.pool.used_blocks == 3


def test_no_allocation_grows_while_decoding(models):
    with engine.load(models[("qwen2", (4, 32))], backend="mlx", kv_tokens=512) as e:
        sid = e.add_sequence()
        logits = e.step([sid], [PROMPT])
        token = int(mx.argmax(logits[0]).item())
        logits = e.step([sid], [[token]])
        mx.clear_cache()
        after_first = mx.get_active_memory()
        for _ in range(40):
            token = int(mx.argmax(logits[0]).item())
            logits = e.step([sid], [[token]])
        mx.clear_cache()
        # 40 more tokens would hold 40 x 1 KiB of K/V if anything were allocated per token; what
        # varies is the odd small temporary (logits, indices) alive at the moment of measuring
        assert mx.get_active_memory() - after_first < e.pool.block_bytes // 4, "active memory stays flat"
        m = e.memory_breakdown()
        assert m["kv_reserved"] == e.pool.num_blocks * e.pool.block_bytes
        assert m["kv_used"] == 3 * e.pool.block_bytes        # 7 + 1 + 40 = 48 tokens in blocks of 16
        files = sum(a.nbytes for f in Path(models[("qwen2", (4, 32))]).glob("*.safetensors")
                    for a in mx.load(str(f)).values())
        assert m["weights"] == files


# ---- prompt caches --------------------------------------------------------------------------------
def test_prompt_cache_round_trip_resumes_with_identical_tokens(models, tmp_path):
    folder = models[("qwen3", (8, 64))]
    question = PROMPT + [60, 61, 62]
    fresh = reference_greedy(folder, question, 6)[0]
    with engine.load(folder, backend="mlx", kv_tokens=128) as e:
        sid = e.add_sequence()
        e.step([sid], [PROMPT])
        path = e.save_prompt_cache(tmp_path / "prefix", sid)
    assert path.name == "prefix.safetensors" and [p.name for p in tmp_path.iterdir()] == ["prefix.safetensors"]
    with engine.load(folder, backend="mlx", kv_tokens=128) as e:
        e.load_prompt_cache(path)
        gen = e.generate(question, max_tokens=6)
        assert [t.id for t in gen] == fresh
        assert gen.stats.cached_tokens == len(PROMPT) and gen.stats.prompt_tokens == len(question)


def test_prompt_cache_from_another_model_is_refused(models, tmp_path):
    with engine.load(models["other"], backend="mlx", kv_tokens=64) as e:
        sid = e.add_sequence()
        e.step([sid], [PROMPT])
        path = e.save_prompt_cache(tmp_path / "other.safetensors", sid)
    with engine.load(models[("llama", None)], backend="mlx", kv_tokens=64) as e:
        with pytest.raises(engine.PromptCacheError, match="made for another model"):
            e.load_prompt_cache(path)
        assert e.pool.used_blocks == 0 and not e.pool.seqs


def test_corrupt_or_truncated_prompt_cache_changes_nothing(models, tmp_path):
    folder = models[("llama", None)]
    with engine.load(folder, backend="mlx", kv_tokens=64) as e:
        sid = e.add_sequence()
        e.step([sid], [PROMPT])
        path = e.save_prompt_cache(tmp_path / "c.safetensors", sid)
        data = path.read_bytes()
        truncated = tmp_path / "t.safetensors"
        truncated.write_bytes(data[: len(data) // 2])
        garbage = tmp_path / "g.safetensors"
        garbage.write_bytes(b"\x00" * 64)
        before = (e.pool.used_blocks, sorted(e.pool.seqs))
        for bad in (truncated, garbage, tmp_path / "missing.safetensors"):
            with pytest.raises(engine.PromptCacheError):
                e.load_prompt_cache(bad)
            assert (e.pool.used_blocks, sorted(e.pool.seqs)) == before


# ---- memory limits ---------------------------------------------------------------------------------
def test_memory_limits_are_applied_and_restored(models, capfd):
    before = mx.get_memory_limit()
    with engine.load(models[("llama", None)], backend="mlx", kv_tokens=64,
                     memory={"memory_limit": "50%", "cache_limit": 2**28, "wired_limit": "80%"}) as e:
        assert mx.get_memory_limit() == int(e.limits.total * 0.5)
    assert mx.get_memory_limit() == before
    if not mx.metal.is_available():
        assert "wired_limit applies to Metal only; skipped" in capfd.readouterr().err


@pytest.mark.parametrize("options, message", [
    ({"kv_tokens": 10**12}, r"plus its KV pool .* more than the .* GiB available"),
    ({"memory": {"swap_limit": 1}}, "unknown memory setting"),
    ({"memory": {"cache_limit": "lots"}}, "cannot read 'lots'"),
    ({"memory": {"memory_limit": "150%"}}, "percentage must be in"),
    ({"kv_cache": 5}, "unknown engine option"),
    ({"backend": "cuda"}, "unknown backend 'cuda'; valid backends: auto, metal, emulator, mlx"),
])
def test_bad_engine_options_are_clear_errors(models, options, message):
    with pytest.raises(MetalforgeError, match=message):
        engine.load(models[("llama", None)], **options)


def test_bad_model_folders_are_clear_errors(tmp_path, models):
    with pytest.raises(MetalforgeError, match="not an mlx-lm model folder"):
        engine.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    from metalforge.engine.models import model_types
    with pytest.raises(MetalforgeError, match=f"model_type 'gpt2' is not supported; supported: {', '.join(model_types())}$"):
        engine.load(tmp_path)
    scaled = write_model(tmp_path / "scaled", shards=1)
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "proportional", "factor": 2}}))
    with pytest.raises(MetalforgeError, match=r"config.json: rope_scaling.rope_type 'proportional' is not supported; supported: "):
        engine.load(scaled)
    for field, value in (("hidden_act", "gelu"), ("use_sliding_window", True)):
        (scaled / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(MetalforgeError, match=rf"config.json: {field}={value!r} is not supported; supported: "):
            engine.load(scaled)
    (scaled / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))   # declared, not in the folder
    with pytest.raises(MetalforgeError, match=r"weights are missing 6 tensor\(s\), e.g. model.layers.0.mlp.gate_proj.bias"):
        engine.load(scaled)
    broken = write_model(tmp_path / "broken", shards=1)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(MetalforgeError, match="cannot read safetensors"):
        engine.load(broken)


# ---- the command line -------------------------------------------------------------------------------
def test_generate_and_cache_commands(models, tmp_path):
    folder = models[("qwen2", (4, 32))]
    run = lambda *a: subprocess.run([sys.executable, "-m", "metalforge.cli", *a], capture_output=True, text=True)
    out = run("generate", "--model", str(folder), "--prompt-tokens", "5,17,42", "--max-tokens", "4", "--backend", "mlx")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"w{t}" for t in reference_greedy(folder, [5, 17, 42], 4)[0]]
    assert "time to first token" in out.stderr
    cache = tmp_path / "p.safetensors"
    assert run("cache", "save", "--model", str(folder), "--prompt-tokens", "5,17", "--out", str(cache)).returncode == 0
    info = run("cache", "info", str(cache))
    assert info.returncode == 0 and "2 tokens, 2 layers" in info.stdout
    again = run("generate", "--model", str(folder), "--prompt-tokens", "5,17,42", "--max-tokens", "4",
                "--prompt-cache", str(cache))
    assert again.stdout == out.stdout and "(2 cached)" in again.stderr
    assert run("cache", "clear", str(tmp_path)).stdout.strip() == "removed 1 prompt cache file(s)"
    assert not cache.exists()
    bad = run("generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert bad.returncode == 2 and "not an mlx-lm model folder" in bad.stderr and "Traceback" not in bad.stderr


# ---- one op plan: what the tuner tunes is what the engine runs ------------------------------------------
def test_the_engine_runs_every_bucket_the_tuner_tuned_as_an_exact_match(tmp_path):
    """The tuner reads the model's op plan (decode attention in the engine's paged layout); the
    engine, decoding a 100- and a 300-token prompt (prefill buckets 128 and 512, contexts in
    128 and 512), finds the tuned entry of every bucket exactly."""
    from metalforge import results
    folder = write_model(tmp_path / "model", arch="qwen2", quantized=(4, 64), dtype=mx.float16, shards=1)
    out = tmp_path / "r.yaml"
    run = subprocess.run([sys.executable, "-m", "metalforge.cli", "tune", "--device", "m2", "--model", str(folder),
                          "--contexts", "128,512", "--trials", "2", "--seed", "0",
                          "--storage", f"sqlite:///{tmp_path / 't.db'}", "--results", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    tuned = {(family, key) for family, buckets in results.load(out)["entries"].items() for key in buckets}
    assert {f for f, _ in tuned} == {"qmv", "decode_attention", "prefill_attention", "gate_up", "norm_qkv", "qmm"}
    with engine.load(folder, backend="emulator", device="m2", results=out, kv_tokens=1024) as e:
        for n in (100, 300):
            list(e.generate([(7 * i) % 290 + 2 for i in range(n)], max_tokens=3))
        report = e.kernel_report()
    ran = {(v["family"], v["bucket"]): v["why"] for v in report.values() if "bucket" in v}
    assert tuned <= set(ran), tuned - set(ran)
    assert all("exact match" in ran[k] for k in tuned), {k: ran[k] for k in tuned}


def test_verify_steps_find_the_verify_buckets_the_tuner_tuned(tmp_path):
    """`tune --num-draft 3` also tunes decode attention at 4 tokens a sequence (the op plan's
    verify passes); the engine's verify steps find that bucket: one sequence verifying 3 drafts
    exactly, two verifying beside a plain token (one call, B=2) as the nearest, never the
    one-token bucket (a config for L=1 says nothing of L=4) or the family default."""
    from metalforge import results
    folder = write_model(tmp_path / "model", arch="qwen2", quantized=(4, 64), dtype=mx.float16, shards=1)
    out = tmp_path / "r.yaml"
    run = subprocess.run([sys.executable, "-m", "metalforge.cli", "tune", "--device", "m2", "--model", str(folder),
                          "--families", "decode_attention", "--contexts", "512", "--num-draft", "3", "--trials", "2",
                          "--seed", "0", "--storage", f"sqlite:///{tmp_path / 't.db'}", "--results", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    tuned = results.load(out)["entries"]["decode_attention"]
    assert sorted(e["shape"].get("L", 1) for e in tuned.values()) == [1, 4]
    verify_key, = [k for k, e in tuned.items() if e["shape"].get("L") == 4]
    with engine.load(folder, backend="emulator", device="m2", results=out, kv_tokens=2048) as e:
        sids = [e.add_sequence() for _ in range(3)]
        for sid in sids:
            e.step([sid], [[(7 * i + sid) % 290 + 2 for i in range(300)]])
        e.step([sids[0]], [[5, 6, 7, 8]])
        e.step(sids, [[9], [10, 11, 12, 13], [14, 15, 16, 17]])
        report = e.kernel_report()
    verify = {v["bucket"]: v["why"] for v in report.values() if v.get("family") == "decode_attention"
              and ",L=4" in v["bucket"]}
    assert verify.get(verify_key, "").startswith("ours (emulator asked for): exact match"), verify
    batched, = [why for bucket, why in verify.items() if bucket.startswith("B=2,")]
    assert "nearest match" in batched and "'L': 4" in batched and "'B': 1" in batched, batched
