"""Family.work counts a config's work without running it: the counters the emulator's trace mode
fills from a real run of the same config (kernels/work.py), priced by the one per-kernel function."""
import numpy as np
import pytest

from metalforge import devices
from metalforge.kernels import dtypes, trace_report
from metalforge.kernels.families import get as family
from metalforge.kernels.timing import fit, model, traces

F16 = dtypes.get("float16")

# k_split > 1: lane 0 alone writes the partial sums, so the trace (which pairs each lane's n-th
# access) counts the epilogue's lane-0 accesses as instructions of their own; a GPU issues them
# with the other lanes. Those two counters are traced between 1x and 1.5x the count.
DIVERGENT = ("sector_bytes/y", "threadgroup_passes")

QMV = [
    ("M=1,N=64,K=512", {}),
    ("M=1,N=70,K=512,bits=8", {"load_width": 4, "prescaled_x": True}),                       # N's tail
    ("M=2,N=24,K=320,bits=4,group_size=32", {"stage_x": True, "values_per_lane": 8, "simdgroups": 4,
                                              "rows_per_simdgroup": 1}),                   # K's tail, staged x
    ("M=3,N=40,K=768", {"stage_x": True, "k_split": 2, "rows_per_simdgroup": 2}),
    ("M=2,N=40,K=640,bits=3,group_size=32", {"values_per_lane": 8, "k_split": 4}),           # straddling bytes
    ("M=1,N=48,K=384,bits=6,group_size=128", {"values_per_lane": 32, "simdgroups": 1}),
    ("M=1,N=128,K=2048", {"simdgroups": 8, "rows_per_simdgroup": 8, "values_per_lane": 32, "stage_x": True,
                          "load_width": 4}),                                               # swizzled staging at V=32
]


def traced(fam, config, shape):
    return [traces.features(d) for d in trace_report.ours(fam, config, shape, F16, fam.make_inputs(shape, F16, 0))]


def assert_same_work(counted, traced_, divergent=(), most=1.5):
    assert len(counted) == len(traced_)
    for c, t in zip(counted, traced_):
        assert (c.threadgroup, c.threadgroup_memory_bytes) == (t.threadgroup, t.threadgroup_memory_bytes)
        assert set(c.features) == set(t.features)
        for name, value in t.features.items():
            if name in divergent:
                assert c.features[name] / most <= value <= most * c.features[name], name
            else:
                assert c.features[name] == value, name


@pytest.mark.parametrize("shape, config", QMV)
def test_qmv_work_is_the_traced_work(shape, config):
    fam = family("qmv")
    config, shape = fam.config(config), fam.shape(shape)
    assert_same_work(fam.work(config, shape, F16), traced(fam, config, shape),
                     DIVERGENT if config["k_split"] > 1 else ())


# After a lane-0 store (each SIMD-group's max and sum) or a lane-group-0 store (its output) the
# trace pairs diverged lanes into instructions of their own; a GPU issues them together. So the
# merge's counters (threadgroup passes, the output's and partials' sectors, the sink's) are traced
# between 1x and 3x the count; everything before the merge (K/V, the block table, queries) is exact.
MERGED = ("threadgroup_passes", "sector_bytes/out", "sector_bytes/partial_out", "sector_bytes/partial_max",
          "sector_bytes/partial_sum", "sector_bytes/sinks")
DECODE = [
    ("B=1,Hq=4,Hkv=2,S=64,D=64", {"threads": 64}),
    ("B=1,Hq=4,Hkv=2,S=64,D=64,block_size=16", {"threads": 64, "splits": 2, "keys_per_simdgroup": 2, "load_width": 2}),
    ("B=2,Hq=4,Hkv=1,S=48,D=128,L=2,window=20", {"threads": 32, "keys_per_step": 2, "prefetch": True,
                                                "share_kv": False}),
    ("B=1,Hq=2,Hkv=1,S=64,D=64,sinks=1,softcap=1", {"threads": 64, "keys_per_simdgroup": 4, "load_width": 4}),
    ("B=1,Hq=8,Hkv=2,S=100,D=96,L=3,sinks=1", {"threads": 128, "splits": 4, "load_width": 4}),
    ("B=1,Hq=2,Hkv=1,S=75,D=64,kv_bits=4,kv_group_size=32,block_size=8", {"threads": 64, "keys_per_simdgroup": 4,
                                                                        "keys_per_step": 2}),
]


@pytest.mark.parametrize("shape, config", DECODE)
def test_decode_attention_work_is_the_traced_work(shape, config):
    """One sequence (the pool's others have random lengths; the count assumes full ones)."""
    fam = family("decode_attention")
    config, shape = fam.config(config), fam.shape(shape)
    assert_same_work(fam.work(config, shape, F16), traced(fam, config, shape), MERGED, most=3.0)


QMM = [
    ("M=32,N=64,K=128", {}, ()),
    ("M=32,N=40,K=256,bits=2,group_size=32", {"dequant": "registers", "BK": 16, "BM": 16, "BN": 16, "WM": 1, "WN": 2},
     ()),
    ("M=16,N=24,K=256,bits=8,group_size=64", {"stage": "float", "BK": 64, "BM": 16, "BN": 8, "WN": 1, "split_k": 4},
     ()),
    ("M=64,N=72,K=128,bits=4,group_size=128", {"BM": 64, "BN": 32, "BK": 128, "WM": 4, "operands": "input"}, ()),
    ("M=16,N=32,K=64,bits=4,group_size=32", {"dequant": "registers", "BM": 16, "BN": 32, "split_k": 2}, ()),
    # M's tail: the rows past M skip their loads, so the trace splits them from the rest of their
    # SIMD-group for every later instruction
    ("M=20,N=40,K=96,bits=4,group_size=32", {}, ("matrix_multiplies", "threadgroup_passes", "sector_bytes/y")),
]


@pytest.mark.parametrize("shape, config, divergent", QMM)
def test_qmm_work_is_the_traced_work(shape, config, divergent):
    fam = family("qmm")
    config, shape = fam.config(config), fam.shape(shape)
    assert_same_work(fam.work(config, shape, F16), traced(fam, config, shape), divergent, most=1.5)


def test_gather_qmv_work_is_the_traced_work_over_the_experts_it_picked():
    """The count assumes distinct experts per pair (a token's top-k are); the trace reads the
    experts the random indices name, so the experts' footprints scale by the share picked."""
    fam = family("gather_qmv")
    shape = fam.shape("M=2,N=40,K=256,experts=4,top_k=2")
    config = fam.config({"simdgroups": 1, "values_per_lane": 8})
    inputs = fam.make_inputs(shape, F16, 0)
    picked = len(np.unique(np.array(inputs["indices"])))
    counted, = fam.work(config, shape, F16)
    for name in ("w", "scales", "biases"):
        counted.features[f"dram_bytes/{name}"] = counted.features[f"dram_bytes/{name}"] * picked // shape.pairs
    assert_same_work([counted], traced(fam, config, shape))


def test_identical_work_gets_an_identical_price():
    """One function prices counted and traced work: equal counters, equal seconds, whoever wrote
    the kernel (the name is not priced); the tuner's figure is that price."""
    fam = family("qmv")
    config, shape = fam.config({}), fam.shape(QMV[0][0])
    device, constants = devices.get("m2-max"), fit.shipped()["constants"]
    counted, seen = fam.work(config, shape, F16), traced(fam, config, shape)
    renamed = [traces.Counted("someone_else", c.threadgroup, c.threadgroup_memory_bytes, c.features) for c in seen]
    assert model.price(counted, device, constants) == model.price(seen, device, constants) \
        == model.price(renamed, device, constants) == fam.modelled_seconds(config, shape, F16, device)


# Prefill at D=64 and 128, from the first query (no prefix: diagonal tiles, SIMD-groups idle on
# the last key tile) and after a cached prefix (tiles every row sees whole), through every
# tunable: tiles, GQA packing, head-dim chunks, half scores, Q in registers, double buffering,
# packed rows, fp32 staging (swizzled), load widths, a window and sinks; keys past a tile's last
# (LK not a multiple of BK) in whole 32 x load_width runs.
PREFILL = [
    ("B=1,Hq=2,Hkv=1,L=64,D=64", {}),
    ("B=1,Hq=2,Hkv=1,L=40,D=128,prefix=8", {"BQ": 16, "BK": 16, "simdgroups": 2}),
    ("B=2,Hq=4,Hkv=2,L=48,D=64,prefix=16", {"heads": 2, "d_block": 16, "load_width": 2}),
    ("B=1,Hq=2,Hkv=1,L=64,D=128", {"BK": 64, "d_block": 32, "score_type": "half", "q_source": "registers"}),
    ("B=1,Hq=4,Hkv=1,L=24,D=64,prefix=40", {"heads": 4, "double_buffer": True, "BK": 16}),
    ("B=1,Hq=2,Hkv=1,L=64,D=64,prefix=8,window=24,sinks=1", {"BQ": 16, "BK": 16, "simdgroups": 2}),
    ("B=1,Hq=2,Hkv=1,L=64,D=64", {"pad": False, "stage": "float", "BQ": 64}),
    ("B=1,Hq=1,Hkv=1,L=56,D=128", {"stage": "float", "BQ": 8, "BK": 16, "simdgroups": 1, "q_source": "registers"}),
    ("B=1,Hq=2,Hkv=1,L=45,D=64,prefix=3", {}),                                   # query tail; 48 keys
    ("B=1,Hq=2,Hkv=1,L=65,D=128,prefix=3,window=24,sinks=1", {"BK": 16, "d_block": 32}),
    ("B=1,Hq=1,Hkv=1,L=1,D=128,prefix=20", {"BQ": 8, "BK": 8, "simdgroups": 1}),  # one token
    ("B=1,Hq=8,Hkv=1,L=24,D=128,prefix=8", {"heads": 8, "BQ": 64, "simdgroups": 8, "d_block": 64, "BK": 128,
                                           "load_width": 1, "q_source": "registers"}),
    ("B=2,Hq=2,Hkv=2,L=136,D=64", {"BQ": 128, "BK": 8, "load_width": 1}),
]


@pytest.mark.parametrize("shape, config", PREFILL)
def test_prefill_attention_work_is_the_traced_work(shape, config):
    fam = family("prefill_attention")
    config, shape = fam.config(config), fam.shape(shape)
    assert_same_work(fam.work(config, shape, F16), traced(fam, config, shape))


def test_prefill_work_where_lanes_straddle_the_last_key():
    """42 keys staged 4 values a lane in chunks of 32 columns: one instruction's lanes are half
    past the last key, and skip their loads; the trace pairs the rest of their stores apart from
    the others' (a GPU issues them together). Those passes are traced within 1.1x the count;
    everything else is exact."""
    fam = family("prefill_attention")
    config, shape = fam.config({"BK": 64, "d_block": 32, "load_width": 4}), fam.shape("B=1,Hq=2,Hkv=1,L=37,D=128,prefix=5")
    assert_same_work(fam.work(config, shape, F16), traced(fam, config, shape), ("threadgroup_passes",), most=1.1)


def test_every_family_counts_its_work():
    """No family is priced any other way (the old analytic `cost` is gone): each counts its work."""
    from metalforge.kernels.families import FAMILIES
    from metalforge.kernels.family import Family
    assert [name for name, fam in FAMILIES.items() if type(fam).work is Family.work] == []
    assert not hasattr(Family, "cost")


@pytest.mark.parametrize("config", [
    {"BM": 32, "BN": 64, "BK": 128, "WM": 1, "WN": 1, "dequant": "registers", "operands": "input"},
    {"BM": 64, "BN": 64, "BK": 64, "split_k": 2},
])
def test_qmm_traces_scaled_to_a_model_shape_price_what_its_work_counts(config):
    """`metalforge compare` prices our config from traces at proxy shapes scaled to the real one;
    the tuner from the counted work. At an 8B prompt's shape they agree: the proxies hold whole
    64-row tiles (traced over 32 rows, one half-empty tile scaled 32x) and rows of scales a
    sector long (at K = 256 the scales' sectors scaled to 0 at K = 4096)."""
    from metalforge.kernels.timing import compare
    fam = family("qmm")
    config, shape = fam.config(config), fam.shape("M=512,N=4096,K=4096,bits=4,group_size=64")
    device, constants = devices.get("m3-max-40"), fit.shipped()["constants"]
    scaled = compare.ours_counted(fam, config, shape, F16, device)
    assert model.price(scaled, device, constants) == pytest.approx(fam.modelled_seconds(config, shape, F16, device),
                                                                   rel=1e-9)
