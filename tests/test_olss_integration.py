"""OLSS end to end: the tiny offline text-to-image pipeline with classifier-free guidance, and the
``stepsearch search olss`` command on the bundled digits model."""

from __future__ import annotations

import json

import pytest
import torch

from stepsearch.cache import TensorCache
from stepsearch.schedule_file import ScheduleFile

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from diffusers import PNDMScheduler
    from tiny_pipeline import SD_SCHEDULER_CONFIG, tiny_pipeline

    from stepsearch.models.pipeline import PipelineModel

    pipe = tiny_pipeline(
        tmp_path_factory.mktemp("tiny"), PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)
    )
    return PipelineModel(pipe, ["a cat", "the dog"], guidance_scale=3.0, name="tiny")


def test_pipeline_olss_beats_dpm_solver_2m_and_runs_in_the_pipeline(text_model, tmp_path):
    from stepsearch.integrations.olss import StepsearchOLSSScheduler
    from stepsearch.models.pipeline import generate_images
    from stepsearch.olss.search import search_olss_pipeline

    result = search_olss_pipeline(
        text_model,
        6,
        num_samples=8,
        held_out_samples=4,
        out=tmp_path,
        cache=TensorCache(tmp_path / "cache"),
    )
    rows = {row["method"]: row for row in result.report["held_out"]}
    olss, baseline = rows["OLSS"]["traj"]["value"], rows["dpm_solver_pp_2m"]["traj"]["value"]
    assert olss < baseline, (olss, baseline)
    assert set(result.fit.candidates) == {"greedy", "uniform", "dp"}
    # the saved scheduler, loaded from disk, runs inside the pipeline and gives the same images
    scheduler = StepsearchOLSSScheduler.from_pretrained(tmp_path / "scheduler")
    assert scheduler.provenance["guidance_scale"] == 3.0 and scheduler.provenance["nfe"] == 6
    again = generate_images(text_model, scheduler, 2, num_inference_steps=6, seed=1, progress=False)
    fitted = StepsearchOLSSScheduler.from_fit(result.fit, text_model.scheduler_config)
    first = generate_images(text_model, fitted, 2, num_inference_steps=6, seed=1, progress=False)
    assert torch.equal(again, first)
    saved = ScheduleFile.load(tmp_path / "olss_schedule.json", noise=text_model.noise)
    assert saved.provenance.solver["name"] == "olss"
    assert saved.provenance.solver["config"]["coefficients"]["coefficients"] == [
        list(row) for row in result.fit.coefficients.coefficients
    ]


def test_search_olss_command_writes_scheduler_schedule_and_report(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stepsearch.cli import app
    from stepsearch.integrations.olss import StepsearchOLSSScheduler

    monkeypatch.setenv("STEPSEARCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "olss"
    arguments = ["search", "olss", "--model", "digits", "--nfe", "4", "--teacher-samples", "16"]
    arguments += ["--held-out-samples", "32", "--teacher-steps", "40", "--out", str(out)]
    outcome = CliRunner().invoke(app, arguments)
    assert outcome.exit_code == 0, outcome.output
    report = json.loads((out / "report.json").read_text())
    methods = [row["method"] for row in report["held_out"]]
    assert methods == ["OLSS", "ddim", "dpm_solver_pp_2m", "unipc_bh2", "reference"]
    assert len(report["fit"]["step_errors"]) == 4 and "fd" in report["held_out"][0]
    assert "| OLSS |" in (out / "report.md").read_text()
    scheduler = StepsearchOLSSScheduler.from_pretrained(out / "scheduler")
    assert scheduler.num_fitted_steps == 4
    load_line = f"StepsearchOLSSScheduler.from_pretrained({json.dumps(str(out / 'scheduler'))})"
    assert load_line in outcome.output.replace("\n", "")
    bad = CliRunner().invoke(
        app, ["search", "olss", "--model", "digits", "--search", "nope", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "search must be one of" in bad.output
