"""Tuning across machines through a real PostgreSQL server: several `metalforge tune` processes on
one study, each like a Mac of a lab, and one of them killed with kill -9 mid-trial."""
import os
import signal
import subprocess
import sys
import time

import optuna
import yaml
from optuna.trial import TrialState

from metalforge import results
from metalforge.kernels import get_family
from metalforge.tuner import protocol, shapes, study as st

SHAPES = {"decode_attention": [dict(B=1, Hq=4, Hkv=2, S=100, D=64)]}


def _setup(tmp_path, url, trials):
    spec = tmp_path / "shapes.yaml"
    spec.write_text(yaml.safe_dump(SHAPES))
    target = shapes.targets(shapes.from_yaml(spec), None, "float16")[0]
    args = ["--device", "m2-max", "--shapes", str(spec), "--trials", str(trials), "--storage", url,
            "--sampler", "random"]
    return target, args


def _env(tmp_path, **extra):
    # a cold kernel cache: every verification compiles (about a second), so trials overlap
    return {**os.environ, "METALFORGE_CACHE": str(tmp_path / "cold-cache"),
            "METALFORGE_RESULTS": str(tmp_path / "results"), "PYTHONUNBUFFERED": "1", **extra}


def _tune(args, env, seed, out):
    return subprocess.Popen([sys.executable, "-m", "metalforge.cli", "tune", *args, "--seed", str(seed),
                             "--results", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)


def _assert_no_config_evaluated_twice(trials):
    ran = [t for t in trials if t.state in st.FINISHED and "duplicate_of" not in t.user_attrs and not st.interrupted(t)]
    keys = [st.config_key(t.params) for t in ran]
    assert len(keys) == len(set(keys)), "a config was evaluated twice"
    return ran


def test_three_workers_on_one_postgres_study_reach_the_budget_once(tmp_path, postgres_url):
    target, args = _setup(tmp_path, postgres_url, trials=12)
    run = subprocess.run([sys.executable, "-m", "metalforge.cli", "tune", *args, "--workers", "3", "--seed", "7",
                          "--results", str(tmp_path / "r.yaml")], capture_output=True, text=True, env=_env(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    study = optuna.load_study(study_name=st.study_name("m2-max", target), storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    ran = _assert_no_config_evaluated_twice(trials)
    assert 12 <= st.evaluated(study) <= 12 + 2, "the budget is reached, overshot by at most the other workers' trials"
    assert len({t.user_attrs["worker"] for t in ran}) == 3, "all three workers evaluated configs"
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert results.load(tmp_path / "r.yaml")["entries"]["decode_attention"]


def test_a_worker_killed_mid_trial_is_failed_by_the_heartbeat_and_its_config_retried(tmp_path, postgres_url):
    target, args = _setup(tmp_path, postgres_url, trials=14)
    env = _env(tmp_path, METALFORGE_HEARTBEAT_S="2")
    name = st.study_name("m2-max", target)
    procs = [_tune(args, env, seed, tmp_path / f"r{seed}.yaml") for seed in (1, 2, 3)]
    victim, killed = procs[0], None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and victim.poll() is None:
        try:
            study = optuna.load_study(study_name=name, storage=postgres_url)
        except KeyError:
            time.sleep(0.2)
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker", "").split(":")[1:2] == [str(victim.pid)]:
                os.kill(victim.pid, signal.SIGKILL)
                killed = t.number
                break
        time.sleep(0.05)
    assert killed is not None, "the victim must be killed while running a trial"
    victim.wait()
    for p in procs[1:]:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    dead = by_number[killed]
    if dead.state != TrialState.FAIL:
        # finished between the poll and the kill: nothing to recover, the rest still holds
        assert dead.state in st.FINISHED
    else:
        assert st.interrupted(dead), "a killed trial is failed without a config error"
        # two survivors recovering at the same moment may both queue it: the second copy is then
        # recorded as a repeat of the first and never evaluated
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed and not protocol.repeat(t)]
        history = [(t.number, t.state.name, t.system_attrs, t.user_attrs.get("worker")) for t in trials]
        # (killed while proposing, a trial holds part of a config: the retry completes it)
        assert len(retries) == 1 and dead.params.items() <= retries[0].params.items(), f"its config was queued again, once: {history}"
        assert retries[0].state in st.FINISHED, "and evaluated by a surviving worker"
    _assert_no_config_evaluated_twice(trials)
    # the killed trial never counts, its retry once; the two survivors may each finish the trial
    # they hold when the budget is met (one over), as with Optuna's own MaxTrialsCallback
    assert 14 <= st.evaluated(study) <= 14 + 1 + 1, "the budget counts neither the killed trial nor its retry twice"
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def results_entry(family, time_s, timer):
    """A (family, bucket key, entry) triple for a small shape, as a finished study yields it."""
    shape = dict(M=1, N=64, K=256, bits=4, group_size=64) if family == "qmv" else SHAPES[family][0]
    return (family, get_family(family).bucket_key(shape, "float16"),
            {"shape": shape, "dtype": "float16", "config": {}, "time_s": time_s, "timer": timer,
             "baseline_s": None, "speedup": None, "trials": {}})


def test_results_merge_combines_files_from_several_machines(tmp_path):
    a, b, out = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "merged" / "c.yaml"
    fast_model, slow_model, measured = (results_entry("qmv", 2e-6, "model"), results_entry("qmv", 5e-6, "model"),
                                        results_entry("qmv", 9e-6, "metal"))
    results.save_entries(a, "m1", [fast_model, results_entry("decode_attention", 1e-5, "model")])
    results.save_entries(b, "m1", [slow_model])
    run = subprocess.run([sys.executable, "-m", "metalforge.cli", "results", "merge", str(a), str(b), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    merged = results.load(out)["entries"]
    assert merged["qmv"][fast_model[1]]["time_s"] == 2e-6, "faster beats slower"
    assert "decode_attention" in merged
    results.save_entries(b, "m1", [measured])
    subprocess.run([sys.executable, "-m", "metalforge.cli", "results", "merge", str(b), "--out", str(out)], check=True)
    assert results.load(out)["entries"]["qmv"][fast_model[1]]["timer"] == "metal", "measured beats modelled"
    results.save_entries(tmp_path / "m2.yaml", "m2", [fast_model])
    before = out.read_bytes()
    bad = subprocess.run([sys.executable, "-m", "metalforge.cli", "results", "merge", str(tmp_path / "m2.yaml"),
                          str(a), "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "different devices" in bad.stderr and bad.stderr.count("\n") == 1
    assert out.read_bytes() == before, "a refused merge changes nothing"
