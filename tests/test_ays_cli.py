"""``stepsearch search ays`` on the bundled digits model (tiny budget)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.integrations.load import load_scheduler, loading_code
from stepsearch.models import load_source
from stepsearch.schedule_file import load_schedule


def test_search_ays_writes_a_schedule_file_a_checkpoint_and_a_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "ays"
    arguments = ["search", "ays", "--nfe", "3", "--strategy", "direct", "--klub-samples", "4"]
    arguments += ["--num-samples", "4", "--held-out-samples", "4", "--teacher-steps", "8"]
    arguments += ["--max-sweeps", "1", "--out", str(out)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "sweep 1: KLUB" in result.output and "accepted" in result.output
    payload = json.loads((out / "best_schedule.json").read_text())
    assert payload["provenance"]["search"]["family"] == "ays"
    assert payload["provenance"]["model"]["name"] == "digits"
    assert payload["provenance"]["scores"]["held_out"]["num_samples"] == 4
    noise = load_source("digits").noise
    schedule = load_schedule(out / "best_schedule.json", noise=noise)
    assert schedule.num_steps == 3 and schedule.ends_clean
    assert (out / "ays.ckpt.json").exists() and (out / "progress.png").stat().st_size > 1000
    scheduler = load_scheduler(out / "scheduler")  # the drop-in replays the schedule
    assert type(scheduler).__name__ == "StepsearchDPMSolverMultistepScheduler"
    assert loading_code(out / "scheduler") in result.output.replace("\n", "")
    again = CliRunner().invoke(app, arguments)  # resumes the finished checkpoint: same schedule
    assert again.exit_code == 0, again.output
    assert (
        json.loads((out / "best_schedule.json").read_text())["schedule"]["times"]
        == (payload["schedule"]["times"])
    )


def test_search_ays_old_flags_and_schedule_file_still_work(tmp_path, monkeypatch):
    """Deprecated spellings: ``--samples`` / ``--proxy-samples`` and ``--out FILE.json`` (the
    schedule file itself, checkpoint and plot beside it) work and warn."""
    monkeypatch.setenv("STEPSEARCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ays.json"
    arguments = ["search", "ays", "--nfe", "3", "--strategy", "direct", "--samples", "4"]
    arguments += ["--proxy-samples", "4", "--held-out-samples", "4", "--teacher-steps", "8"]
    arguments += ["--max-sweeps", "1", "--no-progress", "--out", str(out)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    for old, new in (("--samples", "--klub-samples"), ("--proxy-samples", "--num-samples")):
        assert f"{old} is deprecated; use {new}" in result.output
    assert "--out FILE.json is deprecated" in result.output
    assert "sweep 1" not in result.output  # --no-progress
    schedule = load_schedule(out, noise=load_source("digits").noise)
    assert schedule.num_steps == 3
    assert (tmp_path / "ays.ckpt.json").exists() and (tmp_path / "ays.png").exists()
    assert not (tmp_path / "scheduler").exists()


def test_search_ays_reports_bad_input_without_a_traceback(tmp_path):
    result = CliRunner().invoke(
        app,
        ["search", "ays", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.json")],
    )
    assert result.exit_code == 2
    assert "Invalid value for '--model'" in result.output and "Traceback" not in result.output
