"""``stepsearch optimize --guidance-schedule search|FILE`` on the bundled class-conditional digits
model at a tiny budget: the searched (or given) guidance schedule is the one every sampler of the
run uses, the report's ``guidance`` section is the guidance search's own held-out numbers, a rerun
reads the search back, and what does not fit is refused before anything is written."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from typer.testing import CliRunner

from stepsearch.cache import TensorCache
from stepsearch.cli import app
from stepsearch.guidance import GuidanceSchedule, load_guidance
from stepsearch.models import load_model
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.guidance import GuidanceSearchSettings
from stepsearch.search.optimize import OptimizeSettings, optimize
from stepsearch.search.optimize.forecast import forecast

SETTINGS = OptimizeSettings(
    search_samples=16,
    select_samples=24,
    held_out_samples=24,
    baseline_solvers=("unipc_bh2",),
    spacings=("logsnr_uniform",),
    olss_samples=16,
)
GUIDANCE = GuidanceSearchSettings(trials=5, constant_weights=(1.0, 2.0), select_trials=2)


def _run(out, tmp_path, **kwargs):
    return optimize(
        "digits-cond", [4], ["olss"], 30.0, out, settings=SETTINGS,
        cache=TensorCache(tmp_path / "cache"), progress=False, **kwargs,
    )  # fmt: skip


@pytest.mark.slow
def test_a_searched_guidance_schedule_is_what_every_sampler_of_the_run_uses(tmp_path):
    out = tmp_path / "run"
    result = _run(out, tmp_path, guidance_schedule="search", guidance_settings=GUIDANCE)
    report = result.report
    picked = load_guidance(out / "guidance" / "guidance.json")
    summary = json.loads((out / "guidance" / "result.json").read_text())
    # the search ran at twice the largest NFE in passes, on the run's seeds and sample counts
    assert summary["unet_passes"] == 8 and summary["seeds"] == {
        "search": 0, "select": 1, "held_out": 2,
    }  # fmt: skip
    assert summary["held_out"]["pick"]["num_samples"] == SETTINGS.held_out_samples
    assert len(summary["trials"]) == GUIDANCE.trials
    # the run's model is guided by the pick: the conditioning, the winner's schedule file
    wanted = {"shape": picked.shape, "parameters": dict(picked.parameters)}
    assert report["conditioning"]["guidance_schedule"] == wanted
    searched = ScheduleFile.load(out / "nfe-4" / "olss-olss" / "best_schedule.json")
    assert searched.provenance.objective["source"]["guidance_schedule"] == wanted
    # guided by a schedule, not one scale: the file says so at the top level
    assert searched.provenance.guidance_scale is None
    assert searched.provenance.extra["guidance_schedule"] == wanted
    # what it bought: the guidance search's own report-seed numbers
    entry = report["guidance"]
    assert entry["origin"] == "search" and entry["schedule"] == picked.describe()
    assert entry["held_out"]["pick"] == summary["held_out"]["pick"]
    assert entry["held_out"]["constant w=2"] == summary["held_out"]["constant w=2"]
    text = (out / "report.md").read_text()
    assert picked.describe() in text and "What it bought" in text

    # a rerun reads the search back: no new trial, the same report
    again = _run(out, tmp_path, guidance_schedule="search", guidance_settings=GUIDANCE)
    url = f"sqlite:///{out / 'guidance' / 'study.sqlite3'}"
    (name,) = optuna.get_all_study_names(url)
    assert len(optuna.load_study(study_name=name, storage=url).trials) == GUIDANCE.trials
    assert again.report["guidance"] == entry
    assert again.report["per_nfe"] == report["per_nfe"]


@pytest.mark.slow
def test_a_guidance_file_is_used_as_given_and_other_models_files_are_refused(tmp_path):
    schedule = GuidanceSchedule.interval(2.5, 0.3, 5.0)
    path = tmp_path / "guidance.json"
    schedule.save(path)
    out = tmp_path / "run"
    result = _run(out, tmp_path, guidance_schedule=path)
    wanted = {"shape": "interval", "parameters": dict(schedule.parameters)}
    assert result.report["conditioning"]["guidance_schedule"] == wanted
    assert result.report["guidance"] == {
        "origin": "file", "schedule": schedule.describe(), "file": str(path),
    }  # fmt: skip
    # the same file is the same run; another schedule is another run
    rerun = _run(out, tmp_path, guidance_schedule=path)
    assert rerun.report["per_nfe"] == result.report["per_nfe"]
    other = tmp_path / "other.json"
    GuidanceSchedule.constant(3.0).save(other)
    with pytest.raises(ValueError, match="another optimize run"):
        _run(out, tmp_path, guidance_schedule=other)

    foreign = schedule.with_provenance(model=load_model("digits").identity.to_json_dict())
    foreign_path = tmp_path / "foreign.json"
    foreign.save(foreign_path)
    with pytest.raises(ValueError, match="searched for another model"):
        _run(tmp_path / "never", tmp_path, guidance_schedule=foreign_path)
    assert not (tmp_path / "never").exists()


def test_what_does_not_fit_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"unconditional|no guidance"):
        optimize("digits", [4], ["olss"], 30.0, tmp_path / "a", guidance_schedule="search",
                 settings=SETTINGS, progress=False)  # fmt: skip
    assert not (tmp_path / "a").exists()
    # at the CLI's boundary: neither `search` nor a loadable file (a NaN weight)
    bad = tmp_path / "bad.json"
    data = GuidanceSchedule.constant(2.0).to_json()
    data["parameters"]["weight"] = math.nan
    bad.write_text(json.dumps(data))
    for value, message in ((str(bad), "NaN"), (str(tmp_path / "none.json"), "neither")):
        out = str(tmp_path / "b")
        arguments = ["optimize", "--model", "digits-cond", "--guidance-schedule", value, "--out"]
        result = CliRunner().invoke(app, [*arguments, out])
        assert result.exit_code == 2, result.output
        assert "--guidance-schedule" in result.output and message in result.output
    assert not (tmp_path / "b").exists()


def test_the_dry_run_forecasts_the_guidance_search():
    planned = forecast(
        "digits-cond", [4], ["olss"], 30.0, settings=SETTINGS, guidance_schedule="search"
    )
    stage = planned.stages[0]
    assert stage.phase == "guidance" and stage.trials == GuidanceSearchSettings().trials
    constants = len(GuidanceSearchSettings().constant_weights)
    select = GuidanceSearchSettings().select_trials
    samples = (
        60 * SETTINGS.search_samples
        + (constants + select) * SETTINGS.select_samples
        + (constants + 1) * SETTINGS.held_out_samples
    )
    assert stage.evaluations == samples * 4  # the constant curve's 4 guided steps at 8 passes


@pytest.mark.slow
def test_with_a_study_store_the_guidance_search_is_one_task_of_the_run(tmp_path):
    storage = tmp_path / "store.sqlite3"
    out = tmp_path / "run"
    result = _run(
        out, tmp_path, guidance_schedule="search", guidance_settings=GUIDANCE,
        storage=storage, budget_evals=10_000, worker_name="w",
    )  # fmt: skip
    url = f"sqlite:///{storage}"
    names = [n for n in optuna.get_all_study_names(url) if n.startswith("optimize-")]
    (study,) = [optuna.load_study(study_name=n, storage=url) for n in names]
    tasks = {t.user_attrs["key"]: t for t in study.get_trials() if t.state.name == "COMPLETE"}
    assert "guidance" in tasks and tasks["guidance"].user_attrs["worker"]["id"] == "w"
    files = tasks["guidance"].user_attrs["result"]["files"]
    assert json.loads(files["guidance/result.json"]) == json.loads(
        (out / "guidance" / "result.json").read_text()
    )
    assert result.report["guidance"]["origin"] == "search"
