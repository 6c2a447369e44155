"""``stepsearch search ays`` on the bundled digits model (tiny budget)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.models import load_source
from stepsearch.schedule_file import load_schedule


def test_search_ays_writes_a_schedule_file_a_checkpoint_and_a_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "ays.json"
    arguments = ["search", "ays", "--nfe", "3", "--strategy", "direct", "--samples", "4"]
    arguments += ["--proxy-samples", "4", "--teacher-steps", "8", "--max-sweeps", "1"]
    arguments += ["--out", str(out)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "sweep 1: KLUB" in result.output and "accepted" in result.output
    payload = json.loads(out.read_text())
    assert payload["provenance"]["search"]["family"] == "ays"
    assert payload["provenance"]["model"]["name"] == "digits"
    noise = load_source("digits").noise
    schedule = load_schedule(out, noise=noise)
    assert schedule.num_steps == 3 and schedule.ends_clean
    assert (tmp_path / "ays.ckpt.json").exists() and (tmp_path / "ays.png").stat().st_size > 1000
    again = CliRunner().invoke(app, arguments)  # resumes the finished checkpoint: same schedule
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text())["schedule"]["times"] == payload["schedule"]["times"]


def test_search_ays_reports_bad_input_without_a_traceback(tmp_path):
    result = CliRunner().invoke(
        app,
        ["search", "ays", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.json")],
    )
    assert result.exit_code == 2
    assert "Invalid value for '--model'" in result.output and "Traceback" not in result.output
