"""The ``stepsearch search dp`` job: files, provenance, study store, CLI."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from stepsearch.cache import TensorCache
from stepsearch.cli import app
from stepsearch.eval.objective import Objective
from stepsearch.integrations.load import loading_code
from stepsearch.models.source import DenoiserSource
from stepsearch.noise import DiscreteVP
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.dp_job import DPSettings, run_dp_search
from stepsearch.search.job import sortable
from stepsearch.testbeds.gaussian_mixture import GaussianMixture


@pytest.fixture()
def objective(tmp_path):
    noise = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
    mixture = GaussianMixture.random(num_components=3, dim=6, noise=noise, seed=2)
    source = DenoiserSource.of_mixture(mixture, name="mix")
    return Objective(source, "traj", num_samples=32, cache=TensorCache(tmp_path / "cache"))


def test_job_writes_a_schedule_file_scheduler_plot_and_trials(objective, tmp_path):
    out = tmp_path / "out"
    settings = DPSettings(grid_points=16, teacher_samples=32, coeffs=(1.0, 1.15, 1.3))
    result = run_dp_search(objective, "dpm_solver_pp_2m", 4, out, settings=settings, progress=False)
    loaded = ScheduleFile.load(out / "best_schedule.json", noise=objective.source.noise)
    assert loaded.schedule == result.best.result.schedule
    assert loaded.provenance.search["family"] == "dp"
    assert loaded.provenance.scores["held_out"]["value"] == pytest.approx(result.held_out.value)
    assert loaded.provenance.nfe == 4
    assert result.best.score.value == min(c.score.value for c in result.candidates)
    summary = json.loads((out / "result.json").read_text())
    assert set(summary["baselines"]) >= {"trailing", "time_uniform", "logsnr_uniform", "karras"}
    assert summary["held_out"]["search_result"] == pytest.approx(result.held_out.value)
    assert (out / "progress.png").stat().st_size > 1000

    from stepsearch.integrations.diffusers import StepsearchScheduler

    scheduler = StepsearchScheduler.from_pretrained(str(out / "scheduler"))
    assert scheduler.config.custom_times == pytest.approx(
        result.best.result.schedule.times.tolist()
    )
    assert scheduler.config.solver == "dpm_solver_pp_2m"

    storage = f"sqlite:///{out / 'study.sqlite3'}"
    study_name = optuna.get_all_study_summaries(storage)[0].study_name
    schedules = [b.schedule for b in result.baselines] + [
        c.result.schedule for c in result.candidates
    ]
    expected = len({tuple(np.round(s.times, 12)) for s in schedules})  # one schedule, one trial
    assert len(optuna.load_study(study_name=study_name, storage=storage).trials) == expected
    evaluations = objective.evaluations
    again = run_dp_search(objective, "dpm_solver_pp_2m", 4, out, settings=settings, progress=False)
    assert len(optuna.load_study(study_name=study_name, storage=storage).trials) == expected
    assert again.best.result.path == result.best.result.path
    assert objective.evaluations == evaluations + 2  # only the two held-out reports: lookups
    with pytest.raises(ValueError, match="another search"):  # one study, one set of settings
        run_dp_search(objective, "dpm_solver_pp_2m", 4, out, progress=False,
                      settings=DPSettings(grid_points=12, teacher_samples=32))  # fmt: skip


def test_job_refuses_unsupported_solvers(objective, tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        run_dp_search(objective, "dpm_solver_2", 3, tmp_path, progress=False)


def test_cli_on_the_bundled_model(tmp_path):
    out = tmp_path / "dp"
    result = CliRunner().invoke(
        app,
        [
            "search", "dp", "--model", "digits", "--solver", "ddim", "--nfe", "3",
            "--out", str(out), "--storage", str(tmp_path / "s.sqlite3"), "--metric", "traj",
            "--num-samples", "16", "--held-out-samples", "16", "--grid-points", "10",
            "--teacher-samples", "16", "--coeffs", "1.0", "--cache", str(tmp_path / "cache"),
            "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "held-out" in result.output
    assert (out / "best_schedule.json").is_file() and (out / "scheduler").is_dir()
    assert loading_code(out / "scheduler") in result.output.replace("\n", "")
    bad = CliRunner().invoke(app, ["search", "dp", "--solver", "pndm", "--out", str(out),
                                   "--no-progress", "--grid-points", "5",
                                   "--cache", str(tmp_path / "cache")])  # fmt: skip
    assert bad.exit_code == 2 and "not supported" in " ".join(bad.output.split())


def test_sortable_ranks_nan_scores_last():
    values = [3.0, float("nan"), -1.0, 7.0]
    ranked = sorted(values, key=sortable)
    assert ranked[:3] == [-1.0, 3.0, 7.0]
    assert np.isnan(ranked[3])
    assert sortable(float("nan")) == float("inf")
    assert sortable(2.5) == 2.5
