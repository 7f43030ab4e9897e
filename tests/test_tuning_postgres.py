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


def _victim_trial(name, url, pid, deadline_s=240):
    """The number of a trial the process `pid` is running, polled until there is one."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        try:
            study = optuna.load_study(study_name=name, storage=url)
        except KeyError:
            time.sleep(0.2)
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker", "").split(":")[1:2] == [str(pid)]:
                return t.number
        time.sleep(0.05)
    raise AssertionError("the process never ran a trial")


def _assert_queued_again_and_evaluated_once(trials, number):
    """Trial `number` was taken from its worker (killed, or paused past the grace): its config was
    queued again and evaluated once after that, by its retry (taken while proposing, a trial holds
    part of a config: the retry completes it) or by another copy of it that ran first (two
    processes seeding the new study at once both queue the warm-start configs), whose outcome the
    retry then repeats; two workers recovering at once may both queue it, the second copy then a
    repeat of the first."""
    gone = trials[number]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == number]
    history = [(t.number, t.state.name, t.system_attrs, t.user_attrs.get("worker")) for t in trials]
    assert retried, f"its config was queued again: {history}"
    intended = gone.system_attrs.get("fixed_params") or gone.params   # a queued config, whole
    copies = [t for t in retried if not protocol.repeat(t)] + \
             [t for t in trials if t.params == intended and t.number != number and t not in retried
              and t.state in st.FINISHED and not protocol.repeat(t) and not st.interrupted(t)]
    assert len(copies) == 1 and gone.params.items() <= copies[0].params.items(), \
        f"its config was evaluated once after: {history}"
    assert copies[0].state in st.FINISHED, "by a worker still running"


def _three_workers_one_caught(tmp_path, url, trials, heartbeat_s):
    """Three `tune` processes on one study, and the number of a trial the first one is running."""
    target, args = _setup(tmp_path, url, trials=trials)
    env = _env(tmp_path, METALFORGE_HEARTBEAT_S=str(heartbeat_s))
    name = st.study_name("m2-max", target)
    procs = [_tune(args, env, seed, tmp_path / f"r{seed}.yaml") for seed in (1, 2, 3)]
    return name, procs, _victim_trial(name, url, procs[0].pid)


def test_a_worker_killed_mid_trial_is_failed_by_the_heartbeat_and_its_config_retried(tmp_path, postgres_url):
    name, procs, killed = _three_workers_one_caught(tmp_path, postgres_url, 14, heartbeat_s=2)
    victim = procs[0]
    os.kill(victim.pid, signal.SIGKILL)
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
        _assert_queued_again_and_evaluated_once(trials, killed)
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


def test_a_worker_paused_past_the_grace_drops_its_failed_trial_and_goes_on(tmp_path, postgres_url):
    """SIGSTOP for 15 s (past 3 missed heartbeats), then SIGCONT: the others failed its trial and
    queued the config again; the paused worker finds its trial finished, drops it, finishes the
    run and writes its results."""
    # a budget the two others cannot finish while it is paused (they would end, leaving its trial)
    name, procs, paused = _three_workers_one_caught(tmp_path, postgres_url, 30, heartbeat_s=1)
    victim = procs[0]
    os.kill(victim.pid, signal.SIGSTOP)
    state = lambda: optuna.load_study(study_name=name, storage=postgres_url).trials[paused].state
    running_when_paused = state() == TrialState.RUNNING   # (else it finished just before the pause)
    time.sleep(15)
    evaluated = st.evaluated(optuna.load_study(study_name=name, storage=postgres_url))
    assert not running_when_paused or state() == TrialState.FAIL, \
        f"the others failed its trial after the grace ({evaluated} configs evaluated meanwhile)"
    os.kill(victim.pid, signal.SIGCONT)
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
        if p is victim:
            victim_err = err
    assert results.load(tmp_path / "r1.yaml")["entries"]["decode_attention"], "the paused worker wrote its results"
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    if running_when_paused:
        assert st.interrupted(trials[paused]), "its trial stays failed by the others, as interrupted"
        assert f"trial {paused} was finished by another worker" in victim_err
        _assert_queued_again_and_evaluated_once(trials, paused)
    _assert_no_config_evaluated_twice(trials)
    assert 30 <= st.evaluated(study) <= 30 + 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def _with_password(url: str) -> str:
    """The same database, with a password in the URL (the test server trusts every local user,
    so it is ignored there; it must never be printed)."""
    return url.replace("postgres@", "postgres:s3cret-pw@")


def test_a_database_restart_during_a_three_worker_run_is_ridden_out(tmp_path, postgres_url, postgres_server):
    url = _with_password(postgres_url)
    target, args = _setup(tmp_path, url, trials=12)
    env = _env(tmp_path, METALFORGE_HEARTBEAT_S="1")
    name = st.study_name("m2-max", target)
    run = subprocess.Popen([sys.executable, "-m", "metalforge.cli", "tune", *args, "--workers", "3", "--seed", "4",
                            "--results", str(tmp_path / "r.yaml")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline:   # restart once trials are under way in every worker
        try:
            study = optuna.load_study(study_name=name, storage=postgres_url)
            if len({t.user_attrs.get("worker") for t in study.get_trials(deepcopy=False)} - {None}) == 3:
                break
        except KeyError:
            pass
        time.sleep(0.2)
    try:
        postgres_server.stop()
        time.sleep(3)
    finally:
        postgres_server.start()
    out, err = run.communicate(timeout=400)
    assert run.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "s3cret-pw" not in out + err, err[-3000:]
    notices = [line for line in err.splitlines() if "out of reach" in line]
    assert notices and all("postgres:***@" in line for line in notices), err[-3000:]
    study = optuna.load_study(study_name=name, storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    _assert_no_config_evaluated_twice(trials)
    assert 12 <= st.evaluated(study) <= 12 + 2, "the budget is reached"
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert results.load(tmp_path / "r.yaml")["entries"]["decode_attention"]


def test_a_database_gone_past_the_storage_timeout_stops_the_run_in_one_line_and_it_resumes(
        tmp_path, postgres_url, postgres_server):
    url = _with_password(postgres_url)
    target, args = _setup(tmp_path, url, trials=8)
    env = _env(tmp_path, METALFORGE_HEARTBEAT_S="1")
    name = st.study_name("m2-max", target)
    run = subprocess.Popen([sys.executable, "-m", "metalforge.cli", "tune", *args, "--storage-timeout", "4",
                            "--seed", "2", "--results", str(tmp_path / "r.yaml")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=env)
    _victim_trial(name, postgres_url, run.pid)
    try:
        postgres_server.stop()
        _, err = run.communicate(timeout=120)
    finally:
        postgres_server.start()
    lines = err.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in err and "s3cret-pw" not in err, err[-3000:]
    assert "out of reach for 4 s" in lines[-1] and "run the same command again to resume" in lines[-1], err
    again = subprocess.run([sys.executable, "-m", "metalforge.cli", "tune", *args, "--seed", "2",
                            "--results", str(tmp_path / "r.yaml")], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=postgres_url)
    assert 8 <= st.evaluated(study) <= 9, "the resumed run reached the budget, counting the first run's trials"
    _assert_no_config_evaluated_twice(study.get_trials(deepcopy=False))


# The previous release (4e0f3c8) named a study "device/family/bucket" and proposed each parameter
# with suggest_categorical over its domain then; decode attention's `splits` stopped at 32 and
# load_width and prefetch did not exist.
PREVIOUS_DECODE_ATTENTION_SPACE = {"threads": (32, 64, 128, 256, 512, 1024), "keys_per_step": (1, 2, 4, 8),
                                   "splits": (1, 2, 4, 8, 16, 32), "share_kv": (False, True)}


def _previous_release_study(url, target, configs=6):
    """A study as the previous release wrote it: its name, its distributions, finished trials."""
    old_name = f"m2-max/decode_attention/{target.bucket}"
    study = optuna.create_study(study_name=old_name, storage=url, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(configs):
        trial = study.ask()
        for p, domain in PREVIOUS_DECODE_ATTENTION_SPACE.items():
            trial.suggest_categorical(p, list(domain))
        study.tell(trial, 1e-5 * (i + 1))
    return old_name


def _resume_previous_release_study(tmp_path, storage_url, cli_storage):
    target, args = _setup(tmp_path, storage_url, trials=6)
    old_name = _previous_release_study(storage_url, target)
    if cli_storage is None:
        i = args.index("--storage")
        del args[i:i + 2]
    run = subprocess.run([sys.executable, "-m", "metalforge.cli", "tune", *args, "--seed", "1",
                          "--results", str(tmp_path / "r.yaml")], capture_output=True, text=True, env=_env(tmp_path))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert f"study '{old_name}' was made by an earlier metalforge" in run.stderr, run.stderr
    new = optuna.load_study(study_name=st.study_name("m2-max", target), storage=storage_url)
    assert st.evaluated(new) >= 6 and any(t.params.get("splits") == 64 or "prefetch" in t.params for t in new.trials)
    old = optuna.load_study(study_name=old_name, storage=storage_url)
    assert len(old.trials) == 6 and all(t.state == TrialState.COMPLETE for t in old.trials), "the old study is kept"
    assert results.load(tmp_path / "r.yaml")["entries"]["decode_attention"]


def test_a_study_of_the_previous_release_on_postgres_resumes_beside_it(tmp_path, postgres_url):
    _resume_previous_release_study(tmp_path, postgres_url, postgres_url)


def test_the_default_sqlite_database_of_the_previous_release_resumes_after_an_upgrade(tmp_path):
    default = f"sqlite:///{tmp_path / 'results' / 'm2-max.db'}"   # where METALFORGE_RESULTS puts it (_env)
    (tmp_path / "results").mkdir()
    _resume_previous_release_study(tmp_path, default, None)


def test_a_database_refusing_writes_is_one_line_without_the_password(tmp_path, postgres_url, postgres_server):
    """A role that may read the study's tables but not write them (a misconfigured lab database):
    the database's refusal in one line, the URL's password masked, no traceback."""
    import psycopg
    optuna.create_study(study_name="schema", storage=postgres_url)   # the tables, made by their owner
    dbname = postgres_url.split("/")[3].split("?")[0]
    with psycopg.connect(dbname=dbname, user="postgres", autocommit=True, **postgres_server) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'mf_reader'").fetchone():
            conn.execute("CREATE ROLE mf_reader LOGIN")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO mf_reader")
    url = postgres_url.replace("postgres@", "mf_reader:s3cret-pw@")
    _, args = _setup(tmp_path, url, trials=2)
    run = subprocess.run([sys.executable, "-m", "metalforge.cli", "tune", *args, "--results", str(tmp_path / "r.yaml")],
                         capture_output=True, text=True, env=_env(tmp_path))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "permission denied" in lines[0] and "mf_reader:***@" in lines[0] and "s3cret-pw" not in run.stderr
