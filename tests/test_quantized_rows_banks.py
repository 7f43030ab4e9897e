"""quantized_rows.j2's threadgroup memory (qmv, gather_qmv, gate_up, norm_qkv) without bank
conflicts, as the emulator's trace counts them from real runs: staged x at every values_per_lane
(the layout once read lane l's V values at words l*V.., 32 lanes V words apart: a V-way conflict
on every staged read, 32-way at the config shipped for N=14336), the K splits' partial sums and
norm_qkv's head rows with k_split > 1; the analytic count (kernels/qmv.py) follows the layout."""
import pytest

from metalforge.kernels import dtypes, trace_report
from metalforge.kernels.families import get as family
from metalforge.kernels.qmv import staged_word
from metalforge.kernels.work import passes

from test_families_emulated import verify

F16 = dtypes.get("float16")


def traced(name, config, shape):
    fam = family(name)
    config, shape = fam.config(config), fam.shape(shape)
    return fam, config, shape, [d.trace for d in trace_report.ours(fam, config, shape, F16,
                                                                    fam.make_inputs(shape, F16, 0))]


@pytest.mark.parametrize("V", [1, 2, 4, 8, 16, 32, 64])
def test_the_staged_layout_gives_each_lane_its_own_bank(V):
    """The layout alone (kernels/qmv.py mirrors the template): reads (32 lanes at one v) and
    stores (32 consecutive values) pass over the banks once, and every word is used once. The
    unswizzled layout's reads take V passes (up to 32), hand-checked: word l*V + v is in bank
    (l*V + v) % 32."""
    step = 32 * V
    assert sorted(staged_word(i, V) for i in range(step)) == list(range(step))
    for v in range(V):
        assert passes(tuple(4 * staged_word(l * V + v, V) for l in range(32))) == 1
        assert passes(tuple(4 * (l * V + v) for l in range(32))) == min(V, 32)
    for first in range(0, step, 32):
        assert passes(tuple(4 * staged_word(i, V) for i in range(first, first + 32))) == 1


@pytest.mark.parametrize("config, shape", [
    ({"values_per_lane": 8}, "M=1,N=64,K=1024"),
    ({"values_per_lane": 16}, "M=2,N=64,K=1024"),
    ({"values_per_lane": 32}, "M=1,N=64,K=1024"),
    ({"values_per_lane": 16, "k_split": 2, "rows_per_simdgroup": 8}, "M=4,N=64,K=2048"),
    ({"values_per_lane": 8, "simdgroups": 4, "rows_per_simdgroup": 1}, "M=2,N=24,K=320,bits=3,group_size=32"),
])
def test_staged_x_has_no_bank_conflict(config, shape):
    fam, config, shape, (t,) = traced("qmv", {**config, "stage_x": True}, shape)
    assert t.bank_conflicts == 0
    if config["k_split"] == 1:   # the count prices what the trace sees (k_split > 1: tests/test_work.py)
        counted, = fam.work(config, shape, F16)
        assert counted.features["threadgroup_passes"] == t.threadgroup_instructions


def test_the_config_shipped_for_n_14336_stages_x_without_conflicts():
    """m3-max-40's qmv config for the 8B-class up projection before the fix (31 extra passes on
    each of a SIMD-group's 32 staged reads a step); now none, counted and traced."""
    config = {"simdgroups": 8, "rows_per_simdgroup": 8, "values_per_lane": 32, "stage_x": True, "k_split": 1,
              "load_width": 4, "prescaled_x": False}
    fam, config, shape, (t,) = traced("qmv", config, "M=1,N=14336,K=4096")
    assert t.bank_conflicts == 0
    counted, = fam.work(config, shape, F16)
    assert counted.features["threadgroup_passes"] == t.threadgroup_instructions


@pytest.mark.parametrize("name, shape", [
    ("gather_qmv", "M=2,N=64,K=2048,experts=4,top_k=2"),
    ("gate_up", "M=3,N=64,K=2048"),
    ("norm_qkv", "M=3,K=2048,Hq=2,Hkv=1,D=64"),
])
@pytest.mark.parametrize("k_split", [1, 2])
def test_every_family_on_the_template_stages_x_without_conflicts(name, shape, k_split):
    config = {"values_per_lane": 32, "stage_x": True, "k_split": k_split, "simdgroups": 2, "rows_per_simdgroup": 4}
    *_, traces = traced(name, config, shape)
    assert [t.bank_conflicts for t in traces] == [0] * len(traces)


@pytest.mark.parametrize("M, R", [(4, 8), (8, 4), (3, 2)])
@pytest.mark.parametrize("name", ["qmv", "gate_up"])
def test_k_split_partial_sums_have_no_bank_conflict(name, M, R):
    """gate_up keeps two matrices' sums and the norm's squares a row: stored row by row (m*A + a,
    A = 2R + 1) the first split's lanes read runs of R words 2R + 1 apart, which wrap onto banks
    already read once they span more than 32 words; stored matrix by matrix they read consecutive words."""
    config = {"values_per_lane": 8, "k_split": 2, "rows_per_simdgroup": R, "simdgroups": 2}
    *_, (t,) = traced(name, config, f"M={M},N=64,K=2048")
    assert t.bank_conflicts == 0


@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("R", [1, 4, 8])
def test_norm_qkv_head_rows_with_k_splits_have_no_bank_conflict(D, R):
    """With k_split > 1 lane i stores hv row i / R, value i % R: rows D words apart (D a multiple
    of 32) put every row's r in one bank, an M-way conflict (672 extra passes at D=96, R=4, M=8);
    rows padded to start R banks apart meet distinct banks."""
    config = {"values_per_lane": 8, "k_split": 2, "rows_per_simdgroup": R, "simdgroups": 2}
    *_, (t,) = traced("norm_qkv", config, f"M=8,K=2048,Hq=2,Hkv=1,D={D}")
    assert t.bank_conflicts == 0


@pytest.mark.parametrize("rope_dims, traditional", [(0, 0), (32, 1)])
def test_padded_head_rows_match_the_unfused_composition(rope_dims, traditional):
    """hv rows padded (D=96, R=4: 100 words) under q/k norms, biases, partial and traditional RoPE."""
    shape = dict(M=3, K=2048, Hq=2, Hkv=1, D=96, bias=1, qk_norm=1, rope_dims=rope_dims, traditional=traditional)
    configs = [family("norm_qkv").config({"values_per_lane": 8, "k_split": ks, "rows_per_simdgroup": 4})
               for ks in (2, 4)]
    assert verify("norm_qkv", shape, "float16", configs=configs) == 2
