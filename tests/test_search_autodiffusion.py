"""AutoDiffusion: the paper's generation rule, the search on an exact test bed, identical results
after SIGKILL + resume and with two workers sharing one study."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest

from stepsearch.schedule import StepSchedule
from stepsearch.search.autodiffusion import (
    AutoDiffusionSettings,
    Evaluated,
    genes_from_schedule,
    propose_generation,
    schedule_from_genes,
    time_grid,
)
from stepsearch.search.store import StudyStore

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from _toy_search import GRID, NOISE, summary, toy_search  # noqa: E402

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
    "OMP_NUM_THREADS": "1",
}
BUDGET = 24


def test_generation_rule_follows_the_paper():
    settings = AutoDiffusionSettings()  # 50 = 25 mutation + 10 crossover + 15 random, top 10
    rng = np.random.default_rng(5)
    history = [
        Evaluated(i, 0, "random", tuple(sorted(rng.choice(1000, 6, replace=False))), float(v))
        for i, v in enumerate(rng.permutation(50))
    ]
    proposed = propose_generation(0, 1, 6, 1000, history, settings)
    assert proposed == propose_generation(0, 1, 6, 1000, history, settings)  # pure
    assert proposed != propose_generation(1, 1, 6, 1000, history, settings)
    origins = [origin for origin, _ in proposed]
    assert (origins.count("mutation"), origins.count("crossover"), origins.count("random")) == (
        25,
        10,
        15,
    )
    genes = [g for _, g in proposed]
    seen = {r.genes for r in history}
    assert len(set(genes)) == 50 and not set(genes) & seen  # duplicates skipped
    assert all(len(g) == 6 == len(set(g)) and list(g) == sorted(g) for g in genes)
    parents = [set(r.genes) for r in sorted(history, key=lambda r: r.value)[:10]]
    changed = []
    for origin, child in proposed:
        if origin == "mutation":  # one top-10 parent with ~10% of its genes replaced
            kept = max(len(set(child) & p) for p in parents)
            changed.append(6 - kept)
            assert kept <= 5
        if origin == "crossover":  # every gene from one of two top-10 parents
            assert any(set(child) <= a | b for a in parents for b in parents if a is not b)
    assert 1.0 <= np.mean(changed) < 1.6  # at least one gene, otherwise Binomial(6, 0.1)


def test_generation_zero_starts_from_the_given_schedules():
    settings = AutoDiffusionSettings(population=6, mutations=2, crossovers=1, parents=2)
    starts = [("trailing", (10, 20, 30)), ("too-long", (1, 2, 3, 4)), ("again", (10, 20, 30))]
    proposed = propose_generation(3, 0, 3, 40, [], settings, starts)
    assert proposed[0] == ("trailing", (10, 20, 30)) and len(proposed) == 6
    assert [o for o, _ in proposed[1:]] == ["random"] * 5
    # a space smaller than the population: every candidate once, then nothing more
    tiny = propose_generation(0, 0, 2, 3, [], settings)
    assert sorted(g for _, g in tiny) == [(0, 1), (0, 2), (1, 2)]


def test_grid_and_genes_round_trip():
    grid = time_grid(NOISE)
    assert grid.size == 1000 and grid[0] == NOISE.t_min and grid[-1] == 1.0
    schedule = schedule_from_genes((0, 499, 999), grid, NOISE)
    assert schedule.to_diffusers_timesteps().tolist() == [999, 499, 0] and schedule.ends_clean
    assert genes_from_schedule(schedule, grid) == (0, 499, 999)
    assert genes_from_schedule(StepSchedule([1.0, 0.9999, 0.0], NOISE), grid) is None
    with pytest.raises(ValueError, match="distinct"):
        propose_generation(0, 0, 5, 4, [], AutoDiffusionSettings())
    with pytest.raises(ValueError, match="exceed"):
        AutoDiffusionSettings(population=10, mutations=8, crossovers=3)


def test_search_improves_on_its_starts_and_stores_every_candidate(tmp_path):
    result = toy_search(str(tmp_path / "s.sqlite3"), BUDGET)
    values = result.values
    assert len(values) == BUDGET and result.best_score.value == min(values)
    starts = [r.value for r in result.history if r.origin in ("time_uniform", "trailing")]
    assert len(starts) == 2 and result.best_score.value < 0.8 * min(starts)
    later = [r.value for r in result.history if r.generation >= 2]
    first = [r.value for r in result.history if r.generation == 0]
    assert np.median(later) < np.median(first)  # selection works
    with StudyStore.open(tmp_path / "s.sqlite3", "toy", metadata={"toy": 3}) as store:
        trials = store.trials()
        assert len(trials) == BUDGET == len({t.key for t in trials})
        assert store.best().value == result.best_score.value
        assert store.best().candidate() == result.best
        assert [t.attrs["index"] for t in trials] == list(range(BUDGET))
    assert schedule_from_genes(result.history[0].genes, GRID, NOISE).num_steps == 3


def _worker(
    storage: str, budget: int, out: Path, study: str = "toy", go: Path | None = None
) -> subprocess.Popen:
    barrier = [] if go is None else [str(go)]
    script = str(TESTS / "_toy_search.py")
    return subprocess.Popen(
        [sys.executable, script, storage, str(budget), str(out), study, *barrier], env=ENV
    )


def _complete(storage: str) -> int:
    """Completed trials, read straight from the SQLite file (cheap enough to poll)."""
    try:
        with sqlite3.connect(storage, timeout=10) as connection:
            query = "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'"
            return int(connection.execute(query).fetchone()[0])
    except sqlite3.OperationalError:  # the tables are not there yet
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return summary(toy_search(str(tmp_path_factory.mktemp("ref") / "s.sqlite3"), BUDGET))


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 10])
def test_sigkill_and_resume_reach_the_identical_result(tmp_path, uninterrupted, kill_after):
    storage = str(tmp_path / "s.sqlite3")
    process = _worker(storage, BUDGET, tmp_path / "killed.json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if _complete(storage) >= kill_after:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the worker finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert kill_after <= _complete(storage) < BUDGET
    resumed = summary(toy_search(storage, BUDGET))
    assert resumed == uninterrupted
    with StudyStore.open(storage, "toy", metadata={"toy": 3}) as store:
        assert store.count() == BUDGET and store.count("RUNNING") == 0


def _two_workers(tmp_path: Path, storage: str, study: str, uninterrupted: dict) -> None:
    StudyStore.open(storage, study, metadata={"toy": 3}).close()  # the tables exist first
    go = tmp_path / "go"  # both workers set up before either searches (a start barrier)
    workers = [_worker(storage, BUDGET, tmp_path / f"{w}.json", study, go) for w in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready.*"))) < 2 and time.monotonic() < deadline:
        assert all(w.poll() is None for w in workers), "a worker exited before the barrier"
        time.sleep(0.01)
    go.touch()
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    results = [json.loads((tmp_path / f"{w}.json").read_text()) for w in range(2)]
    assert results[0] == results[1] == json.loads(json.dumps(uninterrupted))
    with StudyStore.open(storage, study, metadata={"toy": 3}) as store:
        complete = store.trials()
        assert len(complete) == BUDGET == len({t.key for t in complete})  # no duplicates
        assert store.count("RUNNING") == 0
        assert len({t.worker["pid"] for t in complete}) == 2  # both did part of the work


@pytest.mark.slow
def test_two_workers_match_one_worker_without_duplicate_evaluations(tmp_path, uninterrupted):
    _two_workers(tmp_path, str(tmp_path / "shared.sqlite3"), "toy", uninterrupted)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("STEPSEARCH_TEST_POSTGRES_URL"),
    reason="STEPSEARCH_TEST_POSTGRES_URL is unset (scripts/ci_postgres.sh starts a server)",
)
def test_two_workers_on_a_postgres_server(tmp_path, uninterrupted):
    url = os.environ["STEPSEARCH_TEST_POSTGRES_URL"]
    study = f"toy-{uuid.uuid4().hex[:8]}"  # a fresh study on a long-lived server
    try:
        _two_workers(tmp_path, url, study, uninterrupted)
    finally:
        optuna.delete_study(study_name=study, storage=url.replace("://", "+psycopg://", 1))
