"""Many sequences at once (engine.generate_batch, engine.batch): each sequence's tokens are the
ones it gets alone, requests join and leave mid-stream, prompts sharing a prefix share its blocks,
and decoding allocates nothing per token."""
import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from metalforge import engine
from metalforge.testing import write_model
from metalforge.errors import MetalforgeError
from reference_model import reference_greedy, reference_logits

PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [9, 8, 7], list(range(1, 40)), [200, 201, 202, 203, 204]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("batch") / "qwen3-q4", arch="qwen3", quantized=(4, 32), layers=2,
                       vocab=300, seed=3)


def alone(e, prompt, n, **sampling):
    return [t.id for t in e.generate(prompt, max_tokens=n, **sampling)]


def collect(stream):
    out = {}
    for rid, token in stream:
        out.setdefault(rid, []).append(token.id)
    return out


def test_batched_greedy_decoding_gives_each_sequence_its_tokens_alone(folder):
    with engine.load(folder, backend="mlx", kv_tokens=512, block_size=8) as e:
        got = collect(e.generate_batch(PROMPTS, max_tokens=6))
        expected = {i: alone(e, p, 6) for i, p in enumerate(PROMPTS)}
        assert e.pool.used_blocks == 0, "finished sequences gave their blocks back"
    assert got == expected
    # and alone is right: an independent forward pass in numpy-checked MLX ops
    assert expected[0] == reference_greedy(folder, PROMPTS[0], 6)[0]


def test_sampled_requests_keep_their_own_settings(folder):
    settings = [dict(temperature=0.8, seed=1), dict(temperature=1.5, top_k=20, seed=2), dict()]
    with engine.load(folder, backend="mlx", kv_tokens=512) as e:
        batch = e.batch()
        ids = [batch.add(p, max_tokens=5, **s) for p, s in zip(PROMPTS, settings)]
        got = collect(batch)
        assert got == {rid: alone(e, p, 5, **s) for rid, p, s in zip(ids, PROMPTS, settings)}


def test_requests_join_and_leave_mid_stream(folder):
    with engine.load(folder, backend="mlx", kv_tokens=512, block_size=8) as e:
        expected = [alone(e, p, n) for p, n in zip(PROMPTS, (8, 3, 6, 4))]
        batch = e.batch()
        first = batch.add(PROMPTS[0], max_tokens=8)
        short = batch.add(PROMPTS[1], max_tokens=3)
        got, joined, live_sizes = {}, {}, []
        for rid, token in batch:
            got.setdefault(rid, []).append(token.id)
            live_sizes.append(len(batch.requests))
            if rid == first and len(got[first]) == 2:            # two join while others decode
                joined[batch.add(PROMPTS[2], max_tokens=6)] = 2
                joined[batch.add(PROMPTS[3], max_tokens=4)] = 3
        assert got[first] == expected[0] and got[short] == expected[1]
        assert {i: got[rid] for rid, i in joined.items()} == {2: expected[2], 3: expected[3]}
        assert batch.stats(short).stop_reason == "max_tokens" and batch.stats(short).generated_tokens == 3
        assert max(live_sizes) == 4 and live_sizes[-1] <= 1, "the batch grew to four and drained"
        assert e.pool.used_blocks == 0 and not e.pool.seqs

        batch = e.batch()                                        # leaving early by cancel
        a, b = batch.add(PROMPTS[0], max_tokens=50), batch.add(PROMPTS[2], max_tokens=6)
        got = {}
        for rid, token in batch:
            got.setdefault(rid, []).append(token.id)
            if rid == a and len(got[a]) == 3:
                batch.cancel(a)
        assert got[a] == expected[0][:3] and got[b] == expected[2]
        assert batch.stats(a).stop_reason == "cancelled"
        assert e.pool.used_blocks == 0


def test_prompts_sharing_a_prefix_share_its_blocks(folder):
    system = list(range(10, 42))                                  # four blocks of 8
    prompts = [system + [7, 8], system + [99], system + [5, 6, 7]]
    with engine.load(folder, backend="mlx", kv_tokens=512, block_size=8) as e:
        expected = [alone(e, p, 4) for p in prompts]
        batch = e.generate_batch(prompts, max_tokens=4)
        batch.step()                                              # all three prefilled
        assert [batch.stats(i).cached_tokens for i in range(3)] == [0, 32, 32]
        assert e.pool.used_blocks == 5 + 1 + 1, "the four shared blocks are stored once"
        got = collect(batch)
        # the first step's tokens were consumed by step(): compare the rest
        assert {i: got[i] for i in range(3)} == {i: expected[i][1:] for i in range(3)}


def test_memory_stays_flat_over_200_decoded_tokens(folder):
    with engine.load(folder, backend="mlx", kv_tokens=1024, block_size=16) as e:
        e.args = dataclasses.replace(e.args, eos_token_id=())    # random weights: no early stop
        gen = e.generate(PROMPTS[2], max_tokens=230)
        samples = []
        for i, _ in enumerate(gen):
            if i in (30, 230 - 1):
                mx.clear_cache()
                samples.append(mx.get_active_memory())
        assert gen.stats.generated_tokens == 230
        # 200 tokens of K/V would be 200 x 2 layers x 2 x 64 x 4 bytes = 200 KiB if allocated per token
        assert samples[1] - samples[0] < e.pool.block_bytes, "nothing allocated per decoded token"


def test_a_prompt_longer_than_a_prefill_chunk_matches_the_reference(folder):
    from metalforge.engine.engine import PREFILL_CHUNK
    prompt = [(7 * i) % 290 + 2 for i in range(2 * PREFILL_CHUNK + 37)]      # two chunk boundaries
    expected = reference_logits(folder, prompt)[-1]
    with engine.load(folder, backend="mlx", kv_tokens=2048, block_size=16) as e:
        sid = e.add_sequence()
        got = e.prefill(sid, prompt)[0]
        assert e.tokens(sid) == prompt
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=2e-3, atol=2e-3)


# ---- waiting for room -----------------------------------------------------------------------------
def test_120_requests_on_a_pool_holding_4_all_complete_as_alone(folder):
    """Each request holds its prompt (7 to 10 tokens) and 2 of its 3 tokens: 3 blocks of 4 of the
    pool's 12, so four run at once."""
    prompts = [[(11 * i + 3 * j) % 290 + 2 for j in range(7 + i % 4)] for i in range(120)]
    with engine.load(folder, backend="mlx", kv_tokens=48, block_size=4) as e:
        e.args = dataclasses.replace(e.args, eos_token_id=())    # every request runs its whole budget
        expected = {i: alone(e, p, 3) for i, p in enumerate(prompts)}
        batch = e.batch()
        ids = [batch.add(p, max_tokens=3) for p in prompts]
        assert ids == list(range(120)) and len(batch.waiting) == 120
        got, admitted = {}, []
        while batch.requests:
            for rid, token in batch.step():
                got.setdefault(rid, []).append(token.id)
            admitted.append(len(batch.requests) - len(batch.waiting))
            assert e.pool.used_blocks <= e.pool.num_blocks
        assert got == expected
        assert max(admitted) == 4, "four at once, never more"
        assert {batch.stats(i).stop_reason for i in ids} == {"max_tokens"}
        assert e.pool.used_blocks == 0


def test_a_request_reaching_max_seq_len_ends_alone(folder):
    long_prompt = list(range(2, 30))                               # 28 tokens: room for 4 more of 32
    with engine.load(folder, backend="mlx", kv_tokens=256, block_size=8, max_seq_len=32) as e:
        e.args = dataclasses.replace(e.args, eos_token_id=())
        expected = [alone(e, p, 8) for p in PROMPTS[:2]]
        limited = alone(e, long_prompt, 8)
        assert len(limited) == 5, "alone it ends at max_seq_len too: 28 + 4 tokens held, the 5th not fed back"
        batch = e.batch()
        a = batch.add(PROMPTS[0], max_tokens=8)
        capped = batch.add(long_prompt, max_tokens=8)
        b = batch.add(PROMPTS[1], max_tokens=8)
        got = collect(batch)
        assert got[capped] == limited and batch.stats(capped).stop_reason == "max_seq_len"
        assert [got[a], got[b]] == expected, "the others go on"
        assert batch.stats(a).stop_reason == batch.stats(b).stop_reason == "max_tokens"
        with pytest.raises(MetalforgeError, match="33 tokens, over the engine's maximum sequence length of 32"):
            batch.add(list(range(2, 35)))
        with pytest.raises(MetalforgeError, match="over the engine's maximum sequence length"):
            e.generate(list(range(2, 35)))


def test_a_request_finding_the_pool_full_ends_alone(folder):
    """Blocks held outside the batch (a kept sequence) leave too little room: the request that
    needs a block the pool no longer has ends with its reason, the other goes on."""
    with engine.load(folder, backend="mlx", kv_tokens=64, block_size=4) as e:
        e.args = dataclasses.replace(e.args, eos_token_id=())
        short = alone(e, [9, 8, 7, 6], 4)                          # 4 + 3 tokens: 2 blocks
        hog = e.add_sequence()
        e.step([hog], [list(range(2, 50))])                       # 12 of the 16 blocks
        batch = e.batch()
        big = batch.add([5, 17, 42, 99], max_tokens=40)            # wants 11 blocks, 4 left
        small = batch.add([9, 8, 7, 6], max_tokens=4)
        got = collect(batch)
        assert batch.stats(big).stop_reason == "KV pool exhausted" and 0 < len(got[big]) < 40
        assert got[small] == short and batch.stats(small).stop_reason == "max_tokens"
        assert e.tokens(hog) == list(range(2, 50)) and e.pool.used_blocks == 12


def test_the_queue_is_bounded(folder):
    with engine.load(folder, backend="mlx", kv_tokens=64, block_size=4) as e:
        batch = e.batch(max_waiting=2)
        batch.add([1, 2], max_tokens=2)
        batch.add([3, 4], max_tokens=2)
        with pytest.raises(MetalforgeError, match=r"queue is full: 2 requests wait .*max_waiting=2"):
            batch.add([5, 6], max_tokens=2)
        assert len(collect(batch)) == 2


def test_a_batch_on_our_kernels_gives_each_sequence_its_tokens_alone(folder):
    """On the emulator backend a batch decodes through our paged decode-attention kernel, its
    block table as wide as the longest sequence's context bucket (here 64 tokens for a
    39-token prompt beside short ones)."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    with engine.load(folder, backend="mlx", kv_tokens=512, block_size=8) as e:
        expected = {i: alone(e, p, 4) for i, p in enumerate(prompts)}
    with engine.load(folder, backend="emulator", device="m2", kv_tokens=512, block_size=8) as e:
        got = collect(e.generate_batch(prompts, max_tokens=4))
        report = e.kernel_report()
    assert got == expected
    batched = [k for k, v in report.items() if k.startswith("decode_attention B=3")]
    assert batched and all(report[k]["kernel"] == "metalforge decode_attention (emulator)" for k in batched)
    assert any("S=64" in k for k in batched), batched
