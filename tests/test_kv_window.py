"""Sliding KV (engine.load(max_kv_size=N)): the keys each query reads are the ones mlx-lm's
RotatingKVCache(max_size=N, keep=4) holds, greedy tokens equal mlx-lm's generate with
max_kv_size=N across several window crossings, and blocks out of the window go back to the pool,
so a small pool decodes far past its size with flat memory."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge import engine
from metalforge.engine.kv.spec import SinkWindow
from metalforge.errors import MetalforgeError
from metalforge.testing import write_model

PROMPT = [5, 17, 42, 99, 3, 250, 11, 8, 2, 77]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("window") / "llama", arch="llama", seed=5, vocab=300, shards=1)


def test_keys_read_are_the_ones_mlx_lms_rotating_cache_holds():
    """Each key carries its position as its value; after each one-token update the positions in
    mlx-lm's cache are the ones our window reads for that token."""
    from mlx_lm.models.cache import RotatingKVCache
    for window, first in ((12, 5), (9, 1)):
        cache, spec = RotatingKVCache(max_size=window, keep=4), SinkWindow(window, 4)
        prompt = mx.arange(first, dtype=mx.float32).reshape(1, 1, first, 1)
        cache.update_and_fetch(prompt, prompt)
        for t in range(first, 60):
            x = mx.full((1, 1, 1, 1), t, dtype=mx.float32)
            keys, _ = cache.update_and_fetch(x, x)
            theirs = sorted(int(p) for p in keys.reshape(-1).tolist())
            ours = [p for a, e in spec.reads(t, t + 1) for p in range(a, e)]
            assert ours == theirs, f"window {window}, token {t}"


def test_greedy_tokens_and_logits_match_mlx_lm_with_max_kv_size(folder):
    """Tokens equal, and each step's log-probabilities close to mlx-lm's windowed ones and far
    from its full-attention ones past the first crossing."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import RotatingKVCache
    from mlx_lm.utils import load_model
    model, _ = load_model(folder)
    window, n = 32, 110   # three window crossings
    # the caches generate's max_kv_size makes; passed explicitly because mlx-lm 0.32's llama has its
    # own make_cache (for its sliding-window layers), which generate prefers to max_kv_size
    rotating = [RotatingKVCache(max_size=window, keep=4) for _ in model.layers]
    theirs, theirs_lp = zip(*generate_step(mx.array(PROMPT), model, max_tokens=n, prompt_cache=rotating))
    _, full_lp = zip(*generate_step(mx.array(PROMPT), model, max_tokens=n))
    theirs = [int(t) for t in theirs]
    with engine.load(folder, backend="mlx", kv_tokens=64, block_size=8, max_kv_size=window) as e:
        assert [t.id for t in e.generate(PROMPT, max_tokens=n)] == theirs
        lookup = e.generate(PROMPT, max_tokens=n, prompt_lookup=2, num_draft=4)
        assert [t.id for t in lookup] == theirs, "speculative verify passes mask the window too"
        assert lookup.stats.accepted_tokens > 0
        sid, feed = e.add_sequence(), PROMPT
        for i in range(n):
            logits = e.step([sid], [feed])[0]
            ours_lp = logits - mx.logsumexp(logits)
            assert mx.abs(ours_lp - theirs_lp[i]).max().item() < 1e-3, f"token {i}"
            if len(PROMPT) + i > window:
                assert mx.abs(ours_lp - full_lp[i]).max().item() > 1e-2, f"token {i}: the window shows"
            feed = [theirs[i]]


def test_a_small_pool_decodes_far_past_its_size_with_flat_memory(folder):
    every, total = 250, 2000
    with engine.load(folder, backend="mlx", kv_tokens=64, block_size=8, max_kv_size=32) as e:
        gen = e.generate(PROMPT, max_tokens=total, keep=True, stop=[])
        used, active = [], []
        for i, _ in enumerate(gen, 1):
            if i % every == 0:
                mx.eval(e.pool.storage.arrays())
                used.append(e.pool.used_blocks)
                active.append(mx.get_active_memory())
        assert gen.stats.generated_tokens > 2 * every, gen.stats.stop_reason
        assert max(used) <= 1 + 32 // 8 + 1, "the sink block and the window's blocks"
        assert max(active) - min(active) <= e.pool.block_bytes, f"active memory moved: {active}"
        seq = e.pool.seq(gen.sequence)
        assert seq.length > e.pool.capacity_tokens
        with pytest.raises(MetalforgeError, match="fell out of its window"):
            e.pool.fork(gen.sequence, 100)
        with pytest.raises(MetalforgeError, match="window"):
            e.save_prompt_cache("/tmp/never.safetensors", gen.sequence)
    with engine.load(folder, backend="mlx", kv_tokens=64, block_size=8) as e:
        assert sum(1 for _ in e.generate(PROMPT, max_tokens=total)) < 64, "without a window the pool ends it"


def test_a_request_may_have_its_own_window(folder):
    """generate(max_kv_size=) gives one request the window load(max_kv_size=) gives all, and in a
    batch a windowed request and a full one each get their tokens alone."""
    n = 120
    with engine.load(folder, backend="mlx", kv_tokens=64, block_size=8, max_kv_size=32) as e:
        windowed = [t.id for t in e.generate(PROMPT, max_tokens=n)]
    with engine.load(folder, backend="mlx", kv_tokens=256, block_size=8, max_seq_len=400) as e:
        assert [t.id for t in e.generate(PROMPT, max_tokens=n, max_kv_size=32)] == windowed
        full = [t.id for t in e.generate(PROMPT, max_tokens=n)]
        batch = e.batch()
        a = batch.add(PROMPT, max_tokens=n, max_kv_size=32)
        b = batch.add(PROMPT, max_tokens=n)
        got, most = {}, 0
        for rid, token in batch:
            got.setdefault(rid, []).append(token.id)
            if rid == a and len(got[a]) > 60 and a in batch.requests:
                most = max(most, len([x for x in e.pool.seq(batch.sequence(a)).blocks if x is not None]))
        assert got[a] == windowed and got[b] == full
        assert 0 < most <= 1 + 32 // 8 + 1, "the windowed request gives its old blocks back"
        with pytest.raises(MetalforgeError, match="max_kv_size=3 must exceed"):
            e.generate(PROMPT, max_kv_size=3)


def test_other_backends_read_a_rotating_window_through_mlx(folder):
    """Until a sequence outgrows its pool window every query sees every key, and our kernels
    read it as full attention; once it rotates (the sink positions, a gap, the latest keys) no
    kernel of ours reads it and the emulator backend runs MLX's attention: the mlx backend's
    tokens and logits on both sides of the first crossing."""
    prompt, steps = PROMPT, [[3], [8, 9], [4]]   # 10 positions, then 11, 13 (a verify pass's two tokens), 14

    def run(backend, more):
        with engine.load(folder, backend=backend, device="m2", kv_tokens=64, block_size=8, max_kv_size=16) as e:
            sid = e.add_sequence()
            logits = [e.step([sid], [prompt])] + [e.step([sid], [t], logits_at={sid: list(range(len(t)))})
                                                    for t in steps + more]
            return logits, e.kernel_report()
    want, _ = run("mlx", [[5, 6, 7], [1]])           # 17, then 18: the window rotates
    before, report = run("emulator", [])
    for w, g in zip(want, before):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-4)
    assert [k for k in report if k.startswith("decode_attention ")] and "decode attention" not in report, report
    after, report = run("emulator", [[5, 6, 7], [1]])
    for w, g in zip(want, after):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-4)
    assert report["decode attention"]["kernel"].startswith("mx.fast.scaled_dot_product_attention"), report


def test_bad_window_is_a_one_line_error(folder):
    with pytest.raises(MetalforgeError, match="max_kv_size=4 must exceed the 4 attention sinks"):
        engine.load(folder, kv_tokens=64, max_kv_size=4)
    with pytest.raises(MetalforgeError, match="max_kv_size=128 .* kv_tokens=64"):
        engine.load(folder, kv_tokens=64, max_kv_size=128)


def test_generate_command_takes_the_kv_options(folder):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "metalforge.cli", "generate", "--model", str(folder),
                          "--backend", "mlx",
                          "--prompt-tokens", ",".join(map(str, PROMPT)), "--max-tokens", "40", "--kv-tokens", "64",
                          "--max-kv-size", "16", "--kv-bits", "8", "--kv-group-size", "32"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with engine.load(folder, backend="mlx", kv_tokens=64, max_kv_size=16, kv_bits=8, kv_group_size=32) as e:
        assert out.stdout.split() == [str(t.id) for t in e.generate(PROMPT, max_tokens=40)]
