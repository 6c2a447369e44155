"""A text-to-image pipeline as a sample source, on a tiny offline Stable Diffusion pipeline.

Ground truth is diffusers itself: the source's guided denoiser equals the x0 prediction of
diffusers' own DDIM step inside the pipeline, and sampling the source with a stepsearch solver
gives the pipeline's own images with that solver's drop-in scheduler (same noise, same prompts).
The (prompt, image) loader and the VAE encoding are checked against the files and the VAE.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipeline import (
    IMAGE_SIZE,
    LATENT_SIZE,
    SD_SCHEDULER_CONFIG,
    tiny_sdxl_pipeline,
)

from stepsearch.models.pipeline import (
    PipelineModel,
    encode_images,
    generate_images,
    load_prompt_image_pairs,
)
from stepsearch.models.source import SampleSource, generate_from_source
from stepsearch.schedule import make_schedule
from stepsearch.solvers import get_solver

PROMPTS = ["a cat", "the dog", "an apple on the table"]


pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG)
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), scheduler)


def write_pairs(folder: Path, count: int = 3, size: int = IMAGE_SIZE) -> Path:
    """``count`` random RGB images with a ``metadata.jsonl`` of prompts (imagefolder layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        name = f"{index:03d}.png"
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": PROMPTS[index % len(PROMPTS)]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_is_a_sample_source_with_latent_shape_and_identity(pipe):
    source = PipelineModel(pipe, PROMPTS, guidance_scale=3.0)
    assert isinstance(source, SampleSource)
    assert source.sample_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert source.identity.digest.startswith("sha256:")
    assert source.identity == PipelineModel(pipe, PROMPTS).identity
    described = source.describe()
    assert described["guidance_scale"] == 3.0 and described["num_prompts"] == 3


@pytest.mark.parametrize(
    ("kind", "guidance_scale"), [("sd", 1.0), ("sd", 3.0), ("sdxl", 1.0), ("sdxl", 3.0)]
)
def test_denoiser_equals_diffusers_x0_prediction(request, kind, guidance_scale):
    """One DDIM step from t = T to alpha = 1 returns diffusers' own pred_original_sample (SD, and
    SDXL with its pooled-text and size conditioning)."""
    from diffusers import DDIMScheduler

    pipe = request.getfixturevalue("pipe" if kind == "sd" else "sdxl")
    model = PipelineModel(pipe, PROMPTS, guidance_scale=guidance_scale)
    source = model
    scheduler = DDIMScheduler.from_config(
        SD_SCHEDULER_CONFIG, timestep_spacing="trailing", set_alpha_to_one=True
    )
    latents = torch.randn((2, *source.sample_shape), generator=torch.Generator().manual_seed(3))
    with model.using(scheduler):
        theirs = pipe(
            prompt=model.prompts_for([0, 1]),
            latents=latents,
            num_inference_steps=1,
            guidance_scale=guidance_scale,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            output_type="latent",
        ).images
    t = float(source.noise.t_from_timestep(999.0))
    with torch.inference_mode():
        ours = source.denoiser([0, 1])(latents, t)
    assert theirs.abs().max() > 0.1  # x0 at t = T is eps / alpha: float32 round-off x 150
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_samples_equal_the_pipelines_own_images(pipe):
    """Sampling the source with DPM-Solver++(2M) = the pipeline with its drop-in scheduler."""
    from stepsearch.integrations.diffusers import StepsearchDPMSolverMultistepScheduler

    model = PipelineModel(pipe, PROMPTS, guidance_scale=2.5)
    source = model
    schedule = make_schedule(source.noise, 4, "logsnr_uniform")
    solver = get_solver("dpm_solver_pp_2m")
    ours = generate_from_source(source, solver, schedule, 4, seed=5, chunk_size=3)
    scheduler = StepsearchDPMSolverMultistepScheduler.from_config(model.scheduler_config)
    theirs = generate_images(
        model,
        scheduler,
        4,
        sigmas=schedule.to_kdiffusion_sigmas().tolist(),
        seed=5,
        chunk_size=2,
        progress=False,
    )
    assert ours.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and ours.std() > 0.05
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)
    # sample 3 has prompt 0's conditioning: a different prompt gives a different image
    other = PipelineModel(pipe, ["a red car"], guidance_scale=2.5)
    changed = generate_from_source(other, solver, schedule, 1, seed=5)
    assert (changed - ours[:1]).abs().max() > 1e-3


def test_encode_images_is_the_scaled_posterior_mode(pipe):
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    images = images * 2 - 1
    latents = encode_images(pipe, images, batch_size=2)
    with torch.inference_mode():
        mean = pipe.vae.encode(images).latent_dist.mean
    assert latents.shape == (3, 4, LATENT_SIZE, LATENT_SIZE)
    torch.testing.assert_close(latents, mean * pipe.vae.config.scaling_factor, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        encode_images(pipe, images.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        encode_images(pipe, images[:, :1])


def test_prompt_image_pairs_folder(tmp_path):
    folder = write_pairs(tmp_path / "pairs", count=4, size=20)
    pairs = load_prompt_image_pairs(folder, size=(IMAGE_SIZE, IMAGE_SIZE))
    assert pairs.prompts == [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    assert pairs.images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pairs.images.min() >= -1.0 and pairs.images.max() <= 1.0
    exact = load_prompt_image_pairs(folder)  # no resize: the pixels themselves
    pixels = np.asarray(Image.open(folder / "001.png"), dtype=np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(exact.images[1].permute(1, 2, 0).numpy(), pixels, atol=1e-6)


def test_prompt_image_pairs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl"):
        load_prompt_image_pairs(tmp_path)
    folder = write_pairs(tmp_path / "pairs", count=2)
    (folder / "metadata.jsonl").write_text('{"file_name": "000.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: need non-empty"):
        load_prompt_image_pairs(folder)
    (folder / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_prompt_image_pairs(folder)
    (folder / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        load_prompt_image_pairs(folder)


def test_search_ays_on_a_pipeline_with_prompt_image_pairs(pipe, tmp_path, monkeypatch):
    """``stepsearch search ays --pipeline DIR --data PAIRS``: KLUB on the pairs' VAE latents,
    each conditioned on its caption; the schedule file names the pipeline and drives it."""
    from typer.testing import CliRunner

    from stepsearch.ays.search import pipeline_ays_inputs
    from stepsearch.cli import app
    from stepsearch.schedule_file import load_schedule

    monkeypatch.setenv("STEPSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    saved = tmp_path / "sd"
    pipe.save_pretrained(saved)
    pairs = write_pairs(tmp_path / "pairs", count=3, size=24)  # resized to the pipeline's 32
    source, latents = pipeline_ays_inputs(saved, pairs, guidance_scale=2.0)
    assert latents.shape == (3, *source.sample_shape)
    assert source.prompts == PROMPTS and source.describe()["guidance_scale"] == 2.0
    out = tmp_path / "ays.json"
    arguments = ["search", "ays", "--pipeline", str(saved), "--data", str(pairs)]
    arguments += ["--guidance-scale", "2.0", "--nfe", "3", "--strategy", "direct"]
    arguments += ["--samples", "6", "--proxy-samples", "2", "--teacher-steps", "6"]
    arguments += ["--max-sweeps", "2", "--out", str(out)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    provenance = payload["provenance"]
    assert provenance["model"]["digest"] == source.identity.digest
    klub = [
        entry["klub"]
        for entry in provenance["search"]["settings"]["runs"]["direct"]["stages"][0]["history"]
    ]
    assert len(klub) >= 2 and all(b <= a for a, b in itertools.pairwise(klub))
    schedule = load_schedule(out, noise=source.noise)
    assert schedule.num_steps == 3 and schedule.ends_clean
    assert (tmp_path / "ays.png").stat().st_size > 1000
    images = source.decode(torch.zeros(1, *source.sample_shape))
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    missing = CliRunner().invoke(
        app, ["search", "ays", "--pipeline", str(saved), "--out", str(out)]
    )
    assert missing.exit_code == 2 and "metadata.jsonl" in missing.output
