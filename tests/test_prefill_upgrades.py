"""Prefill attention's head-dim blocking (d_block), half scores (score_type) and GQA packing
(heads): each value against MLX's attention in the emulator, the room blocking makes, the K/V
traffic packing saves (traced), the refusals; and the trace's bank conflicts on the fragment
reads of prefill and qmm."""
import mlx.core as mx
import pytest

from metalforge import emulator
from metalforge.emulator import EmulatorError
from metalforge.kernels import check, dtypes, trace_report
from metalforge.kernels import get_family as family

from test_families_emulated import verify

PREFILL = family("prefill_attention")


def _configs(*changes):
    return [PREFILL.config(c) for c in changes]


# Each new value with the others at their defaults, plus the paths it meets: Q in registers (its
# fragments indexed by chunk), the largest key tile blocking makes room for, half scores in chunks.
D64 = _configs(dict(d_block=16), dict(d_block=32), dict(score_type="half"),
               dict(d_block=16, q_source="registers", load_width=2), dict(BK=128, d_block=32, score_type="half"))
D128 = _configs(dict(d_block=16), dict(d_block=32), dict(d_block=64), dict(score_type="half"),
                dict(BQ=32, BK=128, d_block=32), dict(BK=64, d_block=64, q_source="registers", score_type="half"))


@pytest.mark.parametrize("shape, configs", [
    (dict(B=1, Hq=4, Hkv=2, L=70, D=64), D64),               # L a multiple of no tile: a tail
    (dict(B=2, Hq=2, Hkv=1, L=45, D=128, prefix=19), D128),  # after a cached prefix
])
def test_every_new_value_matches_mlx_attention(shape, configs):
    assert verify("prefill_attention", shape, "float16", configs=configs) == len(configs)


@pytest.mark.parametrize("config", [dict(heads=2), dict(heads=4, q_source="registers"),
                                    dict(heads=8, BQ=64, simdgroups=8, d_block=32, score_type="half")])
def test_gqa_packing_matches_mlx_attention(config):
    shape = dict(B=2, Hq=16, Hkv=2, L=21, D=64, prefix=6)   # 8 query heads a KV head, a tail
    assert verify("prefill_attention", shape, "float16", configs=_configs(config)) == 1


def test_window_and_sinks_with_blocking_and_half_scores():
    shape = dict(B=1, Hq=2, Hkv=1, L=65, D=128, prefix=3, window=24, sinks=1)
    configs = _configs(dict(BK=16, d_block=32), dict(d_block=64, score_type="half", q_source="registers"))
    assert verify("prefill_attention", shape, "float16", configs=configs) == 2
    packed = dict(shape, Hq=4)   # each head's own sink, four heads a threadgroup
    assert verify("prefill_attention", packed, "float16", configs=_configs(dict(heads=4, BK=16))) == 1


def test_blocking_fits_128_key_tiles_under_32_kb():
    """Hand-checked, D=128 in half on M1 (32 KB), BQ=32 with Q in threadgroup memory (rows of 256 +
    16 bytes): whole rows need (32 + 2 x 128) x 272 = 78,336 bytes; with d_block=32 one buffer of
    128 rows of 64 + 16 bytes: 32 x 272 + 128 x 80 = 18,944. At D=256, BQ=16, BK=128: 16 x 528 +
    128 x 80 = 18,688."""
    shape = dict(B=1, Hq=32, Hkv=8, L=512, D=128)
    whole = check(PREFILL, dict(BQ=32, BK=128), shape, "float16", "m1")
    assert [str(p) for p in whole] == ["Threadgroup memory size (78336) exceeds the maximum threadgroup memory "
                                       "allowed (32768)"]
    config = PREFILL.config(dict(BQ=32, BK=128, d_block=32))
    assert check(PREFILL, config, shape, "float16", "m1") == []
    assert PREFILL.geometry(config, PREFILL.shape(shape), dtypes.get("float16"))[0].threadgroup_memory_bytes == 18944
    config = PREFILL.config(dict(BQ=16, BK=128, simdgroups=2, d_block=32))
    d256 = PREFILL.shape(dict(shape, D=256))
    assert check(PREFILL, config, d256, "float16", "m1") == []
    assert PREFILL.geometry(config, d256, dtypes.get("float16"))[0].threadgroup_memory_bytes == 18688


@pytest.mark.parametrize("config, shape, dtype, problem", [
    (dict(d_block=32), dict(D=80), "float16", "d_block=32 does not divide D=80"),
    (dict(d_block=64), dict(D=64), "float16", "d_block=64 is all of D=64 (d_block=0 stages whole rows)"),
    (dict(d_block=32, double_buffer=True), dict(D=128), "float16",
     "double_buffer streams whole K/V tiles; d_block stages a chunk at a time (set one of them)"),
    (dict(heads=4), dict(D=64, Hq=6, Hkv=3), "float16", "heads=4 does not divide the 2 query heads of a KV head"),
    (dict(heads=4, BQ=16, simdgroups=2), dict(D=64, Hq=4, Hkv=1), "float16",
     "heads=4 over simdgroups=2: each SIMD-group's rows must be of one head"),
    (dict(score_type="half"), dict(D=128), "bfloat16",
     "score_type=half reads half tiles as half fragments (float16 inputs staged as input)"),
    (dict(score_type="half", stage="float", BQ=16, BK=16, simdgroups=2), dict(D=128), "float16",
     "score_type=half reads half tiles as half fragments (float16 inputs staged as input)"),
])
def test_refusals_name_the_problem(config, shape, dtype, problem):
    shape = {"B": 1, "Hq": 2, "Hkv": 1, "L": 64, **shape}
    assert [str(p) for p in check(PREFILL, config, shape, dtype, "m3-max-40")] == [problem]


def test_half_scores_hold_fewer_registers():
    """BQ=64 over 4 SIMD-groups, BK=64, D=128, Q in registers: O 2 x 16 fragments, S 2 x 8, Q 2 x 16
    and one operand: 32 + 49 = 81 fp32 fragments (over 64: refused); with half S, Q and operand,
    32 + 25 = 57."""
    shape = PREFILL.shape(dict(B=1, Hq=32, Hkv=8, L=512, D=128))
    base = dict(BQ=64, BK=64, simdgroups=4, q_source="registers")
    assert PREFILL.fragments(PREFILL.config(base), shape) == 81
    assert PREFILL.fragments(PREFILL.config(dict(base, score_type="half")), shape) == 57


# ---- traced: K/V traffic and bank conflicts (the emulator's trace mode) -------------------------
def _trace(fam, config, shape, dtype="float16"):
    shape, dt = fam.shape(shape), dtypes.get(dtype)
    config = fam.config(config)
    assert check(fam, config, shape, dtype, "m3-max-40") == []
    dispatches = trace_report.ours(fam, config, shape, dt, fam.make_inputs(shape, dt))
    return dispatches[0].trace


def test_gqa_packing_reads_each_kv_tile_once_for_its_heads():
    """A few new tokens after a long prefix (a verified draft, a chunk of a prompt): 8 positions
    of 4 query heads of one KV head. Unpacked, each head's threadgroup streams all 128 keys; packed,
    one threadgroup does for the 4 heads: K and V device traffic (sectors touched) a quarter, Q and
    O the same, the same multiply-accumulates."""
    shape = dict(B=1, Hq=4, Hkv=1, L=8, D=64, prefix=120)
    alone = _trace(PREFILL, dict(BQ=8, BK=32, simdgroups=1), shape)
    packed = _trace(PREFILL, dict(BQ=32, BK=32, simdgroups=4, heads=4), shape)
    for name in ("keys", "values"):
        assert alone.device[name].sectors[128] == 4 * packed.device[name].sectors[128] > 0
    for name in ("queries", "out"):
        assert alone.device[name].sectors[128] == packed.device[name].sectors[128]
    assert alone.matrix_multiplies == packed.matrix_multiplies


def test_the_model_prices_packing_below_unpacked_tiles_on_a_full_gpu():
    """8B-class heads (32 query, 8 KV, D=128), 16 new tokens after 4,096, batch 4 on an M3 Max,
    priced by the per-kernel model from the counted work: packing 4 heads beats both 8-row tiles
    (K/V streamed per head) and 32-row tiles (24 of 32 rows idle for 16 tokens)."""
    shape = PREFILL.shape(dict(B=4, Hq=32, Hkv=8, L=16, D=128, prefix=4096))
    def price(config):
        return PREFILL.modelled_seconds(PREFILL.config(config), shape, "float16", "m3-max-40")
    packed = price(dict(BQ=32, BK=32, simdgroups=4, heads=4))
    assert packed < price(dict(BQ=8, BK=32, simdgroups=1)) and packed < price(dict(BQ=32, BK=32, simdgroups=4))


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("change", [dict(), dict(d_block=32), dict(q_source="registers", score_type="half"),
                                    dict(stage="float", BQ=16, BK=16, simdgroups=2), dict(stage="float", d_block=32),
                                    dict(stage="float", q_source="registers", BK=16)])
def test_prefill_fragment_reads_have_no_bank_conflicts(D, change):
    """One K/V element per thread when staging (load_width=1: consecutive lanes, consecutive
    words, no conflict), so every conflict the trace could count is on the Q, K^T and V fragment
    reads: there are none with padded rows, half or fp32. (fp32 rows padded by 16 bytes alone
    start 4 banks apart, and a read along rows, 8 rows x 4 even columns, met 16 banks: 2-way,
    1,536 extra passes at D=64; odd rows swap their column pairs now.)"""
    t = _trace(PREFILL, {**dict(BQ=32, BK=32, load_width=1), **change}, dict(B=1, Hq=1, Hkv=1, L=64, D=D))
    assert t.threadgroup_accesses > 0 and t.matrix_multiplies > 0
    assert t.bank_conflicts == 0


def test_swizzled_fp32_tiles_match_mlx_attention():
    """The swizzle moves where staged values sit; every read and store must agree on it."""
    configs = _configs(dict(stage="float"), dict(stage="float", load_width=2, d_block=32),
                       dict(stage="float", q_source="registers", double_buffer=True, BK=16),
                       dict(stage="float", pad=False, load_width=1))
    assert verify("prefill_attention", dict(B=1, Hq=4, Hkv=2, L=45, D=64, prefix=5), "float16",
                  configs=configs) == len(configs)


def test_packed_rows_conflict_on_the_k_transpose_read():
    """The control: packed rows of 128 halves (256 bytes) all start in bank 0, so the K^T read
    (a lane's element from row fn + c, column fm) puts 4 words in one bank."""
    t = _trace(PREFILL, dict(BQ=32, BK=32, load_width=1, pad=False), dict(B=1, Hq=1, Hkv=1, L=64, D=128))
    assert t.bank_conflicts > 0


def test_prefill_conflicts_are_only_the_wide_stagings():
    """load_width=4 stores four halves a lane one at a time: lanes 8 bytes apart, 2 words a bank,
    one extra pass per store. Hand count, D=64, L=64, BQ=BK=32, 128 threads: a tile is 2,048
    values, 4 passes of 512; each pass 4 stores to K and 4 to V per SIMD-group: 32 extra passes
    per SIMD-group, 128 per tile; query tile 0 stages 1 tile, query tile 1 two: 384."""
    t = _trace(PREFILL, dict(BQ=32, BK=32, load_width=4), dict(B=1, Hq=1, Hkv=1, L=64, D=64))
    assert t.bank_conflicts == 384


@pytest.mark.parametrize("BK", [32, 64])
def test_qmm_conflicts_are_only_its_stagings(BK):
    """qmm stages x 8 halves a lane (16 bytes: 4 lanes a 32-value row, rows 80 bytes apart) and
    dequantises a packed word's 8 values a lane into a weight row (rows 80 bytes apart); its
    fragment reads are padded. Hand count, M=N=64, K=256, BM=BN=BK=32, 2 x 2 SIMD-groups (4
    threadgroups, 8 K steps each): x stores: a SIMD-group's 8 rows start at banks 0, 20, 8, 28,
    16, 4, 24, 12 and its 4 lanes a row 4 words apart: 4 words in each of 8 banks, 3 extra passes
    per store, 8 stores per lane per step, 4 SIMD-groups: 96 a step. Weights: 32 rows of 4 words
    (one SIMD-group), 32 stores a lane, each 32 rows 20 words apart: banks multiples of 4, 4 rows
    each: 3 extra passes: 96 a step. (96 + 96) x 8 steps x 4 threadgroups = 6,144: the fragment
    reads add none. BK=64 (rows 144 bytes, 36 words: 8 lanes a row, banks 4(r + k) mod 32): 2 x 8
    x stores a lane and 2 SIMD-groups of weight rows, each store 4 words a bank: (192 + 192) x 4
    steps x 4 threadgroups: 6,144 again."""
    qmm = family("qmm")
    t = _trace(qmm, dict(BM=32, BN=32, BK=BK, WM=2, WN=2), dict(M=64, N=64, K=256, bits=4, group_size=64))
    assert t.matrix_multiplies > 0
    assert t.bank_conflicts == 6144


def test_chunked_and_packed_paths_run_clean_in_checked_mode(monkeypatch):
    """Bounds and races checked: the two barriers around each K and V chunk (one buffer shared by
    both), the packed heads' Q tile rows and the swizzled fp32 rows."""
    monkeypatch.setenv("METALFORGE_EMULATOR_CHECKED", "1")
    shape = dict(B=1, Hq=4, Hkv=1, L=37, D=128, prefix=5)
    configs = _configs(dict(BK=64, d_block=32), dict(heads=4, d_block=64, score_type="half"),
                       dict(stage="float", d_block=32, load_width=2))
    assert verify("prefill_attention", shape, "float16", configs=configs) == 3


def test_checked_mode_finds_a_missing_chunk_barrier():
    """Without the barrier before a V chunk is staged, the chunk overwrites the buffer while other
    SIMD-groups still read the previous K or V chunk from it: checked mode names the race."""
    shape = PREFILL.shape(dict(B=1, Hq=1, Hkv=1, L=40, D=64))
    launch = PREFILL.launches(PREFILL.config(dict(BQ=16, BK=16, simdgroups=2, d_block=32)), shape, "float16")[0]
    source = launch.kernel.source
    marker = "    threadgroup_barrier(mem_flags::mem_threadgroup);\n"
    last_loop = source.rindex("  for (int d0 = 0; d0 < D; d0 += DC) {\n")   # the V chunks' loop
    assert source[last_loop:].count(marker) == 2 and "values" in source[last_loop:]
    broken = source[:last_loop] + source[last_loop:].replace(marker, "", 1)
    inputs = {**PREFILL.make_inputs(shape, "float16"), "lengths": mx.array(launch.lengths, dtype=mx.int32)}
    kernel = emulator.metal_kernel(name="prefill_missing_chunk_barrier", input_names=list(launch.kernel.input_names),
                                   output_names=["out"], source=broken, checked=True)
    with pytest.raises(EmulatorError, match="threadgroup memory race on kv_tile"):
        kernel(inputs=[inputs[n] for n in launch.kernel.input_names], output_shapes=list(launch.output_shapes),
               output_dtypes=list(launch.output_dtypes), grid=launch.grid, threadgroup=launch.threadgroup)
