"""The study store: duplicates looked up, killed workers' trials re-run, metadata guarded, workers
sharing one study (test_search_autodiffusion runs two worker processes on SQLite and PostgreSQL)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective, Score
from stepsearch.models.source import DenoiserSource
from stepsearch.noise import EDM, DiscreteVP
from stepsearch.schedule import StepSchedule, karras, logsnr_uniform
from stepsearch.search.store import StudyStore, candidate_key, storage_url
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

NOISE = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
META = {"model": "toy", "solver": "ddim", "nfe": 4, "objective": {"metric": "toy"}}


class Counting:
    """A deterministic toy score (sum of times) that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, candidate: StepSchedule) -> Score:
        self.calls += 1
        value = float(np.sum(candidate.times**2))
        return Score(value, 0.01, "toy", "search", 8, candidate.num_steps, 0.001, np.arange(3.0))


def schedule(*times: float) -> StepSchedule:
    return StepSchedule(np.asarray(times, dtype=np.float64), NOISE)


def open_store(path: Path, **kwargs) -> StudyStore:
    kwargs.setdefault("metadata", META)
    return StudyStore.open(path / "study.sqlite3", "toy", **kwargs)


def test_storage_url_and_candidate_key(tmp_path):
    assert storage_url(tmp_path / "a" / "s.sqlite3") == f"sqlite:///{tmp_path}/a/s.sqlite3"
    assert (tmp_path / "a").is_dir()
    assert storage_url("postgresql://u@127.0.0.1:5432/db") == "postgresql://u@127.0.0.1:5432/db"
    with pytest.raises(ValueError, match="directory"):
        storage_url(tmp_path)
    a = schedule(0.9, 0.5, 0.0)
    assert candidate_key(a, "ddim") == candidate_key(schedule(0.9 + 1e-14, 0.5, 0.0), "ddim")
    assert candidate_key(a, "ddim") == candidate_key(a.with_metadata(spacing="x"), "ddim")
    assert candidate_key(a, "ddim") != candidate_key(schedule(0.9 + 1e-7, 0.5, 0.0), "ddim")
    assert candidate_key(a, "ddim") != candidate_key(a, "dpm_solver_pp_2m")
    other_noise = StepSchedule(a.times, DiscreteVP.stable_diffusion())
    assert candidate_key(a, "ddim") != candidate_key(other_noise, "ddim")


def test_duplicates_are_looked_up_and_stored_exactly(tmp_path):
    score = Counting()
    with open_store(tmp_path) as store:
        first = store.evaluate(schedule(0.9, 0.5, 0.0), score, solver="ddim", generation=0)
        again = store.evaluate(schedule(0.9, 0.5, 0.0), score, solver="ddim")
        other = store.evaluate(schedule(0.9, 0.4, 0.0), score, solver="ddim")
        assert score.calls == 2 and store.evaluations == 2
        assert first == again and first.value == 0.9**2 + 0.5**2
        assert np.array_equal(again.per_sample, np.arange(3.0))
        assert other.value < first.value
    with open_store(tmp_path) as reopened:  # a new process would see the same
        assert reopened.evaluate(schedule(0.9, 0.5, 0.0), score, solver="ddim") == first
        assert score.calls == 2
        trials = reopened.trials()
        assert [t.number for t in trials] == [0, 1]
        assert trials[0].attrs == {"generation": 0} and trials[0].worker["pid"] == os.getpid()
        assert trials[0].candidate() == schedule(0.9, 0.5, 0.0)
        best = reopened.best()
        assert best.number == 1 and best.candidate() == schedule(0.9, 0.4, 0.0)
        # Optuna sees an ordinary study: values, params t0..tn (what the dashboard plots)
        study = reopened.study
        assert study.best_trial.number == 1 and study.best_trial.params["t1"] == 0.4


def test_real_objective_score_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    noise = EDM()
    source = DenoiserSource.of_mixture(
        GaussianMixture.gaussian(rng.normal(size=4), rng.uniform(0.1, 0.5, 4), noise)
    )
    objective = Objective(source, num_samples=32, solver="ddim", cache=TensorCache(None))
    with StudyStore.open(tmp_path / "s.sqlite3", "gauss", metadata=META) as store:
        candidate = karras(noise, 4)
        stored = store.evaluate(candidate, objective, solver="ddim")
        direct = objective(candidate)
        assert stored.value == direct.value and stored.std == direct.std
        assert np.array_equal(stored.per_sample, direct.per_sample)
        assert store.evaluate(logsnr_uniform(noise, 4), objective, solver="ddim").value > 0
        assert objective.evaluations == 3


def test_other_metadata_or_direction_is_refused(tmp_path):
    open_store(tmp_path).close()
    with pytest.raises(ValueError, match=r"another search \(nfe: stored 4, now 5"):
        open_store(tmp_path, metadata={**META, "nfe": 5})
    with pytest.raises(ValueError, match="minimize"):
        open_store(tmp_path, direction="maximize")
    with pytest.raises(ValueError, match="JSON"):
        open_store(tmp_path / "x", metadata={"model": object()})
    with open_store(tmp_path) as store, pytest.raises(ValueError, match="reserved"):
        store.evaluate(schedule(0.9, 0.0), Counting(), solver="ddim", key="mine")


def test_failed_and_nonfinite_scores(tmp_path):
    def broken(candidate):
        raise RuntimeError("model exploded")

    def nan_score(candidate):
        return Score(math.nan, None, "toy", "search", 8, 1)

    with open_store(tmp_path) as store:
        with pytest.raises(RuntimeError, match="exploded"):
            store.evaluate(schedule(0.9, 0.0), broken, solver="ddim")
        assert store.count("FAIL") == 1 and store.count("COMPLETE") == 0
        score = Counting()
        store.evaluate(schedule(0.9, 0.0), score, solver="ddim")  # a failure is not a result
        assert score.calls == 1
        worst = store.evaluate(schedule(0.8, 0.0), nan_score, solver="ddim")
        assert worst.value == math.inf and store.best().candidate() == schedule(0.9, 0.0)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_dead_workers_running_trial_is_failed_and_rerun(tmp_path):
    candidate = schedule(0.9, 0.5, 0.0)
    with open_store(tmp_path) as store:
        # what a worker killed while evaluating leaves: a RUNNING trial claimed by a dead pid
        store.worker = {**store.worker, "id": "killed", "pid": _dead_pid()}
        store._claim(candidate, candidate_key(candidate, "ddim"), {"name": "ddim"}, {})
    with open_store(tmp_path) as store:
        assert store.count("RUNNING") == 1
        score = Counting()
        value = store.evaluate(candidate, score, solver="ddim").value
        assert score.calls == 1 and value == 0.9**2 + 0.5**2
        failed = store.trials(("FAIL",))
        assert len(failed) == 1 and failed[0].worker["id"] == "killed"
        assert store.count("RUNNING") == 0 and store.count("COMPLETE") == 1


def test_a_remote_workers_trial_is_failed_by_heartbeat(tmp_path):
    candidate = schedule(0.9, 0.5, 0.0)
    with open_store(tmp_path, heartbeat_interval=1, grace_period=1, poll_interval=0.05) as store:
        store.worker = {**store.worker, "id": "remote", "host": "elsewhere"}
        store._claim(candidate, candidate_key(candidate, "ddim"), {"name": "ddim"}, {})
    with open_store(tmp_path, heartbeat_interval=1, grace_period=1, poll_interval=0.05) as store:
        score = Counting()
        assert store.evaluate(candidate, score, solver="ddim").value == 0.9**2 + 0.5**2
        assert score.calls == 1 and store.trials(("FAIL",))[0].worker["id"] == "remote"


def test_a_sibling_study_shares_the_storage_and_checks_its_own_metadata(tmp_path):
    """A search's second kind of evaluation (S³'s selection seed) lives in a sibling study: its
    trials are not the search's, it resumes, other metadata is refused, and closing it leaves
    the search's store open."""
    score = Counting()
    with open_store(tmp_path) as store:
        store.evaluate(schedule(0.9, 0.5, 0.0), score, solver="ddim")
        with store.sibling("select", {"seed": 3}) as select:
            assert select.study.study_name == "toy:select"
            select.evaluate(schedule(0.9, 0.4, 0.0), score, solver="ddim", index=7)
        assert store.count() == 1 and [t.attrs for t in store.trials()] == [{}]
        store.evaluate(schedule(0.9, 0.3, 0.0), score, solver="ddim")  # still open
        with pytest.raises(ValueError, match="seed"):
            store.sibling("select", {"seed": 4})
        with pytest.raises(ValueError, match="suffix"):
            store.sibling("", {})
    with open_store(tmp_path) as store, store.sibling("select", {"seed": 3}) as select:
        assert select.count() == 1 and select.trials()[0].attrs == {"index": 7}
        select.evaluate(schedule(0.9, 0.4, 0.0), score, solver="ddim")
        assert score.calls == 3 and store.count() == 2
