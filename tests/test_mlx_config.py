"""Family.mlx_config: our config that tiles a job as MLX's real kernel does, by MLX's own dispatch
rules, for the shapes the shipped files tune (the built-in model and an 8B one over the issue's
range) on the four profiles issue 22 is judged on; and the tuner trying it and never shipping
anything priced slower (real Optuna storage, the real per-kernel model)."""
from __future__ import annotations

import re

import optuna
import pytest

from metalforge import devices
from metalforge.kernels import checks, mlx_dispatch
from metalforge.kernels.families import FAMILIES, get as get_family
from metalforge.kernels.timing import mlx_jobs
from metalforge.tuner import defaults, shapes, study
from metalforge.tuner.settings import Settings
from metalforge.tuner.timers import ModelTimer

PROFILES = ("m1", "m2-max", "m3-max-40", "m4-pro")
DTYPE = "float16"


def _targets(family: str):
    return [t for t in defaults.model_targets(shapes.model_families()) if t.family.name == family]


def _mlx(target, device):
    (op, sizes), = target.family.mlx_jobs(target.shape.__dict__)
    return mlx_jobs.choose(op, sizes, DTYPE, device)


def _threadgroups(fam, config, target) -> tuple[int, int]:
    """(threads a threadgroup, threadgroups) of our config's first launch."""
    g = fam.geometry(config, target.shape, DTYPE)[0]
    return g.threads, g.threadgroups


def _valid(fam, config, target, device):
    assert config is not None, (device, target.bucket)
    assert not checks.check(fam, config, target.shape, DTYPE, device), (device, target.bucket, config)


@pytest.mark.parametrize("device", PROFILES)
def test_qmv_mirrors_mlx_qmv_fast(device):
    """MLX's qmv_fast (qmv where K is not whole 512-value blocks, the built-in's 896): 2 SIMD-groups
    x 4 rows (`_r_4` in its name), 64 threads, N/8 threadgroups a row of x; 16 values a lane at 4
    bits; x prescaled."""
    fam = get_family("qmv")
    for target in _targets("qmv"):
        launch = _mlx(target, device).launches[0]
        config = fam.mlx_config(target.shape, DTYPE, device)
        _valid(fam, config, target, device)
        assert launch.function == ("affine_qmv_fast" if target.shape.K % 512 == 0 else "affine_qmv")
        assert launch.kernel.endswith("_r_4")
        assert config["rows_per_simdgroup"] == 4 and config["values_per_lane"] == 16 and config["prescaled_x"]
        assert _threadgroups(fam, config, target) == (64, target.shape.N // 8)
        assert (launch.threadgroup[0] * launch.threadgroup[1], launch.grid[0] * launch.grid[1]) == (64, target.shape.N // 8)


def test_qmv_has_no_mirror_where_mlx_runs_another_kernel():
    """qmv_wide (2 rows on an M3: lanes split across K) and qmv_quad (K = 128: 4 lanes a row)."""
    fam = get_family("qmv")
    wide = fam.shape(dict(M=2, N=4096, K=4096))
    assert mlx_dispatch.qmm_dispatch(2, 4096, 4096, 4, 64, DTYPE, "m3-max-40").launches[0].function == "affine_qmv_wide"
    assert fam.mlx_config(wide, DTYPE, "m3-max-40") is None
    assert fam.mlx_config(wide, DTYPE, "m1") is not None, "M1 runs qmv_fast for 2 rows"
    quad = fam.shape(dict(M=1, N=4096, K=128))
    assert fam.mlx_config(quad, DTYPE, "m1") is None


@pytest.mark.parametrize("device", PROFILES)
def test_qmm_mirrors_mlx_qmm_t_and_its_split_k(device):
    """32 x 32 tiles of 2 x 2 SIMD-groups (128 threads), as many threadgroups as MLX's grid, and
    qmm_splitk's partitions as split_k where MLX splits K (the 8B's 1,024-wide k/v projection at
    128 rows: 4 x 32 tiles, split 4 ways toward 512 threadgroups)."""
    fam = get_family("qmm")
    split = 0
    for target in _targets("qmm"):
        choice = _mlx(target, device)
        config = fam.mlx_config(target.shape, DTYPE, device)
        main = choice.launches[0]
        if main.grid[2] not in fam.param("split_k").domain:   # the built-in's k/v projection: 14 partitions of 896
            assert config is None and "splitk" in main.kernel
            continue
        _valid(fam, config, target, device)
        assert ("splitk" in main.kernel) == (config["split_k"] > 1)
        assert _threadgroups(fam, config, target) == (128, main.grid[0] * main.grid[1] * main.grid[2])
        assert (config["BM"], config["BN"], config["BK"]) == (32, 32, 32)
        split += config["split_k"] > 1
    assert split, "some of the models' prompts split K"
    kv = fam.shape(dict(M=128, N=1024, K=4096))
    assert fam.mlx_config(kv, DTYPE, device)["split_k"] == 4


def test_qmm_has_no_mirror_on_m5():
    """MLX runs its NAX qmm on M5 (not ported)."""
    fam = get_family("qmm")
    assert fam.mlx_config(fam.shape(dict(M=512, N=4096, K=4096)), DTYPE, "m5") is None


@pytest.mark.parametrize("device", PROFILES)
def test_decode_attention_mirrors_sdpa_vector_and_its_two_passes(device):
    """One query token: sdpa_vector's 1,024 threads a query head (B x Hq threadgroups), or 2-pass
    pass 1's threadgroup a KV head and block (blocks = splits); D/32 = 4 elements a lane at D=128.
    Verify passes (4 tokens) have none: 32 SIMD-groups' merge states of 4 tokens pass 32 KB."""
    fam = get_family("decode_attention")
    passes = set()
    for target in _targets("decode_attention"):
        s = target.shape
        config = fam.mlx_config(s, DTYPE, device)
        if s.L > 1:
            assert config is None
            continue
        _valid(fam, config, target, device)
        launches = _mlx(target, device).launches
        passes.add(len(launches))
        assert config["keys_per_simdgroup"] == 1 and config["load_width"] == min(4, s.D // 32)
        if len(launches) == 1:
            assert launches[0].kernel.startswith("sdpa_vector_float16")
            assert _threadgroups(fam, config, target) == (1024, s.B * s.Hq) and config["splits"] == 1
        else:
            first = launches[0]
            assert first.kernel.startswith("sdpa_vector_2pass_1") and config["splits"] == first.grid[2]
            assert _threadgroups(fam, config, target)[1] == first.grid[0] * first.grid[1] * first.grid[2]
            assert config["share_kv"] and config["keys_per_step"] == 4      # 0.32.4's TK
    assert passes == {1, 2}, "the contexts 512..32k reach MLX's 2-pass on every profile"


def test_decode_attention_has_no_mirror_where_mlx_runs_no_fused_kernel():
    fam = get_family("decode_attention")
    base = dict(B=1, Hq=32, Hkv=8, S=4096, D=128)
    assert fam.mlx_config(fam.shape(dict(base, softcap=1)), DTYPE, "m1") is None
    assert fam.mlx_config(fam.shape(dict(base, kv_bits=8)), DTYPE, "m1") is None
    assert fam.mlx_config(fam.shape(dict(base, D=80)), DTYPE, "m1") is None


@pytest.mark.parametrize("device", PROFILES)
def test_prefill_attention_mirrors_steel_attention(device):
    """steel_attention's name carries its tile: bq32_bk32 at D=64, bq32_bk16 at D=128, wm4_wn1."""
    fam = get_family("prefill_attention")
    for target in _targets("prefill_attention"):
        config = fam.mlx_config(target.shape, DTYPE, device)
        _valid(fam, config, target, device)
        launch = _mlx(target, device).launches[0]
        bq, bk, wm, wn = map(int, re.search(r"_bq(\d+)_bk(\d+)_.*_wm(\d+)_wn(\d+)_", launch.kernel).groups())
        assert (config["BQ"], config["BK"], config["simdgroups"]) == (bq, bk, wm * wn)
        assert (bq, bk) == (32, 32 if target.shape.D < 128 else 16)
        assert _threadgroups(fam, config, target) == (32 * wm * wn, launch.grid[0] * launch.grid[1] * launch.grid[2])


def test_fused_and_unported_families_have_no_mirror():
    """gate_up and norm_qkv (MLX runs their job as several kernels) and gather_qmv (not ported)."""
    for target in _targets("gate_up") + _targets("norm_qkv"):
        assert target.family.mlx_config(target.shape, DTYPE, "m1") is None
    gather = FAMILIES["gather_qmv"]
    assert gather.mlx_config(gather.shape(dict(M=1, N=512, K=512, experts=8, top_k=2)), DTYPE, "m1") is None


PREFILL_512 = shapes.Target("prefill_attention", dict(B=1, Hq=14, Hkv=2, L=512, D=64), DTYPE)


def test_warm_start_queues_mlx_configuration_and_the_entry_is_never_priced_slower(tmp_path):
    """A new study (SQLite storage) starts with the default and MLX's configuration; its entry is
    priced no slower than MLX's configuration by the per-kernel model."""
    from metalforge.kernels.timing.compare import priced_entry
    target = shapes.Target("decode_attention", dict(B=1, Hq=14, Hkv=2, S=512, D=64, block_size=16), DTYPE)
    device = "m3-max-40"
    mlx = target.family.mlx_config(target.shape, DTYPE, device)
    assert mlx != target.family.default_config(), "sdpa_vector's 1,024 threads a query head"
    settings = Settings(device=device, trials=4, storage=f"sqlite:///{tmp_path / 's.db'}", timer=ModelTimer(),
                        seed=0, verify=False)
    s = study.run_study(target, settings)
    first = [t.params for t in sorted(s.get_trials(), key=lambda t: t.number)[:3]]
    assert mlx in first and target.family.default_config() in first
    e = study.entry(s, target, device)
    theirs = priced_entry(target.family, target.shape, DTYPE, devices.get(device), {**e, "config": mlx})
    assert e["time_s"] <= theirs["time_s"]


def test_a_winner_priced_slower_than_mlx_configuration_is_replaced_by_it(tmp_path):
    """The search ranks by Family.modelled_seconds, the entry by traces: a study whose only trial
    is a poor config (8-row query tiles, 8-key tiles, one SIMD-group) ships MLX's configuration."""
    target, device = PREFILL_512, "m3-max-40"
    poor = {**target.family.default_config(), "BQ": 8, "BK": 8, "simdgroups": 1}
    settings = Settings(device=device, trials=1, storage="memory", timer=ModelTimer(), seed=0, verify=False,
                        warm_start=False)
    s = study.open_study(target, settings)
    s.enqueue_trial(poor)
    study.run_study(target, settings, study=s)
    assert study.best_trial(s).params == poor
    e = study.entry(s, target, device)
    assert e["config"] == target.family.mlx_config(target.shape, DTYPE, device) and e["speedup"] > 1.0


def test_the_shipped_buckets_cover_the_issues_range():
    """Both models, prompts 128..4,096 and contexts 512..32k in every power-of-two bucket, and
    the verify passes of 3 drafts (decode attention at 4 query tokens)."""
    targets = defaults.model_targets(shapes.model_families())
    prompts = {(t.shape.Hq, t.shape.L) for t in targets if t.family.name == "prefill_attention"}
    assert prompts == {(h, 2 ** i) for h in (14, 32) for i in range(7, 13)}
    rows = {t.shape.M for t in targets if t.family.name == "qmm"}
    assert rows == {2 ** i for i in range(7, 13)}
    decode = {(t.shape.Hq, t.shape.S, t.shape.L) for t in targets if t.family.name == "decode_attention"}
    assert decode == {(h, 2 ** i, L) for h in (14, 32) for i in range(9, 16) for L in (1, 4)}


@pytest.mark.parametrize("device", PROFILES)
def test_the_shipped_files_hold_every_bucket_of_the_issues_range(device):
    """The four done-when profiles' files were regenerated over defaults.model_targets."""
    from metalforge import results
    held = results.load(results.shipped_path(device))["entries"]
    missing = [(t.family.name, t.bucket) for t in defaults.model_targets(shapes.model_families())
               if t.bucket not in held.get(t.family.name, {})]
    assert not missing, missing[:5]
