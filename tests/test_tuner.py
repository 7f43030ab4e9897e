"""The autotuner with real Optuna storage on disk, ModelTimer and emulator verification."""
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from metalforge.kernels import check
from metalforge.kernels import get_family as family
from metalforge.kernels.families import FAMILIES
from metalforge.kernels.qmv import Qmv
from metalforge import devices, results
from metalforge.testing import write_model
from metalforge.errors import MetalforgeError
from metalforge.tuner import sampler, shapes, study as st
from metalforge.tuner.timers import ModelTimer, Timing

SMALL = {"qmv": [dict(M=1, N=96, K=256, bits=4, group_size=64)],
         "decode_attention": [dict(B=1, Hq=4, Hkv=2, S=100, D=64)],
         "prefill_attention": [dict(B=1, Hq=2, Hkv=1, L=40, D=64)]}


@pytest.fixture(autouse=True)
def _results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("METALFORGE_RESULTS", str(tmp_path / "results"))


def tune_cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "metalforge.cli", "tune", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, **kw)


def cold_cache(tmp_path) -> dict:
    """An empty emulator cache: every trial compiles (about a second), so runs that must be
    interrupted, or shared by workers, cannot finish before that happens."""
    return {"METALFORGE_CACHE": str(tmp_path / "cold-cache")}


def test_end_to_end_tune_writes_a_valid_results_file(tmp_path):
    spec = tmp_path / "shapes.yaml"
    spec.write_text(yaml.safe_dump(SMALL))
    out_file = tmp_path / "m2.yaml"
    run = tune_cli("--device", "m2", "--shapes", str(spec), "--trials", "6", "--seed", "1", "--results", str(out_file),
                   "--storage", f"sqlite:///{tmp_path / 'tune.db'}", "--plot")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "timer: model" in run.stdout and "MODELLED" in run.stdout
    data = results.load(out_file)
    assert set(data["entries"]) == {"qmv", "decode_attention", "prefill_attention"}
    for fam_name, buckets in data["entries"].items():
        (key, entry), = buckets.items()
        assert entry["timer"] == "model" and entry["time_s"] > 0 and entry["baseline_s"] > 0
        assert not check(fam_name, entry["config"], entry["shape"], "float16", "m2")
        assert entry["trials"]["complete"] >= 1
        choice = results.lookup("m2", fam_name, entry["shape"], "float16", results=out_file)
        assert choice.source == "exact" and choice.config == entry["config"]
    pngs = list((tmp_path / "results" / "plots").glob("*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size > 5000 for p in pngs)


def test_invalid_configs_never_reach_the_renderer_or_compiler(tmp_path, monkeypatch):
    from metalforge.kernels import render as render_module
    from metalforge.emulator import compiler
    rendered, built = [], []
    real_render, real_build = render_module.render, compiler.build
    monkeypatch.setattr(render_module, "render", lambda t, **v: rendered.append(v) or real_render(t, **v))
    monkeypatch.setattr("metalforge.kernels.family.render", render_module.render)
    monkeypatch.setattr(compiler, "build", lambda *a, **k: built.append(a[1]) or real_build(*a, **k))
    target = shapes.Target("prefill_attention", family("prefill_attention").shape(dict(B=1, Hq=2, Hkv=1, L=40, D=128)),
                           "float32")
    settings = st.Settings(device="m1", trials=16, storage=f"sqlite:///{tmp_path / 'p.db'}", sampler="random", seed=3,
                           timer=ModelTimer())
    study = st.run_study(target, settings)
    trials = study.get_trials(deepcopy=False)
    invalid = [t for t in trials if "invalid" in t.user_attrs]
    assert invalid and all(t.state == TrialState.PRUNED for t in invalid)
    assert all(t.constraints["resources"] > 0 for t in invalid)
    assert any("Threadgroup memory size" in t.user_attrs["invalid"] for t in invalid)
    # (in float32 stage=input renders as stage=float and is refused as a config problem: compare
    # the float-staged ones, which render distinctly)
    rendered_configs = {(v["BQ"], v["BK"], v["SG"], v["DB"], v["QS"], v["W"], v["PAD"] > 0, v["DC"], v["SP"], v["HP"])
                        for v in rendered}
    fam = family("prefill_attention")
    invalid_configs = {tuple(t.params[n] for n in ("BQ", "BK", "simdgroups", "double_buffer", "q_source", "load_width",
                                                  "pad")) + (fam.columns(t.params, target.shape), t.params["score_type"],
                                                             t.params["heads"])
                       for t in invalid if t.params["stage"] == "float"}
    assert rendered_configs and invalid_configs and not (rendered_configs & invalid_configs)
    verified = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL) and "duplicate_of" not in t.user_attrs]
    # one render per verified config and its kernel (named by its content's hash) built; a kernel may
    # also be built in checked or traced mode (a trace the cache lacks), never another config's; MLX's
    # kernel is built too where its baseline's trace is not cached (a fresh cache: CI's)
    ours = [re.search(r"mf_prefill_attention_([0-9a-f]+)_", name) for name in built]
    kernels = {m.group(1) for m in ours if m}
    assert len(rendered) == len(kernels) == len(verified), "one render and one compiled kernel per verified config only"


class BrokenQmv(Qmv):
    """A qmv variant written for this test: rows_per_simdgroup=2 drops the bias term (a wrong
    answer) and rows_per_simdgroup=1 does not compile."""

    def launches(self, c, s, dtype):
        out = super().launches(c, s, dtype)
        if c["rows_per_simdgroup"] in (1, 2):
            k = out[0].kernel
            bad = ("acc[m][r] += s * dot;" if c["rows_per_simdgroup"] == 2 else "acc[m][r] += s * dot + undefined_bias;")
            src = k.source.replace("acc[m][r] += s * dot + b * xsum[m];", bad)
            out[0] = type(out[0])(type(k)(k.name + f"_broken{c['rows_per_simdgroup']}", k.input_names, k.output_names, src),
                                  *[getattr(out[0], f) for f in ("grid", "threadgroup", "output_shapes", "output_dtypes")])
        return out


def test_a_wrong_kernel_variant_fails_its_trials_and_tuning_continues(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "qmv", BrokenQmv())
    target = shapes.Target("qmv", family("qmv").shape(dict(M=1, N=64, K=256)), "float16")
    settings = st.Settings(device="m3", trials=20, storage=f"sqlite:///{tmp_path / 'b.db'}", sampler="grid", seed=0,
                           timer=ModelTimer())
    study = st.run_study(target, settings)
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    wrong = [t for t in failed if t.params["rows_per_simdgroup"] == 2]
    uncompilable = [t for t in failed if t.params["rows_per_simdgroup"] == 1]
    assert wrong and all("differ from the reference" in t.user_attrs["error"] for t in wrong)
    assert uncompilable and all("failed to compile" in t.user_attrs["error"] for t in uncompilable)
    assert {t.params["rows_per_simdgroup"] for t in failed} <= {1, 2}
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    assert completed and all(t.params["rows_per_simdgroup"] in (4, 8) for t in completed)
    assert st.evaluated(study) == 20
    assert st.entry(study, target)["config"]["rows_per_simdgroup"] in (4, 8)


def _finished(storage_url, name):
    try:
        s = optuna.load_study(study_name=name, storage=storage_url)
    except KeyError:
        return []
    return [t for t in s.get_trials(deepcopy=False) if t.state in st.FINISHED]


def test_resume_after_kill_loses_no_trials(tmp_path):
    spec = tmp_path / "shapes.yaml"
    spec.write_text(yaml.safe_dump({"decode_attention": SMALL["decode_attention"]}))
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    target = shapes.targets(shapes.from_yaml(spec), None, "float16")[0]
    name = st.study_name("m4", target)
    args = ["--device", "m4", "--shapes", str(spec), "--trials", "14", "--storage", url, "--seed", "5",
            "--sampler", "random", "--results", str(tmp_path / "r.yaml")]
    env = cold_cache(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "metalforge.cli", "tune", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **env})
    deadline = time.time() + 240
    while len(_finished(url, name)) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.state, t.params, t.value) for t in _finished(url, name)}
    assert 4 <= len(before) and proc.returncode == -signal.SIGKILL, "the run must be killed midway"
    again = tune_cli(*args, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    finished = _finished(url, name)
    after = {t.number: (t.state, t.params, t.value) for t in finished}
    assert all(after[n] == v for n, v in before.items()), "finished trials survive the kill unchanged"
    resumed = optuna.load_study(study_name=name, storage=url)
    assert st.evaluated(resumed) == 14, "the budget counts evaluated configs, not the killed trial"
    assert not resumed.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), "the killed trial was recovered"
    killed = [t for t in finished if st.interrupted(t)]
    for t in killed:
        retry = [r for r in finished if r.system_attrs.get("failed_trial") == t.number]
        assert len(retry) == 1 and t.params.items() <= retry[0].params.items(), "the killed trial's config ran again, once"
    assert results.load(tmp_path / "r.yaml")["entries"]["decode_attention"]


def test_two_workers_share_a_study_without_running_a_config_twice(tmp_path):
    spec = tmp_path / "shapes.yaml"
    spec.write_text(yaml.safe_dump({"qmv": SMALL["qmv"]}))
    url = f"sqlite:///{tmp_path / 'workers.db'}"
    run = tune_cli("--device", "m1-max", "--shapes", str(spec), "--trials", "24", "--storage", url, "--workers", "2",
                   "--sampler", "tpe", "--seed", "2", "--results", str(tmp_path / "w.yaml"), env=cold_cache(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    target = shapes.targets(shapes.from_yaml(spec), None, "float16")[0]
    trials = optuna.load_study(study_name=st.study_name("m1-max", target), storage=url).get_trials()
    ran = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL) and "duplicate_of" not in t.user_attrs]
    keys = [st.config_key(t.params) for t in ran]
    assert len(keys) == len(set(keys)), "no config was run twice"
    assert len({t.user_attrs["worker"] for t in ran if "worker" in t.user_attrs}) == 2, "both workers ran trials"
    assert len([t for t in trials if t.state in st.FINISHED and "duplicate_of" not in t.user_attrs]) >= 24


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")   # ask/tell drive the trials here
def test_a_killed_trials_retry_runs_even_when_a_repeat_was_pruned_while_it_ran(tmp_path):
    """Two workers seeding one new study both queue the default config: the second copy is pruned
    as a repeat of the first while it runs. When the first is killed, its retry must run the
    config, not repeat the pruned repeat (which left the config never evaluated)."""
    target = shapes.Target("qmv", family("qmv").shape(SMALL["qmv"][0]), "float16")
    settings = st.Settings(device="m3-pro", storage=f"sqlite:///{tmp_path / 'r.db'}", verify=False, warm_start=False)
    study = st.open_study(target, settings)
    objective = st.Objective(target, settings, study)
    config = target.family.default_config()
    study.enqueue_trial(config)
    study.enqueue_trial(config)
    first, second = study.ask(), study.ask()
    objective.suggest(first)
    with pytest.raises(optuna.TrialPruned, match="still running"):
        objective(second)
    study.tell(second, state=TrialState.PRUNED)
    study.tell(first, state=TrialState.FAIL)          # killed: failed without an error of its config
    assert st.recover_interrupted(study) == 1
    retry = study.ask()
    assert study._storage.get_trial(retry._trial_id).system_attrs["failed_trial"] == first.number
    value = objective(retry)
    assert value == pytest.approx(ModelTimer().time(None, family=target.family, config=config, shape=target.shape,
                                                    dtype="float16", device="m3-pro").seconds)
    assert "duplicate_of" not in study._storage.get_trial(retry._trial_id).user_attrs


def test_the_budget_counts_evaluated_configs_and_the_sampler_starts_on_evaluated_ones(tmp_path):
    """On M1 most of prefill attention's float32 space is over the threadgroup limit: those
    proposals are pruned in microseconds and count neither towards --trials nor towards the
    sampler's random start, which matches random search with the same seed."""
    target = shapes.Target("prefill_attention", family("prefill_attention").shape(dict(B=1, Hq=2, Hkv=1, L=64, D=128)),
                           "float32")
    runs = {}
    for kind in ("auto", "random"):
        settings = st.Settings(device="m1", trials=12, storage="memory", sampler=kind, seed=5, verify=False,
                               warm_start=False, timer=ModelTimer())
        study = st.run_study(target, settings)
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        runs[kind] = trials
        assert st.evaluated(study) == 12
        assert sum("invalid" in t.user_attrs for t in trials) > 12, "most proposals were over the limit"
    # the random start lasts until STARTUP configs were evaluated (not proposals) and equals random search
    last = [t.number for t in runs["random"] if t.state == TrialState.COMPLETE][sampler.STARTUP - 1]
    first = [t.params for t in runs["auto"][:last + 1]]
    assert first == [t.params for t in runs["random"][:last + 1]]


class DriftingTimer:
    """A measuring timer whose machine slows down by half after its 8th call and recovers after
    one cooldown, like a laptop that throttles and cools."""

    kind = "metal"

    def __init__(self):
        self.calls = 0
        self.model = ModelTimer()

    def factor(self):
        return 1.5 if 8 <= self.calls < 14 else 1.0

    def time(self, run, **kw):
        self.calls += 1
        return Timing(self.model.time(run, **kw).seconds * self.factor(), 0.01, self.kind, 5)

    def baseline(self, run, **kw):
        return Timing(self.model.baseline(run, **kw).seconds, 0.01, self.kind, 5)


def test_drift_discards_and_retimes_the_affected_trials(tmp_path):
    target = shapes.Target("decode_attention", family("decode_attention").shape(SMALL["decode_attention"][0]), "float16")
    timer = DriftingTimer()
    settings = st.Settings(device="m3-pro", trials=14, storage=f"sqlite:///{tmp_path / 'd.db'}", sampler="random",
                           seed=4, timer=timer, drift_every=3, drift_threshold=0.1, cooldown_s=0.0)
    study = st.run_study(target, settings)
    discarded = study.user_attrs.get("discarded", [])
    assert discarded, "the drift was noticed"
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    retimed = [t for t in trials.values() if "retime_of" in t.user_attrs]
    assert {t.user_attrs["retime_of"] for t in retimed} <= set(discarded)
    assert any(t.state == TrialState.COMPLETE for t in retimed), "discarded configs were measured again"
    for t in retimed:
        if t.state == TrialState.COMPLETE:
            assert t.params == trials[t.user_attrs["retime_of"]].params
    best = st.best_trial(study)
    assert best.number not in discarded
    model = ModelTimer()
    assert best.value == pytest.approx(model.time(None, family=family("decode_attention"), config=best.params,
                                                  shape=target.shape, dtype="float16", device="m3-pro").seconds)


def test_merge_rules_and_atomic_writes(tmp_path):
    path = tmp_path / "m1.yaml"
    shape = dict(M=1, N=64, K=256, bits=4, group_size=64)
    key = family("qmv").bucket_key(shape, "float16")
    base = {"shape": shape, "dtype": "float16", "baseline_s": 2e-5, "speedup": 1.0, "trials": {}}
    modelled_fast = {**base, "config": {"simdgroups": 2}, "time_s": 1e-5, "timer": "model"}
    measured_slow = {**base, "config": {"simdgroups": 4}, "time_s": 3e-5, "timer": "metal"}
    measured_slower = {**base, "config": {"simdgroups": 8}, "time_s": 4e-5, "timer": "metal"}
    measured_fast = {**base, "config": {"simdgroups": 1}, "time_s": 2.5e-5, "timer": "metal"}
    pick = lambda: results.load(path)["entries"]["qmv"][key]["config"]
    results.save_entries(path, "m1", [("qmv", key, modelled_fast)])
    assert pick() == {"simdgroups": 2}
    results.save_entries(path, "m1", [("qmv", key, measured_slow)])
    assert pick() == {"simdgroups": 4}, "a measured entry beats a modelled one, even a faster one"
    results.save_entries(path, "m1", [("qmv", key, modelled_fast)])
    assert pick() == {"simdgroups": 4}, "a modelled entry never replaces a measured one"
    results.save_entries(path, "m1", [("qmv", key, measured_slower)])
    assert pick() == {"simdgroups": 4}, "a slower entry never replaces a faster one"
    results.save_entries(path, "m1", [("qmv", key, measured_fast)])
    assert pick() == {"simdgroups": 1}
    saved = path.read_text()
    with pytest.raises(yaml.representer.RepresenterError):
        results.save_entries(path, "m1", [("qmv", key, {**measured_fast, "time_s": 1e-6, "trials": {"x": object()}})])
    assert path.read_text() == saved, "a failed write leaves the file as it was"
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"] == ["m1.yaml"], "no temporary files left behind"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d["entries"]["qmv"][next(iter(d["entries"]["qmv"]))].update(timer="guess"), "timer must be one of"),
    (lambda d: d["entries"]["qmv"][next(iter(d["entries"]["qmv"]))].update(time_s=-1), "time_s must be a positive"),
    (lambda d: d["entries"]["qmv"][next(iter(d["entries"]["qmv"]))]["config"].update(tile=3), "unknown parameter 'tile'"),
    (lambda d: d["entries"]["qmv"][next(iter(d["entries"]["qmv"]))].pop("config"), "missing 'config'"),
])
def test_results_are_validated_on_load_with_the_bad_entry_named(tmp_path, mutate, message):
    path = tmp_path / "m1.yaml"
    shape = dict(M=1, N=64, K=256, bits=4, group_size=64)
    key = family("qmv").bucket_key(shape, "float16")
    results.save_entries(path, "m1", [("qmv", key, {"shape": shape, "dtype": "float16", "config": {"simdgroups": 2},
                                                    "time_s": 1e-5, "timer": "model"})])
    data = yaml.safe_load(path.read_text())
    mutate(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MetalforgeError, match=message) as e:
        results.load(path)
    assert str(path) in str(e.value)


def test_corrupt_results_file_is_a_clear_error(tmp_path):
    path = tmp_path / "m1.yaml"
    path.write_text("entries: [unclosed")
    with pytest.raises(MetalforgeError, match="corrupt results file"):
        results.load(path)


def test_lookup_exact_nearest_default_and_validity(tmp_path):
    path = tmp_path / "r.yaml"
    decode = dict(B=1, Hq=8, Hkv=2, S=2048, D=128)
    entry = {"shape": decode, "dtype": "float16", "config": {"threads": 128, "splits": 16, "keys_per_step": 4,
                                                             "share_kv": True}, "time_s": 1e-5, "timer": "model"}
    results.save_entries(path, "m2", [("decode_attention", family("decode_attention").bucket_key(decode, "float16"), entry)])
    look = lambda **kw: results.lookup("m2", "decode_attention", dict(decode, **kw), "float16", results=path,
                                       shipped=False)
    exact = look(S=1500)
    assert exact.source == "exact" and exact.config["splits"] == 16       # 1500 shares the 2048 bucket
    near = look(S=8192)
    assert near.source == "nearest" and near.config["splits"] == 16
    short = look(S=8)
    assert short.source == "default", "16 splits cannot serve 8 keys: the stored config is skipped"
    other = look(D=64)
    assert other.source == "default" and other.config == family("decode_attention").default_config()


def test_a_default_the_device_refuses_at_the_shape_is_replaced_by_the_nearest_valid_config(tmp_path):
    """Decode attention's default shares K/V over all 8 query heads of a KV head: at D=128 that
    needs 33,280 bytes of threadgroup memory, over every Apple GPU's 32,768, so a lookup with no
    entry must not hand it out (it would fail at dispatch): it changes the fewest parameters."""
    fam = family("decode_attention")
    shape = fam.shape(dict(B=1, Hq=32, Hkv=4, S=32768, D=128))
    default = fam.default_config()
    assert [v.kind for v in check(fam, default, shape, "float16", devices.get("m5-max-40"))] == ["threadgroup_memory"]
    chosen = results.lookup("m5-max-40", "decode_attention", shape, "float16", results=tmp_path / "none.yaml",
                            shipped=False)
    assert chosen.source == "default" and not check(fam, chosen.config, shape, "float16", devices.get("m5-max-40"))
    assert sum(chosen.config[k] != default[k] for k in default) == 1


def test_shipped_modelled_defaults_exist_for_every_device():
    from metalforge import devices
    for name in devices.profiles():
        data = results.load(results.shipped_path(name))
        assert data["device"]["name"] == name
        entries = [e for buckets in data["entries"].values() for e in buckets.values()]
        assert entries and all(e["timer"] == "model" for e in entries)
        assert set(data["entries"]) == {"qmv", "decode_attention", "prefill_attention", "gate_up", "norm_qkv", "qmm"}
    # a Llama-3-8B decode at 3000 tokens on an M1 finds its shipped bucket
    choice = results.lookup("m1", "decode_attention", dict(B=1, Hq=32, Hkv=8, S=3000, D=128), "float16")
    assert choice.source == "exact" and choice.entry["timer"] == "model"


def test_defaults_search_again_the_buckets_a_shipped_file_holds_for_the_families_named(tmp_path):
    """`--families`: besides the models' buckets, those already shipped (older shapes kept in the
    file) are searched again, each as the Target whose bucket is the file's key; other families
    and the buckets taken by the models are left alone; an unknown family is a one-line error."""
    from metalforge.tuner import defaults
    path = tmp_path / "m1.yaml"
    path.write_bytes(results.shipped_path("m1").read_bytes())
    shipped = results.load(path)["entries"]["qmv"]
    taken = {("qmv", next(iter(shipped)))}
    held = defaults.held(path, ["qmv"], taken)
    assert sorted(t.bucket for t in held) == sorted(set(shipped) - {key for _, key in taken})
    assert {t.family.name for t in held} == {"qmv"}
    assert defaults.held(tmp_path / "none.yaml", ["qmv"], set()) == []
    r = subprocess.run([sys.executable, "-m", "metalforge.tuner.defaults", "--families", "qmv,nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "error: unknown family 'nope'; valid families: " + ", ".join(FAMILIES))


def test_shapes_from_a_model_config():
    sets = shapes.from_model_config({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                     "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
                                     "vocab_size": 128256,
                                     "quantization": {"bits": 4, "group_size": 64}}, contexts=(3000, 4096, 100))
    # decode: the fused ops (norm and q/k/v; norm, gate and up; o_proj and down_proj with the
    # residual add) and the output head
    assert {(s["N"], s["K"], s.get("residual", 0)) for s in sets["qmv"]} == {(4096, 4096, 1), (4096, 14336, 1),
                                                                              (128256, 4096, 0)}
    assert sets["gate_up"] == [dict(M=1, N=14336, K=4096, bits=4, group_size=64, gelu=0)]
    assert [(s["K"], s["Hq"], s["Hkv"], s["D"]) for s in sets["norm_qkv"]] == [(4096, 32, 8, 128)]
    assert [s["S"] for s in sets["decode_attention"]] == [128, 4096]
    assert all(s["D"] == 128 and s["Hkv"] == 8 for s in sets["decode_attention"])
    assert {s["block_size"] for s in sets["decode_attention"]} == {16}, "the engine's paged layout"
    # prompts: M at each prefill length, every projection but the vocabulary one
    assert {(s["M"], s["N"], s["K"]) for s in sets["qmm"]} == {(m, n, k) for m in (128, 512) for n, k in
                                                              [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]}
    # tuning the model tunes them too: a prompt runs qmm
    tuned = {t.family.name for t in shapes.targets(sets, shapes.model_families())}
    assert tuned == {"qmv", "gate_up", "norm_qkv", "decode_attention", "qmm", "prefill_attention"}


def test_verify_passes_are_planned_on_request():
    """--num-draft 3: decode attention also at 4 query tokens a sequence, at every context, in the
    engine's paged layout; the other ops' shapes are the plain plan's."""
    config = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
              "quantization": {"bits": 4, "group_size": 64}}
    plain, verify = (shapes.from_model_config(config, contexts=(3000, 100), num_draft=d) for d in (0, 3))
    assert sorted((s["S"], s.get("L", 1)) for s in verify["decode_attention"]) == [(128, 1), (128, 4), (4096, 1),
                                                                                  (4096, 4)]
    assert {s["block_size"] for s in verify["decode_attention"]} == {16}
    assert {f: v for f, v in verify.items() if f != "decode_attention"} == \
        {f: v for f, v in plain.items() if f != "decode_attention"}


@pytest.mark.parametrize("args, message", [
    (["--num-draft", "-1"], "error: --num-draft must be an integer >= 0, got -1"),
    (["--num-draft", "3", "--shapes", "s.yaml"], "error: --num-draft plans a model's verify passes; a --shapes file "
                                                  "lists its shapes itself"),
])
def test_bad_num_draft_is_a_one_line_error(tmp_path, args, message):
    run = tune_cli("--device", "m2", *args, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].endswith(message), run.stderr[-2000:]


def test_tune_a_model_folder_for_qmm_alone(tmp_path):
    folder = write_model(tmp_path / "model", arch="qwen2", quantized=(4, 64))
    run = tune_cli("--device", "m4", "--model", str(folder), "--families", "qmm", "--trials", "3", "--seed", "0",
                   "--storage", f"sqlite:///{tmp_path / 'q.db'}", "--results", str(tmp_path / "r.yaml"))
    assert run.returncode == 0, run.stderr[-2000:]
    buckets = results.load(tmp_path / "r.yaml")["entries"]["qmm"]
    assert {b.split("|")[0].split(",")[0] for b in buckets} == {"M=128", "M=512"}


def test_results_entries_round_trip_and_keep_fields_they_do_not_know(tmp_path):
    shape = dict(M=1, N=64, K=256, bits=4, group_size=64)
    key = family("qmv").bucket_key(shape, "float16")
    later = {"shape": shape, "dtype": "float16", "config": family("qmv").default_config(), "time_s": 2e-5,
             "timer": "metal", "baseline_s": 3e-5, "speedup": 1.5, "trials": {"complete": 3},
             "measured_on": "Apple M3 Pro, macOS 15"}   # a field from a later version
    entry = results.Entry.from_dict("qmv", key, later, "test")
    assert entry.to_dict() == {**later, "ships": "ours"}     # what the bucket ships, from its speedup
    path = tmp_path / "m3-pro.yaml"
    results.save_entries(path, "m3-pro", [("qmv", key, later)])
    assert results.load(path)["entries"]["qmv"][key]["measured_on"] == "Apple M3 Pro, macOS 15"
    modelled = {**later, "timer": "model", "time_s": 1e-6}
    assert not results.Entry.from_dict("qmv", key, modelled, "test").beats(entry), "measured beats modelled"
    with pytest.raises(MetalforgeError, match="time_s must be a positive number"):
        results.Entry.from_dict("qmv", key, {**later, "time_s": -1}, "test")


def test_a_paged_shape_whose_bucket_outgrows_its_pool_finds_the_bucket():
    """A pool of 28 blocks of 16 holds 448 tokens; 300 keys bucket to 512. The bucket is the
    kernel's, not the pool's: the lookup names it instead of refusing the pool as too small."""
    fam = family("decode_attention")
    paged = dict(B=1, Hq=4, Hkv=2, S=300, D=64, block_size=16, num_blocks=28)
    assert fam.bucket_key(paged, "float16") == fam.bucket_key(dict(paged, num_blocks=4096), "float16")
    assert "S=512" in fam.bucket_key(paged, "float16")


def test_every_settings_field_reaches_a_worker_process(tmp_path):
    """Each field set to a value other than its default travels through the worker's spec into a
    separate process; a field added to Settings fails here until it is given a value below."""
    import dataclasses
    import json as json_module
    from metalforge.tuner import worker
    from metalforge.tuner.timers import MetalTimer
    chosen = {"device": "m2-max", "trials": 7, "timeout": 12.5, "storage": f"sqlite:///{tmp_path / 'w.db'}",
              "timer": MetalTimer(warmup=5, budget_s=0.5, min_repeats=7, max_repeats=90), "backend": "emulator",
              "sampler": "tpe", "seed": 41, "drift_every": 3, "drift_threshold": 0.2, "cooldown_s": 1.5,
              "verify": False, "warm_start": False, "heartbeat_s": 4.0, "storage_timeout_s": 33.0}
    fields = {f.name for f in dataclasses.fields(st.Settings)}
    assert set(chosen) == fields, f"give the new field(s) a value here: {fields ^ set(chosen)}"
    defaults = st.Settings(device="m1")
    for name, value in chosen.items():
        assert getattr(defaults, name) != value or name == "timer", f"{name}: pick a value that is not the default"
    settings = st.Settings(**chosen)
    target = shapes.Target("qmv", family("qmv").shape(SMALL["qmv"][0]), "float16")
    spec = worker.Pool(target, settings, 2).specs[1]
    code = ("import json, sys; from metalforge.tuner.worker import read_spec; t, s = read_spec(sys.argv[1]); "
            "print(json.dumps([t.family.name, t.bucket, s.to_dict()]))")
    run = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, check=True)
    name, bucket, received = json_module.loads(run.stdout)
    assert (name, bucket) == ("qmv", target.bucket)
    expected = dict(chosen, seed=41 + 2, timer={"kind": "metal", "warmup": 5, "budget_s": 0.5, "min_repeats": 7,
                                                "max_repeats": 90})   # worker 2: its own random stream
    assert received == expected
