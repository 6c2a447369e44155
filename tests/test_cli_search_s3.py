"""``stepsearch search s3`` end to end on the bundled digits model (tiny settings): the plan file
with provenance, a plan scheduler directory that replays it, result.json with the predictor's
picks, progress.png, and a rerun that is all lookups."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.integrations.plan_scheduler import StepsearchPlanScheduler
from stepsearch.plan import SolverPlan
from stepsearch.schedule_file import ScheduleFile

TINY = ["--model", "digits", "--nfe", "3", "--budget", "12", "--metric", "traj",
        "--num-samples", "8", "--held-out-samples", "8", "--proposals", "3", "--explore", "1",
        "--no-progress"]  # fmt: skip


def test_s3_job_writes_a_plan_a_replaying_scheduler_and_resumes(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    arguments = ["search", "s3", *TINY, "--out", str(out), "--cache", str(tmp_path)]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    assert "best plan at NFE 3" in first.output and "prediction" in first.output
    summary = json.loads((out / "result.json").read_text())
    assert summary["family"] == "s3" and summary["solver"] == "plan"
    # two evolutions of 12 (the second's seeds looked up): the study's distinct plans
    assert 12 < summary["evaluated"] < 24 and summary["predictor_picks"]
    assert summary["evaluated"] + len(summary["baselines"]) == summary["trials_in_study"]
    assert summary["restarts"] == 2
    assert {plan["restart"] for plan in summary["selection"]["plans"]} <= {0, 1}
    # (a starting point adopted into the plan space has its times rounded to 1e-6)
    assert summary["best"]["search"] <= min(summary["baselines"].values()) * (1 + 1e-5)
    loaded = ScheduleFile.load(out / "best_schedule.json")
    assert loaded.is_plan and isinstance(loaded.candidate, SolverPlan)
    assert loaded.candidate.nfe == 3 and loaded.provenance.search["family"] == "s3"
    assert loaded.provenance.solver["name"] == "plan"
    assert "data_mean" in loaded.provenance.solver["config"]  # the digits data's mean
    assert loaded.provenance.prediction_type == "v_prediction"
    # the default: the first time searched
    assert loaded.provenance.search["settings"]["free_start"] is True
    assert loaded.provenance.search["settings"]["proxy"] is True  # the predictor's proxy feature
    scheduler = StepsearchPlanScheduler.from_pretrained(out / "scheduler")
    assert scheduler.plan.to_json_dict() == loaded.candidate.to_json_dict()
    assert scheduler.config.prediction_type == "v_prediction"
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = runner.invoke(app, arguments)  # the same command: every trial is a lookup
    assert again.exit_code == 0, again.output
    rerun = json.loads((out / "result.json").read_text())
    assert rerun["values"] == summary["values"] and rerun["best"] == summary["best"]
    assert rerun["trials_in_study"] == summary["trials_in_study"]


def test_s3_refuses_a_zero_budget(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["search", "s3", *TINY, "--out", str(tmp_path), "--budget", "0"])
    assert bad.exit_code == 2 and "--budget" in bad.output


def test_a_fixed_start_search_without_the_proxy_keeps_every_plan_at_the_largest_time(tmp_path):
    out = tmp_path / "fixed"
    arguments = ["search", "s3", *TINY, "--out", str(out), "--cache", str(tmp_path)]
    result = CliRunner().invoke(app, [*arguments, "--fixed-start", "--no-proxy"])
    assert result.exit_code == 0, result.output
    loaded = ScheduleFile.load(out / "best_schedule.json")
    assert loaded.provenance.search["settings"]["free_start"] is False
    assert loaded.provenance.search["settings"]["proxy"] is False
    assert loaded.candidate.schedule.times[0] == loaded.candidate.schedule.noise.t_max


def test_the_pick_rule_is_a_setting_and_a_bad_one_a_clear_error(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["search", "s3", *TINY, "--out", str(tmp_path), "--pick", "top"])
    assert bad.exit_code != 0 and "pick must be one of" in bad.output
    assert not (tmp_path / "best_schedule.json").exists()
    out = tmp_path / "best"
    arguments = ["search", "s3", *TINY, "--out", str(out), "--cache", str(tmp_path)]
    result = runner.invoke(app, [*arguments, "--pick", "best"])
    assert result.exit_code == 0, result.output
    loaded = ScheduleFile.load(out / "best_schedule.json")
    assert loaded.provenance.search["settings"]["pick"] == "best"
