"""The stepsearch schedulers inside a real (tiny, random-weight, offline) Stable Diffusion
pipeline: every scheduler, ``timesteps=`` / ``sigmas=``, whole-pipeline save / load and img2img."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionImg2ImgPipeline
from tiny_pipeline import IMAGE_SIZE, SD_SCHEDULER_CONFIG, run, tiny_components

from stepsearch.integrations.diffusers import (
    SCHEDULERS,
    StepsearchDPMSolverMultistepScheduler,
    StepsearchHeunDiscreteScheduler,
    StepsearchPNDMScheduler,
    StepsearchScheduler,
    StepsearchUniPCMultistepScheduler,
)
from stepsearch.schedule import logsnr_uniform

pytestmark = pytest.mark.usefixtures("_one_thread")


PIPE_SCHEDULER = StepsearchDPMSolverMultistepScheduler
"""The scheduler of the ``pipe`` fixture (tests/conftest.py)."""


class CallCounter:
    """Counts UNet forward calls and the timesteps they saw."""

    def __init__(self, unet: torch.nn.Module):
        self.timesteps: list[float] = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.timesteps.append(float(torch.as_tensor(timestep).reshape(-1)[0]))

    def __enter__(self) -> CallCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def expected_shape() -> tuple[int, ...]:
    return (1, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("solver", sorted(SCHEDULERS))
def test_every_scheduler_drops_in(pipe, solver):
    """Swapped in with ``from_config`` of the pipeline's config: finite output of the right shape,
    bit-identical for the same seed, different for another seed, one (CFG-batched) UNet
    call per entry of ``timesteps``, at that timestep."""
    pipe.scheduler = SCHEDULERS[solver].from_config(SD_SCHEDULER_CONFIG)
    assert pipe.scheduler.config.solver == solver
    with CallCounter(pipe.unet) as counter:
        image = run(pipe, seed=0, num_inference_steps=4)
    assert counter.timesteps == pipe.scheduler.timesteps.double().tolist()
    assert image.shape == expected_shape()
    assert torch.isfinite(image).all()
    assert torch.equal(image, run(pipe, seed=0, num_inference_steps=4))
    assert not torch.equal(image, run(pipe, seed=1, num_inference_steps=4))


def test_custom_timesteps_and_sigmas_in_pipeline(pipe):
    """``pipe(timesteps=...)`` and ``pipe(sigmas=...)`` go through ``retrieve_timesteps``;
    the same schedule given both ways gives the same image."""
    pipe.scheduler = StepsearchUniPCMultistepScheduler.from_config(SD_SCHEDULER_CONFIG)
    assert (
        pipe.scheduler.config.final == "clean"
    )  # UniPC reads final_sigmas_type, not set_alpha_to_one
    timesteps = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # AYS, SD 1.5
    with CallCounter(pipe.unet) as counter:
        by_timesteps = run(pipe, timesteps=timesteps)
    assert counter.timesteps == [float(t) for t in timesteps]
    sigmas = pipe.scheduler.schedule.to_kdiffusion_sigmas().tolist()
    assert sigmas[-1] == 0.0
    by_sigmas = run(pipe, sigmas=sigmas)
    np.testing.assert_allclose(pipe.scheduler.timesteps.double().numpy(), timesteps, atol=1e-3)
    assert torch.allclose(by_sigmas, by_timesteps, atol=1e-5)
    with pytest.raises(ValueError, match="duplicated"):
        run(pipe, sigmas=[*sigmas[:-1], 0.0, 0.0])


def test_save_and_load_whole_pipeline(pipe, tmp_path):
    """``model_index.json`` records our module; ``DiffusionPipeline.from_pretrained`` restores the
    class, the optimized schedule (bit-exact) and therefore the images."""
    schedule = logsnr_uniform(pipe.scheduler.noise, 7)
    pipe.scheduler = StepsearchHeunDiscreteScheduler.from_step_schedule(schedule, steps_offset=1)
    before = run(pipe, num_inference_steps=7)
    pipe.save_pretrained(tmp_path)
    index = (tmp_path / "model_index.json").read_text()
    assert '"stepsearch.integrations.diffusers"' in index
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is StepsearchHeunDiscreteScheduler
    assert loaded.scheduler.config.custom_times == schedule.times.tolist()
    after = run(loaded, num_inference_steps=7)
    assert np.array_equal(loaded.scheduler.schedule.times, schedule.times)
    assert torch.equal(after, before)


@pytest.mark.parametrize(
    ("cls", "num_steps", "expected_begin", "expected_calls"),
    [
        (StepsearchDPMSolverMultistepScheduler, 10, 5, 5),
        (StepsearchHeunDiscreteScheduler, 4, 4, 3),  # order 2: evaluations 4..6 of 7
        (StepsearchPNDMScheduler, 6, 3, 3),  # skip_prk_steps: one evaluation per step
    ],
)
def test_img2img_visits_the_right_steps(
    pipe, tmp_path, cls, num_steps, expected_begin, expected_calls
):
    """Strength 0.5 starts the solver afresh at the middle step: ``set_begin_index`` lands on the
    first evaluation of that step and the UNet runs once per remaining evaluation."""
    img2img = StableDiffusionImg2ImgPipeline(
        **{k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer")},
        scheduler=cls.from_config(SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with CallCounter(img2img.unet) as counter:
        out = run(img2img, image=image, strength=0.5, num_inference_steps=num_steps)
    scheduler = img2img.scheduler
    assert scheduler.begin_index == expected_begin
    assert counter.timesteps == scheduler.timesteps[expected_begin:].double().tolist()
    assert len(counter.timesteps) == expected_calls
    assert out.shape == expected_shape() and torch.isfinite(out).all()
    assert torch.equal(out, run(img2img, image=image, strength=0.5, num_inference_steps=num_steps))


def test_img2img_keeps_the_tail_of_a_custom_schedule(pipe):
    """Strength truncates a custom ``timesteps=`` schedule to its tail, unchanged."""
    img2img = StableDiffusionImg2ImgPipeline(
        **{k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer")},
        scheduler=StepsearchDPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    img2img.set_progress_bar_config(disable=True)
    timesteps = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with CallCounter(img2img.unet) as counter:
        out = run(img2img, image=image, strength=0.5, timesteps=timesteps)
    assert counter.timesteps == [float(t) for t in timesteps[5:]]
    assert torch.isfinite(out).all()


def test_img2img_with_a_runge_kutta_warm_up_is_a_clear_error(pipe):
    """PNDM with its pseudo Runge-Kutta warm-up (diffusers' default ``skip_prk_steps=False``)
    takes 4 evaluations in its first steps, 1 later: no constant ``order`` for img2img to skip."""
    scheduler = StepsearchPNDMScheduler.from_config(
        {**SD_SCHEDULER_CONFIG, "skip_prk_steps": False}
    )
    assert scheduler.config.solver_kwargs == {"warmup": "prk"}
    img2img = StableDiffusionImg2ImgPipeline(
        **{k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer")},
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="warmup"):
        run(img2img, image=image, strength=0.5, num_inference_steps=6)


def test_generic_class_swaps_in_and_out(pipe):
    """The generic class takes a diffusers config (solver from its ``_class_name``) and a
    pipeline built around it exposes no compatibles of its own (a third-party class)."""
    scheduler = StepsearchScheduler.from_config(SD_SCHEDULER_CONFIG)
    assert scheduler.config.solver == "pndm"
    assert scheduler.config.solver_kwargs == {"warmup": "lower_order"}  # skip_prk_steps
    assert scheduler.config.final == "t_min"  # set_alpha_to_one False
    pipe.scheduler = scheduler
    image = run(pipe, num_inference_steps=3)
    assert torch.isfinite(image).all()
    assert type(scheduler) not in scheduler.compatibles
    assert {c.__name__ for c in scheduler.compatibles} >= {
        "DDIMScheduler",
        "EulerDiscreteScheduler",
    }


def test_tokenizer_is_not_degenerate(tmp_path):
    """Guard for transformers 5 silently ignoring vocab_file / merges_file."""
    tokenizer = tiny_components(tmp_path)["tokenizer"]
    ids = tokenizer("the cat").input_ids
    assert len(tokenizer) > 500
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 4  # <start> "the" "cat" <end>, via the hand-written merges
