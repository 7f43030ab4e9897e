"""What must hold whatever users and machines do: bad token ids and failed batched steps change
nothing, concurrent writers lose no results entry, files follow the umask, Ctrl-C ends a tuning
run with workers in one line and the run resumes with its budget intact."""
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from metalforge import engine
from metalforge.testing import write_model
from metalforge.errors import MetalforgeError
from metalforge import results
from metalforge.tuner import shapes, study as st


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "llama", layers=1, vocab=256, shards=1)


def _pool_state(e):
    return ({sid: (list(s.blocks), list(s.tokens), list(s.positions)) for sid, s in e.pool.seqs.items()},
            list(e.pool.blocks.refcount))


@pytest.mark.parametrize("bad", [10**6, 256, -1, 3.5, True])
def test_step_refuses_token_ids_outside_the_vocabulary_and_changes_nothing(model, bad):
    with engine.load(model, backend="mlx", kv_tokens=64, block_size=4) as e:
        a, b = e.add_sequence(), e.add_sequence()
        e.step([a], [[1, 2, 3]])
        before = _pool_state(e)
        with pytest.raises(MetalforgeError, match="outside the vocabulary"):
            e.step([a, b], [[4], [bad]])
        assert _pool_state(e) == before


def test_a_failed_batched_step_reserves_nothing_for_any_sequence(model):
    with engine.load(model, backend="mlx", kv_tokens=16, block_size=4) as e:
        a, b = e.add_sequence(), e.add_sequence()
        e.step([a], [[1, 2, 3, 4]])          # one full block
        e.step([b], [list(range(5, 13))])    # two full blocks: one block left free
        before = _pool_state(e)
        with pytest.raises(engine.PoolExhausted, match="2 more blocks"):
            e.step([a, b], [[7], [8]])       # each needs a new block: 2 > 1 free
        assert _pool_state(e) == before, "no sequence keeps a block from the failed step"
        with pytest.raises(MetalforgeError, match="repeat"):
            e.step([a, a], [[7], [8]])
        assert _pool_state(e) == before


_WRITER = """
import sys
from metalforge import results
from metalforge.kernels import get_family
i = int(sys.argv[2])
shape = dict(M=1, N=64 * (i + 1), K=256, bits=4, group_size=64)
entry = {"shape": shape, "dtype": "float16", "config": {}, "time_s": 1e-5, "timer": "model",
         "baseline_s": None, "speedup": None, "trials": {}}
results.save_entries(sys.argv[1], "m1", [("qmv", get_family("qmv").bucket_key(shape, "float16"), entry)])
"""


def test_concurrent_writers_lose_no_results_entry_and_files_follow_the_umask(tmp_path):
    path = tmp_path / "m1.yaml"
    env = {**os.environ}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(i)], env=env,
                              preexec_fn=lambda: os.umask(0o027)) for i in range(8)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(results.load(path)["entries"]["qmv"]) == 8, "every writer's entry is in the file"
    assert path.stat().st_mode & 0o777 == 0o640, "the file follows the writer's umask (027)"


def test_ctrl_c_with_workers_is_one_line_and_the_run_resumes_to_its_budget(tmp_path):
    spec = tmp_path / "shapes.yaml"
    spec.write_text(yaml.safe_dump({"decode_attention": [dict(B=1, Hq=4, Hkv=2, S=100, D=64)]}))
    url = f"sqlite:///{tmp_path / 'ctrl-c.db'}"
    args = [sys.executable, "-m", "metalforge.cli", "tune", "--device", "m3", "--shapes", str(spec), "--trials", "10",
            "--storage", url, "--workers", "3", "--sampler", "random", "--seed", "3",
            "--results", str(tmp_path / "r.yaml")]
    env = {**os.environ, "METALFORGE_CACHE": str(tmp_path / "cold-cache"), "PYTHONUNBUFFERED": "1",
           "METALFORGE_RESULTS": str(tmp_path / "results")}
    target = shapes.targets(shapes.from_yaml(spec), None, "float16")[0]
    name = st.study_name("m3", target)

    storage = st.storage_for("m3", url)   # made while the run makes it too: the schema race is survived

    def finished():
        try:
            s = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return 0
        return len(s.get_trials(deepcopy=False, states=st.FINISHED))

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while finished() < 2 and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)      # what the terminal sends to the foreground process on Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and "trial/s" not in line and "%|" not in line]
    assert lines == ["metalforge: interrupted"], err[-3000:]
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials(deepcopy=False)
    assert 10 <= st.evaluated(study) <= 12, "interrupted trials do not count towards the budget"
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for t in trials:
        if st.interrupted(t) and t.params:   # interrupted before it had a config: nothing to run again
            assert [r for r in trials if r.system_attrs.get("failed_trial") == t.number], \
                f"interrupted trial {t.number}'s config is queued again"


_OPENER = """
import sys
from metalforge.tuner import study
study.storage_for("m1", sys.argv[1])
print("opened")
"""


def test_workers_opening_a_new_database_at_once_all_get_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err[-500:] for _, err in outs]
