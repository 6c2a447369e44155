"""The guidance-schedule callback in unmodified diffusers pipelines (tiny, offline, random weights).

Ground truth is stepsearch's own sampler with the same schedule: the pipeline run with
``GuidanceCallback`` (and a stepsearch drop-in scheduler) must give the latents of
``stepsearch.sampling.sample`` on the same noise, to 1e-5 relative, for SD 1.x, SDXL and SD3; and
the network passes counted on the UNet / transformer itself must equal the denoiser's count and
the schedule's prediction (one pass at weight 1, two elsewhere).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_pipeline import IMAGE_SIZE, SD_SCHEDULER_CONFIG, tiny_sdxl_pipeline

from stepsearch.denoiser import ModelDenoiser
from stepsearch.guidance import GuidanceSchedule, noise_range, unet_passes
from stepsearch.integrations.diffusers import (
    StepsearchDPMSolverMultistepScheduler,
    StepsearchFlowMatchEulerDiscreteScheduler,
)
from stepsearch.integrations.diffusers_guidance import GuidanceCallback
from stepsearch.models.batches import unit_noise
from stepsearch.models.pipeline import PipelineModel
from stepsearch.models.source import initial_noise_for
from stepsearch.sampling import sample
from stepsearch.schedule import make_schedule
from stepsearch.solvers import get_solver

PROMPTS = ["a cat", "the dog"]
TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("_one_thread")


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class PassCounter:
    """Counts network passes on a module: rows seen per call / images."""

    def __init__(self, module: torch.nn.Module, images: int) -> None:
        self.rows = 0
        self.images = images
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows += sample.shape[0]

    @property
    def passes(self) -> int:
        return self.rows // self.images

    def remove(self) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG)
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), scheduler)


def _schedules(noise: Any, sigmas: Any) -> dict[str, GuidanceSchedule]:
    low, high = noise_range(noise)
    return {
        # unguided first step (the callback encodes the negatives), guided middle, unguided end;
        # edges between grid points (the pipeline's timesteps are float32 roundings of them)
        "interval": GuidanceSchedule.interval(
            3.0, float((sigmas[4] * sigmas[5]) ** 0.5), float((sigmas[0] * sigmas[1]) ** 0.5)
        ),
        # weight 1 at sigma_max (first step unguided), rising to 4
        "linear_increasing": GuidanceSchedule.linear(2.5, low, high),
        # guided from the start (2w - 1 at sigma_max), the weight falls
        "cosine_decreasing": GuidanceSchedule.cosine(2.0, low, high, increasing=False),
    }


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("shape", ["interval", "linear_increasing", "cosine_decreasing"])
def test_callback_reproduces_stepsearch_sampling(request, kind, shape):
    pipe = request.getfixturevalue("pipe" if kind == "sd" else "sdxl")
    base = PipelineModel(pipe, PROMPTS, guidance_scale=1.0)
    grid = make_schedule(base.noise, 6, "logsnr_uniform")
    sigmas = base.noise.kdiffusion_sigma(grid.times[:-1])
    schedule = _schedules(base.noise, sigmas)[shape]
    model = base.with_options(guidance_schedule=schedule)
    indices = [0, 1]
    solver = get_solver("dpm_solver_pp_2m")
    with torch.inference_mode():
        denoiser = model.denoiser(indices)
        x_T = initial_noise_for(model, indices, 3, grid)
        ours = sample(denoiser, x_T, grid, solver).sample

    scheduler = StepsearchDPMSolverMultistepScheduler.from_config(model.scheduler_config)
    callback = GuidanceCallback(schedule, pipe)
    counter = PassCounter(pipe.unet, len(indices))
    try:
        with model.using(scheduler), torch.inference_mode():
            theirs = pipe(
                prompt=PROMPTS,
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                latents=unit_noise(indices, model.latent_shape, 3),
                output_type="latent",
                **callback.call_options(sigmas=grid.to_kdiffusion_sigmas().tolist()),
            ).images
    finally:
        counter.remove()
    assert _error(theirs, ours) < TOLERANCE
    expected = unet_passes(schedule(sigmas))
    assert counter.passes == denoiser.passes == callback.passes == expected
    if shape == "interval":
        assert expected == 6 + 4  # steps 1..4 guided: two passes saved
    assert callback.weights == pytest.approx(list(schedule(sigmas)), rel=1e-6)


def test_first_step_must_run_at_the_schedules_weight(pipe):
    model = PipelineModel(pipe, PROMPTS[:1], guidance_scale=1.0)
    low, high = noise_range(model.noise)
    callback = GuidanceCallback(GuidanceSchedule.cosine(2.0, low, high, increasing=False), pipe)
    with pytest.raises(ValueError, match="first step ran at guidance_scale 5"):
        pipe(
            prompt="a cat",
            num_inference_steps=3,
            guidance_scale=5.0,
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=callback.tensor_inputs,
            output_type="latent",
        )


def test_weights_below_one_are_refused(pipe):
    with pytest.raises(ValueError, match="guide only above 1"):
        GuidanceCallback(GuidanceSchedule.constant(0.5), pipe)


def test_pipeline_model_runs_its_own_loop_through_the_callback(pipe):
    """generate_images with a guidance schedule = stepsearch's own sampling (decoded)."""
    from stepsearch.models.pipeline import generate_images
    from stepsearch.models.source import generate_from_source

    base = PipelineModel(pipe, PROMPTS)
    grid = make_schedule(base.noise, 6, "logsnr_uniform")
    sigmas = base.noise.kdiffusion_sigma(grid.times[:-1])
    model = base.with_options(guidance_schedule=_schedules(base.noise, sigmas)["interval"])
    solver = get_solver("dpm_solver_pp_2m")
    ours = generate_from_source(model, solver, grid, 2, seed=1, progress=False)
    scheduler = StepsearchDPMSolverMultistepScheduler.from_config(model.scheduler_config)
    sigmas_kd = grid.to_kdiffusion_sigmas().tolist()
    theirs = generate_images(model, scheduler, 2, sigmas=sigmas_kd, seed=1, progress=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-4)
    assert model.describe()["guidance_schedule"]["shape"] == "interval"


# SD3 -------------------------------------------------------------------------------------------
SIZE = 16


@pytest.fixture(scope="module")
def sd3() -> Any:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
            caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16,
        ).eval(),
        vae=AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            norm_num_groups=2, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(4, 8),
            sample_size=SIZE, shift_factor=0.0609, scaling_factor=1.5035,
        ).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("shape", ["interval", "linear_increasing", "cosine_decreasing"])
def test_callback_reproduces_stepsearch_sampling_sd3(sd3, shape):
    generator = torch.Generator().manual_seed(0)
    embeds = {
        "prompt_embeds": torch.randn(2, 5, 16, generator=generator),
        "pooled_prompt_embeds": torch.randn(2, 8, generator=generator),
    }
    negatives = {
        "prompt_embeds": torch.randn(1, 5, 16, generator=generator),
        "pooled_prompt_embeds": torch.randn(1, 8, generator=generator),
    }
    scheduler = StepsearchFlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config)
    scheduler.set_timesteps(6)
    grid, noise = scheduler.schedule, scheduler.noise
    sigmas = noise.kdiffusion_sigma(grid.times[:-1])
    schedule = {
        **_schedules(noise, sigmas),
        "linear_increasing": GuidanceSchedule.linear(2.5, 1e-3, 2.0 * float(sigmas[1])),
        "cosine_decreasing": GuidanceSchedule.cosine(2.0, 1e-3, 1e3, increasing=False),
    }[shape]
    transformer = sd3.transformer

    def branch(conditioning: dict[str, torch.Tensor]) -> Any:
        def network(x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
            return transformer(
                hidden_states=x,
                timestep=model_time.expand(x.shape[0]),
                encoder_hidden_states=conditioning["prompt_embeds"].expand(x.shape[0], -1, -1),
                pooled_projections=conditioning["pooled_prompt_embeds"].expand(x.shape[0], -1),
                return_dict=False,
            )[0]

        return network

    denoiser = ModelDenoiser(
        branch(embeds), noise, "flow", unconditional=branch(negatives), guidance=schedule
    )
    size = SIZE // sd3.vae_scale_factor
    latents = torch.randn(2, 4, size, size, generator=generator)
    with torch.inference_mode():
        ours = sample(denoiser, latents, grid, scheduler.solver).sample

    callback = GuidanceCallback(schedule, sd3, negative_embeddings=negatives)
    counter = PassCounter(transformer, 2)
    original = sd3.scheduler
    sd3.scheduler = scheduler
    try:
        with torch.inference_mode():
            options = callback.call_options(num_inference_steps=6)
            theirs = sd3(
                **embeds,
                negative_prompt_embeds=negatives["prompt_embeds"].expand(2, -1, -1),
                negative_pooled_prompt_embeds=negatives["pooled_prompt_embeds"].expand(2, -1),
                height=SIZE,
                width=SIZE,
                latents=latents,
                output_type="latent",
                **options,
            ).images
    finally:
        sd3.scheduler = original
        counter.remove()
    assert _error(theirs, ours) < TOLERANCE
    expected = unet_passes(schedule(sigmas))
    assert counter.passes == denoiser.passes == callback.passes == expected
    assert expected < 12 if shape != "cosine_decreasing" else expected == 12
