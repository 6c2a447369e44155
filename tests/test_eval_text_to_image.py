"""Text-to-image evaluation on a tiny offline Stable Diffusion pipeline: identical methods give
identical images and scores, images do not depend on the batch size, the ``eval`` CLI with
``--pipeline`` writes CLIP / FID tables, ``stepsearch stats`` round-trips, and usage errors are
clear. A tiny random CLIP and a scripted stand-in for the Inception file keep everything offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_pipeline import IMAGE_SIZE, save_stub_inception, save_tiny_clip
from typer.testing import CliRunner

from stepsearch.cli import app
from stepsearch.eval import ClipScorer, FeatureStatistics, InceptionFeatures, ensure_features
from stepsearch.eval.experiment import run_experiment
from stepsearch.eval.features import INCEPTION_FILENAME
from stepsearch.eval.images import iter_image_batches
from stepsearch.models import Method, load_image_model
from stepsearch.models.pipeline import (
    PipelineModel,
    generate_images,
    read_prompts,
)
from stepsearch.schedule import StepSchedule

PROMPTS = ["a cat", "the dog", "an apple on the table"]


pytestmark = pytest.mark.usefixtures("_one_thread")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(["", PROMPTS[0], "   ", f"  {PROMPTS[1]}  ", PROMPTS[2], ""]))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight CLIP (32x32 images) saved like a real one."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_stub_inception(tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven 32x32 reference images: six RGB PNGs and one grey JPEG."""
    directory = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for index in range(6):
        pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{index:02d}.png")
    grey = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    Image.fromarray(grey).save(directory / "06.jpg", quality=95)
    return directory


def _ddim_pair(model: PipelineModel, nfe: int) -> list[Method]:
    """stepsearch DDIM replaying diffusers' DDIM timesteps (leading, steps_offset 1, final step to
    alphas_cumprod[0]) and diffusers' DDIMScheduler itself: the same sampler, twice."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(model.scheduler_config, clip_sample=False)
    ddim.set_timesteps(nfe)
    timesteps = ddim.timesteps.numpy().astype(np.float64)
    schedule = StepSchedule.from_diffusers_timesteps(model.noise, timesteps, final="t_min")
    return [
        Method.stepsearch("ddim", schedule.with_metadata(name="diffusers DDIM timesteps")),
        Method.diffusers("DDIMScheduler", clip_sample=False),
    ]


def test_identical_methods_give_identical_images_and_scores(pipe, clip_dir):
    model = PipelineModel(pipe, PROMPTS, guidance_scale=3.0)
    scorer = ClipScorer.from_pretrained(clip_dir, local_files_only=True)
    images: dict[str, torch.Tensor] = {}
    tables = run_experiment(
        model,
        _ddim_pair(model, 4),
        [4],
        ["clip", "traj"],
        num_samples=4,
        clip_scorer=scorer,
        chunk_size=3,
        on_samples=lambda method, nfe, x: images.__setitem__(method.label, x),
        reference_steps=20,
    )
    ours, theirs = images.values()
    assert ours.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and ours.dtype == torch.float32
    assert ours.min() >= -1.0 and ours.max() <= 1.0 and ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    clip, traj = tables["clip"], tables["traj"]
    assert not clip.lower_is_better and traj.lower_is_better
    first, second = (clip.value(label, 4) for label in images)
    assert first == pytest.approx(second, abs=1e-6) and 0.0 <= first <= 100.0
    assert first == pytest.approx(scorer(ours, [*PROMPTS, PROMPTS[0]]), abs=1e-9)
    assert traj.value(clip.methods[0], 4) == pytest.approx(traj.value(clip.methods[1], 4), abs=1e-5)
    assert {cell.num_steps for cell in clip.cells} == {4}
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # the pipeline's own is put back


def test_images_do_not_depend_on_batch_size(pipe):
    from stepsearch.integrations.diffusers import StepsearchDPMSolverMultistepScheduler

    model = PipelineModel(pipe, PROMPTS, guidance_scale=2.0)
    method = Method.stepsearch("dpm_solver_pp_2m", "logsnr_uniform")
    by_one, steps = method.run(model, 3, num_samples=4, seed=5, chunk_size=1)
    by_three, _ = method.run(model, 3, num_samples=4, seed=5, chunk_size=3)
    assert steps == 3
    torch.testing.assert_close(by_one, by_three, rtol=0, atol=1e-5)
    assert (by_one[0] - by_one[3]).abs().max() > 1e-2  # same prompt, different noise
    # An explicit call with the same schedule's sigmas gives the same images.
    scheduler = StepsearchDPMSolverMultistepScheduler.from_config(model.scheduler_config)
    sigmas = method.schedule_on(model.noise, 3).to_kdiffusion_sigmas()
    direct = generate_images(model, scheduler, 2, sigmas=sigmas, seed=5, progress=False)
    torch.testing.assert_close(direct, by_one[:2], rtol=0, atol=1e-5)
    # Heun with a clean end spends 2n - 1 evaluations: no step count spends exactly 2.
    assert Method.stepsearch("heun", "karras").run(model, 2, num_samples=2, seed=0) is None


def _invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def _flat(text: str) -> str:
    """The output on one line, without the error panel's borders."""
    return " ".join(text.replace("│", " ").split())


def _t2i_args(
    pipeline_dir: Path, prompts_file: Path, out: Path, baseline: bool = True
) -> list[str | Path]:
    return [
        "eval",
        "--pipeline", pipeline_dir,
        "--prompts", prompts_file,
        "--solvers", "ddim",
        "--schedules", "trailing",
        *(["--baselines", "DDIMScheduler"] if baseline else []),
        "--nfe", "2",
        "--num-samples", "4",
        "--chunk-size", "2",
        "--guidance-scale", "2.0",
        "--out", out,
    ]  # fmt: skip


def test_eval_cli_clip(pipeline_dir, prompts_file, clip_dir, tmp_path):
    out = tmp_path / "clip"
    args = _t2i_args(pipeline_dir, prompts_file, out)
    result = _invoke(*args, "--metric", "clip", "--clip-model", clip_dir)
    assert result.exit_code == 0, result.output
    for name in ("results_clip.json", "results_clip.md", "results_clip.png", "summary.md"):
        assert (out / name).is_file(), name
    assert (out / "samples_nfe2.png").read_bytes()[:4] == b"\x89PNG"
    payload = json.loads((out / "results_clip.json").read_text())
    assert payload["metric"] == "clip" and payload["lower_is_better"] is False
    assert payload["num_prompts"] == 3 and payload["guidance_scale"] == 2.0
    values = {cell["method"]: cell["value"] for cell in payload["cells"]}
    assert set(values) == {"diffusers DDIMScheduler", "stepsearch ddim / trailing"}
    assert all(0.0 <= value <= 100.0 for value in values.values())
    best = max(values, key=values.__getitem__)
    assert f"| {best} | **" in (out / "results_clip.md").read_text()  # the largest is best


def test_eval_cli_fid_and_stats_round_trip(
    pipeline_dir, prompts_file, inception_file, reference_dir, tmp_path
):
    stats_path = tmp_path / "reference.npz"
    result = _invoke(
        "stats", reference_dir, "--out", stats_path, "--inception-weights", inception_file
    )
    assert result.exit_code == 0, result.output
    saved = FeatureStatistics.load(stats_path)
    extractor = InceptionFeatures(inception_file)
    features = ensure_features(iter_image_batches(reference_dir, 4, False), extractor)
    assert saved.n == 7 and features.shape == (7, 2048)
    np.testing.assert_allclose(saved.mu, features.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(saved.sigma, np.cov(features, rowvar=False), atol=1e-12)

    # One method per run: a Fréchet distance in 2048 dimensions costs seconds on one core.
    args = _t2i_args(pipeline_dir, prompts_file, tmp_path / "from_npz", baseline=False)
    inception = ["--inception-weights", inception_file]
    result = _invoke(*args, "--metric", "fid", *inception, "--reference-stats", stats_path,
                     "--save-samples")  # fmt: skip
    assert result.exit_code == 0, result.output
    from_npz = json.loads((tmp_path / "from_npz" / "results_fid.json").read_text())
    assert from_npz["lower_is_better"] is True and len(from_npz["cells"]) == 1

    # The folder itself as reference: the same FID; KID needs images, so it works here.
    args = _t2i_args(pipeline_dir, prompts_file, tmp_path / "from_dir", baseline=False)
    result = _invoke(
        *args, "--metric", "fid", "--metric", "kid", *inception, "--reference-stats", reference_dir
    )
    assert result.exit_code == 0, result.output
    from_dir = json.loads((tmp_path / "from_dir" / "results_fid.json").read_text())
    for a, b in zip(from_npz["cells"], from_dir["cells"], strict=True):
        assert a["method"] == b["method"] and a["value"] == pytest.approx(b["value"], rel=1e-9)
        assert a["value"] > 0.0
    assert (tmp_path / "from_dir" / "results_kid.json").is_file()

    # stats of saved samples (.safetensors) equal the statistics of those images.
    samples_file = tmp_path / "from_npz" / "samples" / "stepsearch_ddim_trailing_nfe2.safetensors"
    samples = load_file(samples_file)["samples"]
    assert samples.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    result = _invoke("stats", samples_file, "--out", tmp_path / "samples.npz",
                     *inception)  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = FeatureStatistics.from_features(ensure_features(samples, extractor))
    np.testing.assert_allclose(FeatureStatistics.load(tmp_path / "samples.npz").mu, expected.mu)


def test_unconditional_fid_keeps_fd(inception_file, tmp_path):
    """``--metric fid`` for an unconditional model: Inception space; ``fd`` stays FD-digits."""
    from stepsearch.testbeds import digits

    real = tmp_path / "real.safetensors"
    save_file({"images": digits.real_images()[:64].contiguous()}, str(real))
    stats_path = tmp_path / "digits_inception.npz"
    assert _invoke("stats", real, "--out", stats_path, "--inception-weights",
                   inception_file).exit_code == 0  # fmt: skip
    result = _invoke("eval", "--model", "digits", "--solvers", "ddim", "--nfe", "4",
                     "--metric", "fid", "--metric", "fd", "--num-samples", "16",
                     "--inception-weights", inception_file, "--reference-stats", stats_path,
                     "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 0, result.output
    fid = json.loads((tmp_path / "out" / "results_fid.json").read_text())
    fd = json.loads((tmp_path / "out" / "results_fd.json").read_text())
    assert fid["lower_is_better"] and fd["lower_is_better"] and fid["cells"][0]["value"] > 0
    # fd is still FD-digits, exactly as without any Inception reference.
    alone = run_experiment(
        load_image_model("digits"), [Method.stepsearch("ddim", "logsnr_uniform")], [4], ["fd"], 16
    )
    assert fd["cells"][0]["value"] == pytest.approx(alone["fd"].cells[0].value, rel=1e-9)
    assert fid["cells"][0]["value"] != pytest.approx(fd["cells"][0]["value"], rel=1e-3)


def test_clear_errors(pipeline_dir, prompts_file, clip_dir, tmp_path):
    assert read_prompts(prompts_file) == PROMPTS  # blank lines ignored, whitespace stripped
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    stats = FeatureStatistics.from_features(np.arange(12.0).reshape(4, 3) ** 2).save(
        tmp_path / "r.npz"
    )
    base = ["eval", "--pipeline", pipeline_dir, "--nfe", "2", "--out", tmp_path / "x"]
    cases = [
        (["--prompts", blank, "--metric", "clip", "--clip-model", clip_dir], "is empty"),
        (["--prompts", tmp_path / "absent.txt", "--metric", "clip", "--clip-model", clip_dir],
         "does not exist (--prompts)"),
        (["--prompts", prompts_file, "--metric", "clip"], "needs --clip-model"),
        (["--metric", "clip", "--clip-model", clip_dir], "needs --prompts"),
        (["--prompts", prompts_file, "--metric", "fid", "--inception-weights", blank],
         "needs --reference-stats"),
        (["--prompts", prompts_file, "--metric", "kid", "--inception-weights", blank,
          "--reference-stats", stats], "kid needs reference images"),
        (["--prompts", prompts_file, "--metric", "fd"], "use fid"),
        (["--prompts", prompts_file, "--metric", "clip", "--clip-model", tmp_path / "none"],
         "--clip-model"),
        # refused while the command line is parsed (the shared option types)
        (["--prompts", prompts_file, "--metric", "clip", "--clip-model", tmp_path],
         "the CLIP model's config.json is missing"),
        (["--prompts", prompts_file, "--metric", "fid", "--inception-weights", tmp_path],
         "has no inception-2015-12-05.pt"),
        (["--prompts", prompts_file, "--metric", "fid", "--reference-stats",
          tmp_path / "absent.npz"], "stepsearch stats IMAGES --out FILE.npz"),
        (["--prompts", prompts_file, "--metric", "fid", "--reference-stats", blank],
         "neither an .npz of feature statistics"),
    ]  # fmt: skip
    for extra, message in cases:
        result = _invoke(*base, *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in _flat(result.output), (message, result.output)
    result = _invoke("eval", "--metric", "clip", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "--pipeline" in _flat(result.output)
    result = _invoke("stats", tmp_path, "--out", tmp_path / "s.txt")
    assert result.exit_code == 2 and "must end in .npz" in _flat(result.output)
    result = _invoke("stats", tmp_path / "nothing", "--out", tmp_path / "s.npz", "--features",
                     "digits")  # fmt: skip
    assert result.exit_code == 2 and "neither a folder" in _flat(result.output)
