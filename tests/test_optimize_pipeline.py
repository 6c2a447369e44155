"""``stepsearch optimize --pipeline`` on a tiny offline Stable Diffusion pipeline (saved to a temp
dir, random weights): the searches run on the guided UNet in latent space, the written scheduler
directories, loaded with ``from_pretrained`` in a fresh process into the pipeline loaded from its
directory, reproduce the report's samples bit for bit on CPU; the schedule file names the pipeline,
the guidance scale and the prompts; Align Your Steps runs on (prompt, image) pairs or is skipped
with a message; bad input is a usage error before anything is written."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_pipeline_source import write_pairs
from tiny_pipeline import IMAGE_SIZE, SD_SCHEDULER_CONFIG, tiny_pipeline

from stepsearch.ays.search import AYSConfig
from stepsearch.cache import TensorCache
from stepsearch.models.pipeline import PipelineModel, load_pipeline, pipeline_digest
from stepsearch.models.source import generate_from_source
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.dp_job import DPSettings
from stepsearch.search.family import FAMILIES
from stepsearch.search.optimize import AYS_NEEDS_DATA, OptimizeSettings, optimize
from stepsearch.search.optimize import candidates as candidates_module
from stepsearch.search.optimize import run as run_module
from stepsearch.solvers import solver_from_json

PROMPTS = ["a cat", "the dog", "an apple on the table"]
GUIDANCE = 2.0
NFE = 4
SETTINGS = OptimizeSettings(
    search_samples=4,
    select_samples=4,
    held_out_samples=4,
    dp_solvers=("dpm_solver_pp_2m",),
    ays_solvers=("dpm_solver_pp_2m",),
    baseline_solvers=("dpm_solver_pp_2m",),
    spacings=("logsnr_uniform", "trailing"),
    dp=DPSettings(grid_points=10, teacher_samples=4, coeffs=(1.15,)),
    ays=AYSConfig(strategy="direct", num_samples=4, max_sweeps=1),
    olss_samples=4,
    grid_rows=1,
    grid_cols=4,
    chunk_size=4,
)

REPLAY = textwrap.dedent(
    """
    import json, sys
    import torch
    import diffusers
    from diffusers import DiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file
    import stepsearch.integrations.diffusers as drop_in
    import stepsearch.integrations.olss as olss
    from stepsearch.models.batches import sample_generator

    torch.set_num_threads(1)
    pipeline_dir, folder = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    expected = load_file(f"{folder}/samples.safetensors")
    with safe_open(f"{folder}/samples.safetensors", "pt") as grid:
        meta = grid.metadata()
    prompts = json.loads(meta["prompts"])
    same = True
    for role, directory in (("winner", "scheduler"), ("baseline", "baseline_scheduler")):
        path = f"{folder}/{directory}"
        name = json.load(open(f"{path}/scheduler_config.json"))["_class_name"]
        cls = next(getattr(m, name) for m in (drop_in, olss, diffusers) if hasattr(m, name))
        pipe.scheduler = cls.from_pretrained(path)
        # image i from the unit noise of sample_generator(seed, i), drawn by the pipeline itself
        generators = [sample_generator(int(meta["seed"]), i) for i in range(len(prompts))]
        images = pipe(prompt=prompts, height=int(meta["height"]), width=int(meta["width"]),
                      guidance_scale=float(meta["guidance_scale"]), generator=generators,
                      num_inference_steps=int(meta[f"steps_{role}"]), output_type="pt").images
        images = (images.float() * 2.0 - 1.0).clamp(-1.0, 1.0)  # the report's [-1, 1] images
        print(role, name, float((images - expected[role]).abs().max()))
        same = same and torch.equal(images, expected[role])
    sys.exit(0 if same else 1)
    """
)


pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SD pipeline saved with ``save_pretrained``, a prompts file, a shared cache."""
    from diffusers import PNDMScheduler

    root = tmp_path_factory.mktemp("optimize_pipeline")
    pipe = tiny_pipeline(root / "build", PNDMScheduler.from_config(SD_SCHEDULER_CONFIG))
    pipe.save_pretrained(root / "sd")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    return {"pipeline": root / "sd", "prompts": root / "prompts.txt", "cache": root / "cache",
            "root": root}  # fmt: skip


@pytest.fixture(scope="module")
def finished(saved: dict[str, Path]) -> tuple[Path, dict[str, Any], str]:
    """``stepsearch optimize --pipeline DIR --prompts FILE --guidance-scale 2 --nfe 4 --methods dp
    ays olss`` (the CLI, with tiny settings in place of :func:`pipeline_settings`)."""
    from typer.testing import CliRunner

    from stepsearch.cli import app
    from stepsearch.cli import optimize as optimize_command

    out = saved["root"] / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "pipeline_settings", lambda: SETTINGS)
        patch.setattr(optimize_command, "pipeline_settings", lambda: SETTINGS)
        patch.setenv("STEPSEARCH_CACHE", str(saved["cache"]))
        patch.setenv("COLUMNS", "200")
        done = CliRunner().invoke(
            app,
            ["optimize", "--pipeline", str(saved["pipeline"]), "--prompts", str(saved["prompts"]),
             "--guidance-scale", str(GUIDANCE), "--nfe", str(NFE), "--methods", "dp", "ays",
             "olss", "--budget-minutes", "30", "--out", str(out)],
        )  # fmt: skip
    assert done.exit_code == 0, done.output
    return out, json.loads((out / "report.json").read_text()), done.output


def test_pipeline_run_selects_on_trajectory_error_and_skips_ays_without_data(finished):
    out, report, output = finished
    assert report["selection"]["metric"] == "traj" and report["report"]["metrics"] == ["traj"]
    assert report["methods"] == ["dp", "olss"]
    assert report["skipped"] == [{"method": "ays", "reason": AYS_NEEDS_DATA}]
    assert "Align Your Steps skipped" in " ".join(output.split())
    assert "Align Your Steps skipped" in (out / "report.md").read_text()
    entry = report["per_nfe"][str(NFE)]
    families = {row["family"] for row in entry["rows"]}
    assert families == {"diffusers", "baseline", "dp", "olss"}
    select = {row["label"]: row["select"]["traj"] for row in entry["rows"]}
    assert select[entry["winner"]] == min(select.values())
    built_in = [row["select"]["traj"] for row in entry["rows"]
                if row["family"] in ("diffusers", "baseline")]  # fmt: skip
    assert select[entry["best_baseline"]] == min(built_in)
    assert not report["partial"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_file_names_the_pipeline_guidance_and_prompts(finished, saved):
    out, report, _ = finished
    entry = report["per_nfe"][str(NFE)]
    digest = pipeline_digest(load_pipeline(saved["pipeline"]))
    prompts = "sha256:" + hashlib.sha256(json.dumps(PROMPTS).encode("utf-8")).hexdigest()
    assert report["model"] == {"name": "sd", "digest": digest}
    assert report["conditioning"]["prompts"] == prompts
    assert report["conditioning"]["guidance_scale"] == GUIDANCE
    fingerprint = json.loads((out / "run.json").read_text())["fingerprint"]
    assert fingerprint["model"]["digest"] == digest
    assert fingerprint["conditioning"]["prompts"] == prompts
    if entry["winner_family"] == "diffusers":
        pytest.skip("a diffusers winner has no schedule file")
    schedule_file = ScheduleFile.load(out / entry["files"]["schedule"])  # run-relative
    provenance = schedule_file.provenance
    assert provenance.model["digest"] == digest
    assert provenance.guidance_scale == GUIDANCE
    assert provenance.resolution == (IMAGE_SIZE, IMAGE_SIZE)
    assert provenance.extra["conditioning"]["prompts"] == prompts
    assert provenance.extra["optimize"]["label"] == entry["winner"]
    assert provenance.nfe == NFE


def test_report_samples_equal_the_source_samples_of_the_winner(finished, saved):
    """The grid made by the written scheduler directory in the pipeline's loop = the winner's
    solver and schedule run directly on the pipeline's guided UNet (PipelineModel as a source), same noise."""
    out, report, _ = finished
    entry = report["per_nfe"][str(NFE)]
    if entry["winner_family"] == "diffusers":
        pytest.skip("a diffusers winner has no stepsearch solver")
    schedule_file = ScheduleFile.load(out / entry["files"]["schedule"])  # run-relative
    solver = solver_from_json(dict(schedule_file.provenance.solver))
    model = PipelineModel(load_pipeline(saved["pipeline"]), PROMPTS, GUIDANCE)
    grid = load_file(str(out / f"nfe-{NFE}" / "samples.safetensors"))["winner"]
    direct = generate_from_source(model, solver, schedule_file.schedule, 4, seed=2)
    assert grid.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and grid.std() > 0.05
    torch.testing.assert_close(grid, direct, rtol=0, atol=2e-4)


def test_scheduler_dirs_reproduce_the_report_samples_in_a_fresh_pipeline(finished, saved):
    out, _, _ = finished
    folder = out / f"nfe-{NFE}"
    with safe_open(str(folder / "samples.safetensors"), "pt") as grid:
        metadata = grid.metadata()
    assert metadata["seed"] == "2" and json.loads(metadata["prompts"]) == PROMPTS + PROMPTS[:1]
    script = saved["root"] / "replay.py"
    script.write_text(REPLAY)
    done = subprocess.run(
        [sys.executable, str(script), str(saved["pipeline"]), str(folder)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert set(lines) == {"winner", "baseline"}
    assert all(line.split()[1] == "0.0" for line in lines.values())


def test_a_rerun_reads_the_finished_stages_and_scores_back(finished, saved, monkeypatch):
    out, report, _ = finished
    grid = load_file(str(out / f"nfe-{NFE}" / "samples.safetensors"))

    def not_again(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(FAMILIES["dp"], "search", not_again)
    monkeypatch.setattr("stepsearch.olss.search.search_olss", not_again)
    monkeypatch.setattr(candidates_module, "generate_from_source", not_again)  # judged.json
    again = optimize(
        None, [NFE], ["dp", "ays", "olss"], 30.0, out, pipeline=saved["pipeline"],
        prompts=saved["prompts"], guidance_scale=GUIDANCE, settings=SETTINGS,
        cache=TensorCache(saved["cache"]), progress=False,
    )  # fmt: skip

    def comparable(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: comparable(v) for k, v in value.items() if k not in ("seconds", "files")}
        return [comparable(v) for v in value] if isinstance(value, list) else value

    assert comparable(again.report) == comparable(report)
    regrid = load_file(str(out / f"nfe-{NFE}" / "samples.safetensors"))
    assert all(torch.equal(regrid[role], grid[role]) for role in ("winner", "baseline"))


def test_changed_guidance_is_another_run(finished, saved):
    out, _, _ = finished
    with pytest.raises(ValueError, match="another optimize run"):
        optimize(
            None, [NFE], ["dp", "olss"], out=out, pipeline=saved["pipeline"],
            prompts=saved["prompts"], guidance_scale=3.0, settings=SETTINGS,
            cache=TensorCache(saved["cache"]), progress=False,
        )  # fmt: skip


@pytest.mark.slow
def test_ays_runs_on_prompt_image_pairs(saved):
    """With ``ays_data``: KLUB on the pairs' VAE latents, each conditioned on its caption; the
    run's fingerprint holds the pairs' digest."""
    pairs = write_pairs(saved["root"] / "pairs", count=3, size=24)
    out = saved["root"] / "run_ays"
    settings = replace(SETTINGS, diffusers_baselines=False, spacings=("logsnr_uniform",))
    result = optimize(
        None, [3], ["ays"], 30.0, out, pipeline=saved["pipeline"], prompts=PROMPTS,
        guidance_scale=GUIDANCE, ays_data=pairs, settings=settings,
        cache=TensorCache(saved["cache"]), progress=False,
    )  # fmt: skip
    assert result.report["skipped"] == []
    rows = {row["family"]: row for row in result.report["per_nfe"]["3"]["rows"]}
    assert set(rows) == {"ays", "baseline"}
    stage = json.loads((out / "nfe-3" / "ays-dpm_solver_pp_2m" / "stage.json").read_text())
    data = json.loads((out / "run.json").read_text())["fingerprint"]["ays_data"]
    assert stage["fingerprint"]["data"] == data and data["latents"].startswith("sha256:")
    schedule = ScheduleFile.load(out / "nfe-3" / "ays-dpm_solver_pp_2m" / "best_schedule.json")
    assert schedule.schedule.num_steps == 3
    assert schedule.provenance.model["digest"] == result.report["model"]["digest"]


def test_pipeline_cli_errors_are_usage_errors(saved, tmp_path):
    from typer.testing import CliRunner

    from stepsearch.cli import app

    runner = CliRunner()
    pipeline, prompts = str(saved["pipeline"]), str(saved["prompts"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    not_a_pipeline = tmp_path / "unet-only"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "config.json").write_text("{}")
    pairs = tmp_path / "no-pairs"
    pairs.mkdir()
    cases = [
        (["--pipeline", pipeline], "--pipeline needs --prompts"),
        (["--pipeline", str(not_a_pipeline), "--prompts", prompts], "has no model_index.json"),
        (["--pipeline", str(tmp_path / "nowhere"), "--prompts", prompts], "does not exist"),
        (["--pipeline", pipeline, "--prompts", str(empty)], "is empty"),
        (["--pipeline", pipeline, "--prompts", str(tmp_path / "none.txt")], "does not exist"),
        (["--prompts", prompts], "goes with --pipeline"),
        (["--guidance-scale", "3"], "model 'digits' is unconditional"),
        (["--model", "digits", "--pipeline", pipeline, "--prompts", prompts], "not both"),
        (["--pipeline", pipeline, "--prompts", prompts, "--methods", "ays"], "cannot run"),
        (["--pipeline", pipeline, "--prompts", prompts, "--guidance-scale", "nan"], "finite"),
        (["--pipeline", pipeline, "--prompts", prompts, "--methods", "gits"], "unknown method"),
        (["--data", str(pairs)], "--data goes with --pipeline"),
        (["--pipeline", pipeline, "--prompts", prompts, "--data", str(pairs)], "metadata.jsonl"),
    ]
    for arguments, message in cases:
        out = tmp_path / "out"
        done = runner.invoke(app, ["optimize", *arguments, "--nfe", "4", "--out", str(out)],
                             env={"COLUMNS": "300"})  # fmt: skip
        assert done.exit_code == 2 and message in " ".join(done.output.split()), (
            arguments,
            done.output,
        )
        assert not out.exists(), arguments
