"""A search writes its result as soon as it exists, before the held-out comparison: a run killed
(here: a held-out scoring that raises) during that comparison leaves a usable schedule file and
scheduler directory behind; ``result.json`` (the job's summary) only appears once it is done."""

from __future__ import annotations

import json

import pytest
from _toy_search import RandomPerturbationFamily, RandomPerturbationSettings

from stepsearch.ays.search import AYSConfig
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models import DenoiserSource
from stepsearch.noise import DiscreteVP
from stepsearch.olss.search import search_olss
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.family import run_search
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

NOISE = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})


class HeldOutKilled(RuntimeError):
    """Stands for the run being killed during the held-out comparison."""


@pytest.fixture()
def no_held_out(monkeypatch):
    """Every held-out score raises (the search seed still scores)."""

    monkeypatch.setattr(Objective, "held_out", _raise)


def _objective() -> Objective:
    mixture = GaussianMixture.random(num_components=3, dim=6, noise=NOISE, seed=2)
    source = DenoiserSource.of_mixture(mixture, name="mix", num_reference=128)
    return Objective(source, "traj", num_samples=16, cache=TensorCache(None))


def _check_written_first(out, scheduler_class: str) -> ScheduleFile:
    written = ScheduleFile.load(out / "best_schedule.json", noise=NOISE)
    assert written.provenance.scores["held_out"] is None  # not scored yet
    assert written.provenance.scores["search"]["value"] > 0
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == scheduler_class
    assert not (out / "result.json").exists()  # the summary marks a finished job
    return written


@pytest.mark.parametrize(
    ("family", "solver", "settings", "scheduler_class"),
    [
        (
            RandomPerturbationFamily(),
            "ddim",
            RandomPerturbationSettings(trials=3),
            "StepsearchDDIMScheduler",
        ),
        ("olss", "olss", None, "StepsearchOLSSScheduler"),
        (
            "ays",
            "dpm_solver_pp_2m",
            AYSConfig(strategy="direct", num_samples=4, max_sweeps=1, base_intervals=4),
            "StepsearchDPMSolverMultistepScheduler",
        ),
    ],
    ids=["store-family", "olss", "ays"],
)
def test_run_search_writes_the_result_before_the_held_out_comparison(
    family, solver, settings, scheduler_class, tmp_path, monkeypatch
):
    objective = _objective()
    finished = run_search(
        family, objective, solver, 4, tmp_path / "done", settings=settings, progress=False
    )
    done = ScheduleFile.load(tmp_path / "done" / "best_schedule.json", noise=NOISE)
    held_out = done.provenance.scores["held_out"]["value"]
    assert held_out == pytest.approx(finished.held_out.value)  # rewritten with its score
    assert (tmp_path / "done" / "result.json").exists()

    killed = tmp_path / "killed"
    monkeypatch.setattr(Objective, "held_out", _raise)
    with pytest.raises(HeldOutKilled):
        run_search(family, _objective(), solver, 4, killed, settings=settings, progress=False)
    written = _check_written_first(killed, scheduler_class)
    assert written.schedule == done.schedule  # the same result, only not scored yet


def _raise(self, candidate, solver=None):
    raise HeldOutKilled("killed during the held-out comparison")


def test_search_olss_writes_the_fit_before_the_held_out_report(tmp_path, no_held_out):
    """``stepsearch search olss`` (:func:`search_olss` with ``out``): the scheduler directory and
    schedule file exist once the fit does."""
    source = _objective().source
    with pytest.raises(HeldOutKilled):
        search_olss(source, 4, num_samples=16, held_out_samples=16, out=tmp_path, fd=False,
                    cache=TensorCache(None))  # fmt: skip
    written = ScheduleFile.load(tmp_path / "olss_schedule.json", noise=NOISE)
    assert written.provenance.scores["held_out"] is None
    assert written.schedule.num_steps == 4
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "StepsearchOLSSScheduler"
    assert not (tmp_path / "report.json").exists()
