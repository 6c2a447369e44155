"""``stepsearch search autodiffusion`` end to end on the bundled digits model (tiny settings)."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.integrations.diffusers import StepsearchDPMSolverMultistepScheduler
from stepsearch.schedule_file import ScheduleFile

TINY = ["--model", "digits", "--solver", "dpm_solver_pp_2m", "--nfe", "3", "--budget", "5",
        "--metric", "traj", "--num-samples", "8", "--held-out-samples", "8", "--population", "3",
        "--mutations", "1", "--crossovers", "1", "--parents", "2", "--no-progress"]  # fmt: skip


def test_job_writes_its_results_and_a_rerun_resumes(tmp_path):
    runner = CliRunner()
    arguments = [
        "search",
        "autodiffusion",
        *TINY,
        "--out",
        str(tmp_path / "run"),
        "--cache",
        str(tmp_path),
    ]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    out = tmp_path / "run"
    summary = json.loads((out / "result.json").read_text())
    assert len(summary["values"]) == 5 and summary["best"]["search"] == min(summary["values"])
    assert summary["trials_in_study"] == 5 + len(summary["baselines"])  # + the spacings' scores
    assert set(summary["baselines"]) >= {"trailing", "time_uniform", "karras"}
    assert summary["best"]["search"] <= min(summary["baselines"].values())
    loaded = ScheduleFile.load(out / "best_schedule.json")
    assert loaded.provenance.nfe == 3 and loaded.provenance.search["family"] == "autodiffusion"
    assert loaded.provenance.scores["held_out"]["value"] == summary["held_out"]["search_result"]
    scheduler = StepsearchDPMSolverMultistepScheduler.from_pretrained(out / "scheduler")
    assert np.allclose(scheduler.config.custom_times, loaded.schedule.times)
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = runner.invoke(app, arguments)  # the same command: every trial is a lookup
    assert again.exit_code == 0, again.output
    rerun = json.loads((out / "result.json").read_text())
    assert rerun["values"] == summary["values"] and rerun["trials_in_study"] == 5 + 6


def test_bad_input_is_a_usage_error(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["search", "autodiffusion", *TINY, "--out", str(tmp_path), "--solver", "x"]
    )
    assert result.exit_code == 2 and "unknown solver" in result.output
    other = runner.invoke(app, ["search", "autodiffusion", *TINY, "--out", str(tmp_path), "--nfe", "4",
                                "--solver", "heun"])  # fmt: skip
    assert other.exit_code == 2 and "cannot spend exactly 4" in other.output
