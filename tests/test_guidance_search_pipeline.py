"""The guidance-schedule search (``stepsearch search guidance``) on a text-to-image pipeline: the
tiny offline Stable Diffusion of ``tests/tiny_pipeline.py``, judged by FID (a scripted stand-in
for the Inception file) and by the CLIP score of a tiny random CLIP.

Ground truth: the CLIP and FD scores the search reports are what
:class:`~stepsearch.eval.clip_score.ClipScorer` and the FD reference give on the same samples
made again outside the search; the pick obeys its rule on the CLIP judge; the files name the
judge; the CLI refuses a pipeline without its judges, naming the option.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tiny_pipeline import IMAGE_SIZE, save_stub_inception, save_tiny_clip
from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.eval.clip_score import ClipScorer
from stepsearch.eval.features import INCEPTION_FILENAME, InceptionFeatures
from stepsearch.eval.scoring import distance_scores
from stepsearch.guidance import load_guidance
from stepsearch.models import load_model
from stepsearch.models.pipeline import PipelineModel
from stepsearch.models.source import generate_from_source
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.guidance import (
    GuidanceSearchSettings,
    pipeline_judges,
    search_guidance,
    selection_pool,
    steps_for_budget,
)
from stepsearch.solvers import get_solver

PROMPTS = ["a cat", "the dog", "an apple on the table"]
FEATURES = 24
"""Features of the stand-in Inception: a Fréchet distance in 2048 dimensions costs seconds on one
core, so the stand-in's 24 informative features are all it gives."""

pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME
    return save_stub_inception(path, num_features=FEATURES)


@pytest.fixture
def small_inception(monkeypatch: pytest.MonkeyPatch) -> None:
    """InceptionFeatures reads the stand-in's 24 features (see :data:`FEATURES`)."""
    monkeypatch.setattr(InceptionFeatures, "num_features", FEATURES)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight random 32x32 RGB reference images."""
    directory = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for index in range(8):
        pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{index:02d}.png")
    return directory


TINY = GuidanceSearchSettings(
    trials=4, constant_weights=(1.0, 2.0), weight_range=(1.0, 3.0), select_trials=2
)


@pytest.mark.usefixtures("small_inception")
def test_pipeline_search_picks_on_clip_and_reports_what_the_judges_give(
    pipe, clip_dir, inception_file, reference_dir, tmp_path
):
    clip_scorer, fd_reference = pipeline_judges(clip_dir, reference_dir, inception_file)
    model = PipelineModel(pipe, PROMPTS, guidance_scale=2.0, name="tiny-sd")
    solver = get_solver("dpm_solver_pp_2m")
    result = search_guidance(
        model, solver, 6, tmp_path, settings=TINY, num_samples=4, select_samples=5,
        held_out_samples=6, clip_scorer=clip_scorer, fd_reference=fd_reference, chunk_size=4,
    )  # fmt: skip
    assert result.condition_judge == "clip"
    assert len(result.trials) == 4 and all(t.score.passes <= 6 for t in result.trials)
    scores = [t.score for t in result.trials] + [
        *result.selection.values(),
        *result.held_out.values(),
    ]
    assert {s.judge for s in scores} == {"clip"}
    with pytest.raises(AttributeError, match="judged by clip"):
        _ = scores[0].accuracy

    # the rule, on the selection seed: lowest FD among the pool's trials whose CLIP score is at
    # least constant w=2's (the model's guidance scale)
    reference = result.reference
    assert reference.candidate.guidance.parameters["weight"] == 2.0
    pool = selection_pool(result.trials, [t for t in result.trials if t.origin == "constant"], 2)
    assert sorted(result.selection) == [t.number for t in pool]
    floor = result.selection[reference.number].condition
    eligible = [n for n, score in result.selection.items() if score.condition >= floor]
    assert result.selection[result.pick.number].fd == min(result.selection[n].fd for n in eligible)
    assert result.selection[result.pick.number].condition >= floor

    # the held-out scores are the judges' own on the same samples, made again here
    pick = result.pick.candidate
    grid, passes = steps_for_budget(pick.guidance, model.noise, solver, 6, pick.rho)
    guided = model.with_options(guidance_schedule=pick.guidance)
    samples = generate_from_source(guided, solver, grid, 6, seed=1, chunk_size=6)
    held_out = result.held_out["pick"]
    per_sample = clip_scorer.scores(samples, model.prompts_for(range(6)))
    assert held_out.condition == pytest.approx(clip_scorer(samples, model.prompts_for(range(6))),
                                               rel=1e-6, abs=1e-6)  # fmt: skip
    assert held_out.condition_std == pytest.approx(float(per_sample.std()) / math.sqrt(6), rel=1e-5)
    fd = distance_scores(samples, {"fd": fd_reference})["fd"][0]
    assert held_out.fd == pytest.approx(fd, rel=1e-5) and held_out.passes == passes

    # the files name the judge
    guidance = load_guidance(tmp_path / "guidance.json")
    provenance = guidance.provenance
    assert provenance["judges"]["condition"]["name"] == "clip"
    assert provenance["judges"]["condition"]["model"]["digest"].startswith("sha256:")
    assert provenance["judges"]["quality"]["features"] == "InceptionFeatures"
    assert "CLIP score >= constant w=2's" in provenance["pick_rule"]
    assert provenance["scores"]["held_out"]["clip"] == held_out.condition
    assert "accuracy" not in provenance["scores"]["held_out"]
    schedule_file = ScheduleFile.load(tmp_path / "best_schedule.json")
    assert schedule_file.provenance.objective["judges"] == ["fd", "clip"]
    assert schedule_file.provenance.extra["judges"] == provenance["judges"]
    summary = json.loads((tmp_path / "result.json").read_text())
    assert summary["pick"]["trial"] == result.pick.number and "clip" in summary["pick"]
    assert summary["held_out"]["pick"]["clip_std"] == held_out.condition_std


def test_pipeline_search_needs_its_judges(pipe, clip_dir, tmp_path):
    model = PipelineModel(pipe, PROMPTS, guidance_scale=2.0)
    with pytest.raises(ValueError, match="CLIP score"):
        search_guidance(model, "ddim", 6, tmp_path)
    clip = ClipScorer.from_pretrained(clip_dir, local_files_only=True)
    with pytest.raises(ValueError, match="no feature network and reference data"):
        search_guidance(model, "ddim", 6, tmp_path, clip_scorer=clip)
    with pytest.raises(ValueError, match="leave the CLIP model out"):
        search_guidance(load_model("digits-cond"), "ddim", 6, tmp_path, clip_scorer=clip)
    with pytest.raises(ValueError, match="--clip-model"):
        pipeline_judges(None, tmp_path)
    with pytest.raises(ValueError, match="--reference-stats"):
        pipeline_judges(clip_dir, None)


def _invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200"})


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.mark.usefixtures("small_inception")
def test_cli_search_guidance_on_a_pipeline(
    pipeline_dir, prompts_file, clip_dir, inception_file, reference_dir, tmp_path
):
    out = tmp_path / "out"
    result = _invoke(
        "search", "guidance", "--pipeline", pipeline_dir, "--prompts", prompts_file,
        "--clip-model", clip_dir, "--inception-weights", inception_file,
        "--reference-stats", reference_dir, "--guidance-scale", "2", "--nfe", "6",
        "--budget", "3", "--constant-weights", "1", "--constant-weights", "2",
        "--max-weight", "3", "--shapes", "constant", "--shapes", "interval",
        "--num-samples", "3", "--select-samples", "3", "--held-out-samples", "4",
        "--no-progress", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "picked" in result.output and "held-out constant w=2" in result.output
    assert "CLIP score" in result.output and "accuracy" not in result.output
    assert ".from_pretrained(" in result.output  # the line that loads its scheduler
    guidance = load_guidance(out / "guidance.json")
    assert guidance.provenance["judges"]["condition"]["name"] == "clip"
    assert guidance.provenance["model"]["name"] == pipeline_dir.name
    assert guidance.provenance["unet_passes"] == 6

    # the reported held-out CLIP score is the scorer's on the pick's samples, made again
    clip_scorer, _ = pipeline_judges(clip_dir, reference_dir, inception_file)
    model = load_model(pipeline=pipeline_dir, prompts=prompts_file, guidance_scale=2.0)
    solver = get_solver("dpm_solver_pp_2m")
    rho = guidance.provenance["rho"]
    grid, _ = steps_for_budget(guidance, model.noise, solver, 6, rho)
    samples = generate_from_source(
        model.with_options(guidance_schedule=guidance), solver, grid, 4, seed=1
    )
    expected = clip_scorer(samples, model.prompts_for(range(4)))
    summary = json.loads((out / "result.json").read_text())
    assert summary["held_out"]["pick"]["clip"] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_cli_refuses_a_pipeline_without_its_judges(
    pipeline_dir, prompts_file, clip_dir, reference_dir, tmp_path
):
    base = ["search", "guidance", "--out", tmp_path / "x", "--no-progress"]
    pipeline = ["--pipeline", pipeline_dir, "--prompts", prompts_file]
    cases = [
        ([*pipeline, "--reference-stats", reference_dir], "pass --clip-model DIR"),
        ([*pipeline, "--clip-model", clip_dir], "pass --reference-stats PATH"),
        (["--pipeline", pipeline_dir, "--clip-model", clip_dir], "needs --prompts FILE"),
        (["--clip-model", clip_dir], "--clip-model: for a text-to-image search"),
        ([*pipeline, "--model", "digits", "--clip-model", clip_dir], "not both"),
        # refused while the command line is parsed (the shared option types)
        ([*pipeline, "--clip-model", tmp_path], "the CLIP model's config.json is missing"),
        ([*pipeline, "--inception-weights", tmp_path], "has no inception-2015-12-05.pt"),
        ([*pipeline, "--reference-stats", tmp_path / "absent.npz"], "does not exist"),
    ]
    for extra, message in cases:
        result = _invoke(*base, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in _flat(result.output), (message, result.output)
