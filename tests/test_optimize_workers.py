"""Many workers on one optimize run (``--storage``): tasks claimed once through the study store, a
dead worker's claim redone, and two worker processes on one SQLite study writing the report one
process writes alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from test_optimize import _comparable
from test_optimize_budgets import _optimize

from stepsearch.search.family import family
from stepsearch.search.store import StudyStore

TESTS = Path(__file__).parent
WORKER = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_optimize_budgets import _optimize
result = _optimize(Path({out!r}), storage={storage!r}, worker_name={name!r})
Path({out!r} + ".json").write_text(json.dumps(result.report))
"""


def test_many_workers_need_a_work_budget(tmp_path):
    with pytest.raises(ValueError, match=r"--storage .* needs --budget-evals"):
        _optimize(tmp_path / "run", budget_evals=None, storage=tmp_path / "store.sqlite3")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_task_runs_once_and_a_dead_workers_claim_is_run_again(tmp_path, backend):
    if backend == "sqlite":
        path, name = str(tmp_path / "tasks.sqlite3"), "tasks"
    elif os.environ.get("STEPSEARCH_TEST_POSTGRES_URL"):
        path, name = os.environ["STEPSEARCH_TEST_POSTGRES_URL"], f"tasks-{uuid.uuid4().hex}"
    else:
        pytest.skip(
            "STEPSEARCH_TEST_POSTGRES_URL is unset (scripts/ci_postgres.sh starts a server)"
        )
    metadata = {"run": "test"}
    calls: list[str] = []
    with StudyStore.open(path, name, metadata=metadata) as store:
        assert store.run_task("a", lambda: calls.append("a") or {"x": 1}) == {"x": 1}
        assert store.run_task("a", lambda: calls.append("a") or {"x": 2}) == {"x": 1}
    assert calls == ["a"]
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    for task, pid in (("alive", os.getppid()), ("dead", int(done.stdout))):
        with StudyStore.open(path, name, metadata=metadata, worker_name=task) as other:
            other.worker["pid"] = pid  # a claim by another process on this host
            other._create_running(task, {}, {}, {})
    with StudyStore.open(path, name, metadata=metadata) as store:
        assert store.run_task("alive", lambda: {"y": 1}) is None  # its worker still runs it
        assert store.run_task("dead", lambda: calls.append("dead") or {"y": 2}) == {"y": 2}
        states = {
            (t.user_attrs["key"], t.state.name, t.user_attrs.get("failed_as"))
            for t in store.study.get_trials()
        }
    assert calls == ["a", "dead"]
    assert ("dead", "FAIL", "stale") in states and ("dead", "COMPLETE", None) in states
    assert ("alive", "RUNNING", None) in states


def _start_worker(folder: Path, storage: Path, name: str) -> subprocess.Popen:
    code = WORKER.format(tests=str(TESTS), out=str(folder / name), storage=str(storage), name=name)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_workers_on_one_study_write_the_report_of_one_process(tmp_path):
    storage = tmp_path / "store.sqlite3"
    workers = [_start_worker(tmp_path, storage, name) for name in ("a", "b")]
    alone = _optimize(tmp_path / "alone").report
    for worker in workers:
        _, errors = worker.communicate(timeout=300)
        assert worker.returncode == 0, errors[-2000:]
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b")]
    assert _comparable(reports[0]) == _comparable(reports[1]) == _comparable(alone)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{storage}"
    (summary,) = optuna.get_all_study_summaries(url)
    trials = optuna.load_study(study_name=summary.study_name, storage=url).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    keys = [t.user_attrs["key"] for t in done]
    assert len(keys) == len(set(keys)) == 5 + 1 + 1  # every stage, the reference, one judging
    assert {t.user_attrs["worker"]["id"] for t in done} <= {"a", "b"}
    # no task started before the tasks whose results it reads had finished
    finished = {t.user_attrs["key"]: t.datetime_complete for t in done}
    for trial in done:
        for need in _needs(trial.user_attrs["key"], list(finished)):
            assert trial.datetime_start >= finished[need], (trial.user_attrs["key"], need)


def _needs(key: str, keys: list[str]) -> list[str]:
    """What task ``key`` reads, from the rule in ``stepsearch.search.optimize.workers``: a
    trial-budgeted family's stage every cheap stage and every earlier trial-budgeted stage at its
    NFE (``keys`` in the run's order), a judging every stage at its NFE and the reference."""
    if key.startswith("judge:nfe-"):
        nfe = key.removeprefix("judge:nfe-")
        return [
            "reference",
            *[k for k in keys if k.startswith("stage:") and k.split(":")[2] == nfe],
        ]
    if key == "reference" or not family(key.split(":")[1]).expensive:
        return []
    method, nfe = key.split(":")[1:3]
    stages = [k.split(":") for k in keys if k.startswith("stage:") and k.split(":")[2] == nfe]
    methods = list(dict.fromkeys(s[1] for s in stages))
    return [":".join(s) for s in stages
            if not family(s[1]).expensive or methods.index(s[1]) < methods.index(method)]  # fmt: skip
