"""Speculative decoding (engine/speculative.py): greedy output is plain greedy's token for token,
with a draft model and with prompt lookup; sampled output is distributed as the target's own
(a chi-square test over many seeds against the target's exact distribution from an independent
forward pass, which the draft's own distribution fails)."""
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from metalforge import engine
from metalforge.engine.speculative import PromptLookup
from metalforge.errors import MetalforgeError
from metalforge.testing import write_model
from reference_model import reference_greedy, reference_logits

PROMPT = [5, 17, 42, 99, 3, 250, 11, 5, 17, 42]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return {"target": write_model(root / "target", arch="llama", seed=1, vocab=300),
            "other": write_model(root / "other", arch="llama", seed=2, vocab=300),
            "small-target": write_model(root / "small-target", arch="llama", seed=3, vocab=12, hidden=64, inter=128),
            "small-draft": write_model(root / "small-draft", arch="llama", seed=4, vocab=12, hidden=64, inter=128)}


def ids(gen):
    return [t.id for t in gen]


def test_greedy_with_a_draft_model_is_plain_greedy(folders):
    want = reference_greedy(folders["target"], PROMPT, 24)[0]
    with engine.load(folders["target"], backend="mlx", kv_tokens=256, block_size=8) as e, \
            engine.load(folders["target"], backend="mlx", kv_tokens=256) as same, \
            engine.load(folders["other"], backend="mlx", kv_tokens=256) as other:
        assert ids(e.generate(PROMPT, max_tokens=24)) == want
        agreeing = e.generate(PROMPT, max_tokens=24, draft=same, num_draft=4)
        assert ids(agreeing) == want
        s = agreeing.stats
        assert s.acceptance == 1.0 and s.draft_tokens > 0, "the target as its own draft is always right"
        assert s.generated_tokens == 1 + s.verify_steps + s.accepted_tokens
        assert s.verify_steps < 24 / 4, "k+1 tokens per forward pass"
        rarely = e.generate(PROMPT, max_tokens=24, draft=other, num_draft=3)
        assert ids(rarely) == want
        assert rarely.stats.acceptance < 1.0 and rarely.stats.generated_tokens == 24
        assert e.pool.used_blocks == 0 and same.pool.used_blocks == 0 and other.pool.used_blocks == 0
        by_path = e.generate(PROMPT, max_tokens=10, draft=folders["other"], num_draft=2)
        assert ids(by_path) == want[:10]


def test_greedy_with_prompt_lookup_is_plain_greedy(folders):
    want = reference_greedy(folders["target"], PROMPT, 30)[0]
    with engine.load(folders["target"], backend="mlx", kv_tokens=256, block_size=8) as e:
        gen = e.generate(PROMPT, max_tokens=30, prompt_lookup=2, num_draft=5)
        assert ids(gen) == want
        assert gen.stats.draft_tokens > 0 and gen.stats.verify_steps + gen.stats.accepted_tokens == 29
        kept = e.generate(PROMPT, max_tokens=12, prompt_lookup=3, keep=True)
        assert ids(kept) == want[:12]
        assert e.tokens(kept.sequence) == PROMPT + want[:11], "kept: the prompt and every token but the last"


def test_rejected_drafts_go_back_to_the_pool_without_copying(folders):
    """The target's sequence is cut back to what it kept: its blocks are a prefix of the ones it
    had, and the pool holds exactly the blocks of the kept tokens."""
    with engine.load(folders["target"], backend="mlx", kv_tokens=256, block_size=4) as e, \
            engine.load(folders["other"], backend="mlx", kv_tokens=256) as other:
        gen = e.generate(PROMPT, max_tokens=20, draft=other, num_draft=6, keep=True)
        snapshots = []
        for _ in gen:
            if gen.sequence is not None:
                snapshots.append(list(e.pool.seq(gen.sequence).blocks))
        assert gen.stats.accepted_tokens < gen.stats.draft_tokens, "some drafts were rejected"
        seq = e.pool.seq(gen.sequence)
        assert e.pool.used_blocks == len(seq.blocks) == -(-seq.length // 4)
        for a, b in zip(snapshots, snapshots[1:]):
            n = min(len(a), len(b))
            assert a[:n - 1] == b[:n - 1], "blocks before the last kept one never move"


def test_a_batch_mixes_speculative_and_plain_requests(folders):
    prompts = [PROMPT, [9, 8, 7, 9, 8], list(range(2, 30))]
    want = [reference_greedy(folders["target"], p, 12)[0] for p in prompts]
    with engine.load(folders["target"], backend="mlx", kv_tokens=256, block_size=8) as e, \
            engine.load(folders["other"], backend="mlx", kv_tokens=256) as other:
        batch = e.batch()
        ids_ = [batch.add(prompts[0], max_tokens=12, draft=other, num_draft=3),
                batch.add(prompts[1], max_tokens=12),
                batch.add(prompts[2], max_tokens=12, prompt_lookup=2)]
        got = {}
        for rid, token in batch:
            got.setdefault(rid, []).append(token.id)
        assert [got[r] for r in ids_] == want
        assert batch.stats(ids_[0]).verify_steps > 0 and batch.stats(ids_[1]).verify_steps == 0
        assert e.pool.used_blocks == 0 and other.pool.used_blocks == 0


def test_one_ragged_step_verifies_every_speculative_request_beside_the_plain_ones(folders):
    """Two draft-model requests (as many drafts each: attended together), a prompt-lookup one and
    two plain requests: after the step that admits and prefills them, each scheduler step runs
    ONE forward pass of the target holding the plain requests' tokens and every verify pass, and
    each request's greedy tokens are the ones it gets alone."""
    prompts = [PROMPT, [9, 8, 7, 9, 8], list(range(2, 30)), [200, 201, 202, 203], [5, 6, 7, 5, 6, 7, 5, 6]]
    want = [reference_greedy(folders["target"], p, 10)[0] for p in prompts]
    with engine.load(folders["target"], backend="mlx", kv_tokens=512, block_size=8) as e, \
            engine.load(folders["other"], backend="mlx", kv_tokens=512) as other:
        passes, forward = [], e.model.forward

        def counted(step, ids):   # the real pass, its new tokens per sequence noted
            passes.append(list(step.counts))
            return forward(step, ids)
        e.model.forward = counted
        batch = e.batch()
        rids = [batch.add(prompts[0], max_tokens=10, draft=other, num_draft=3), batch.add(prompts[1], max_tokens=10),
                batch.add(prompts[2], max_tokens=10, draft=other, num_draft=3), batch.add(prompts[3], max_tokens=10),
                batch.add(prompts[4], max_tokens=10, prompt_lookup=2, num_draft=2)]
        got, per_step = {}, []
        while batch.requests:
            before = len(passes)
            for rid, token in batch.step():
                got.setdefault(rid, []).append(token.id)
            per_step.append(passes[before:])
        assert [got[r] for r in rids] == want
        assert per_step[0][:len(prompts)] == [[len(p)] for p in prompts], "the first step prefills, a pass a prompt"
        assert all(len(p) <= 1 for p in [per_step[0][len(prompts):]] + per_step[1:]), per_step
        mixed = [counts for (counts,) in filter(None, per_step[1:]) if 1 in counts and sum(c > 1 for c in counts) >= 2]
        assert mixed, "plain tokens and several verify passes in one forward pass"
        assert any(counts.count(4) >= 2 for counts in mixed), "the two draft-model requests side by side"
        assert sum(batch.stats(r).verify_steps for r in rids) > 0 and e.pool.used_blocks == 0


@pytest.mark.parametrize("options", [{}, {"kv_bits": 8, "kv_group_size": 32}, {"kv_bits": 4, "kv_group_size": 64}],
                         ids=["dense", "kv8", "kv4"])
def test_our_decode_kernel_verifies_two_requests_in_one_call_with_the_mlx_paths_tokens(folders, options):
    """Two draft-model requests (3 drafts each) beside two plain ones, the target on the emulator
    (our kernels): the same greedy tokens as on the mlx backend (MLX's ops), and the verify
    passes of both speculative requests are one call of our decode kernel (B=2, L=4)."""
    prompts = [PROMPT, [9, 8, 7, 9, 8], list(range(2, 30)), [200, 201, 202, 203]]

    def run(backend):
        with engine.load(folders["target"], backend=backend, device="m2", kv_tokens=512, block_size=8,
                         **options) as e, engine.load(folders["other"], backend="mlx", kv_tokens=512) as other:
            batch = e.batch()
            rids = [batch.add(prompts[0], max_tokens=8, draft=other, num_draft=3), batch.add(prompts[1], max_tokens=8),
                    batch.add(prompts[2], max_tokens=8, draft=other, num_draft=3), batch.add(prompts[3], max_tokens=8)]
            got = {}
            for rid, token in batch:
                got.setdefault(rid, []).append(token.id)
            assert batch.stats(rids[0]).verify_steps > 0 and batch.stats(rids[2]).verify_steps > 0
            return [got[r] for r in rids], e.kernel_report()
    want, _ = run("mlx")
    got, report = run("emulator")
    assert got == want
    ours = [k for k, v in report.items() if v.get("family") == "decode_attention"]
    assert any(k.startswith("decode_attention B=2,") and ",L=4" in k for k in ours), report
    assert all(report[k]["kernel"] == "metalforge decode_attention (emulator)" for k in ours)


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    look = PromptLookup(2)
    assert look.propose([1, 2, 3, 4, 1, 2, 5, 6, 1, 2], 3, None, None) == ([5, 6, 1], None)
    assert look.propose([7, 8, 9, 8], 2, None, None) == ([9, 8], None), "falls back to one-token matches"
    assert look.propose([1, 2, 3], 2, None, None) == ([], None)


def test_bad_speculative_arguments_are_one_line_errors(folders):
    with engine.load(folders["target"], backend="mlx", kv_tokens=64) as e:
        with pytest.raises(MetalforgeError, match="num_draft"):
            e.generate(PROMPT, draft=folders["other"], num_draft=0)
        with pytest.raises(MetalforgeError, match="not both"):
            e.generate(PROMPT, draft=folders["other"], prompt_lookup=2)
        with pytest.raises(MetalforgeError, match="another engine"):
            e.generate(PROMPT, draft=e)
        with pytest.raises(MetalforgeError, match="draft must be an engine or a model folder"):
            e.generate(PROMPT, draft=3)


def test_generate_command_decodes_speculatively(folders):
    run = lambda *a: subprocess.run([sys.executable, "-m", "metalforge.cli", "generate", "--model",
                                     str(folders["target"]), "--backend", "mlx", "--prompt-tokens",
                                     ",".join(map(str, PROMPT)), "--max-tokens", "8", *a],
                                    capture_output=True, text=True)
    want = [str(t) for t in reference_greedy(folders["target"], PROMPT, 8)[0]]
    for extra in (("--draft-model", str(folders["other"]), "--num-draft", "2"), ("--prompt-lookup", "2")):
        out = run(*extra)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == want
        assert "verify passes" in out.stderr and "accepted per pass" in out.stderr


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square (cells expecting under 5 pooled), by the
    Wilson-Hilferty normal approximation of the chi-square distribution."""
    n = counts.sum()
    order = np.argsort(probs)
    obs, exp, pooled_o, pooled_e = [], [], 0.0, 0.0
    for i in order:
        pooled_o, pooled_e = pooled_o + counts[i], pooled_e + n * probs[i]
        if pooled_e >= 5:
            obs.append(pooled_o), exp.append(pooled_e)
            pooled_o = pooled_e = 0.0
    if pooled_e:
        obs[-1] += pooled_o
        exp[-1] += pooled_e
    obs, exp = np.array(obs), np.array(exp)
    stat, k = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def second_token_distribution(folder, prompt, temperature, eos=1):
    """P(second generated token), summed over the first (not the end-of-sequence token, which
    ends generation): exact, from the reference forward pass."""
    first = np.array(mx.softmax(reference_logits(folder, prompt)[-1] / temperature), dtype=np.float64)
    out = np.zeros_like(first)
    for t, p in enumerate(first):
        if t != eos:
            out += p * np.array(mx.softmax(reference_logits(folder, prompt + [t])[-1] / temperature), dtype=np.float64)
    return out / out.sum()


@pytest.mark.parametrize("how", ["draft", "prompt_lookup"])
def test_sampled_tokens_follow_the_target_distribution(folders, how):
    prompt, temperature, runs = [3, 7] + list(range(12)), 0.7, 600   # every token has a lookup match
    target = second_token_distribution(folders["small-target"], prompt, temperature)
    draft_dist = second_token_distribution(folders["small-draft"], prompt, temperature)
    counts = np.zeros(12)
    with engine.load(folders["small-target"], backend="mlx", kv_tokens=64) as e, \
            engine.load(folders["small-draft"], backend="mlx", kv_tokens=64) as d:
        extra = dict(draft=d, num_draft=2) if how == "draft" else dict(prompt_lookup=1, num_draft=2)
        drafted = accepted = 0
        for seed in range(runs):
            gen = e.generate(prompt, max_tokens=3, temperature=temperature, seed=seed, **extra)
            tokens = ids(gen)
            if len(tokens) > 1:   # not ended by the end-of-sequence token first
                counts[tokens[1]] += 1
            drafted, accepted = drafted + gen.stats.draft_tokens, accepted + gen.stats.accepted_tokens
    assert 0 < accepted < drafted, "both rules ran: drafts kept and drafts rejected"
    assert chi_square_p(counts, target) > 1e-3
    if how == "draft":
        assert chi_square_p(counts, draft_dist) < 1e-6, "the test tells the draft's distribution from the target's"


def test_a_full_pool_verifies_without_drafts_before_it_ends(folders):
    """Drafts that do not fit are dropped for the pass (the token alone may still fit); when not
    even that fits the request ends with the pool's reason, and greedy tokens stay plain greedy's."""
    want = reference_greedy(folders["target"], PROMPT, 30)[0]
    with engine.load(folders["target"], backend="mlx", kv_tokens=32, block_size=4, max_seq_len=64) as e:
        e.step([e.add_sequence()], [[3] * 12])   # a sequence held outside: 20 tokens of room left
        gen = e.generate(PROMPT, max_tokens=30, prompt_lookup=1, num_draft=6)
        got = [t.id for t in gen]
        assert got == want[:len(got)] and len(got) >= 10
        assert gen.stats.stop_reason == "KV pool exhausted"
        plain = e.generate(PROMPT, max_tokens=30)
        assert [t.id for t in plain] == got, "as many tokens as plain decoding fits"
