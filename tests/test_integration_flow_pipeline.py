"""The flow-matching drop-in in real diffusers pipelines (issue 9): tiny, offline, random-weight
StableDiffusion3Pipeline and FluxPipeline built from configs (one-layer transformers, a two-block
VAE, 16x16 images), text encoders replaced by ``prompt_embeds`` / ``pooled_prompt_embeds``.

Each case runs the pipeline end to end with diffusers' FlowMatchEulerDiscreteScheduler and with
``StepsearchFlowMatchEulerDiscreteScheduler.from_config`` of its config, and compares the latents:
SD3 with a static shift (no ``mu``), SD3.5-style dynamic shifting (the pipeline computes ``mu``
from the image size, or is given one) and Flux (``sigmas`` and ``mu`` together, the path where
the shift must be applied exactly once).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from stepsearch.integrations.diffusers import StepsearchFlowMatchEulerDiscreteScheduler

SIZE = 16
TOLERANCE = 1e-5
FLUX_SHIFTS = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256}
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3": {"shift": 3.0},
    "sd3_dynamic": {"shift": 3.0, "use_dynamic_shifting": True, **FLUX_SHIFTS},
    "flux": {"shift": 3.0, "use_dynamic_shifting": True, **FLUX_SHIFTS},
}


def _vae(shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(4, 8),
        sample_size=SIZE, shift_factor=shift_factor, scaling_factor=scaling_factor,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pipelines() -> dict[str, Any]:
    torch.manual_seed(0)
    sd3 = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
            caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=16,
        ),
        vae=_vae(0.0609, 1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    flux = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
            axes_dims_rope=(2, 2, 4),
        ),
        vae=_vae(0.1159, 0.3611),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip
    for pipe in (sd3, flux):
        pipe.set_progress_bar_config(disable=True)
    return {"sd3": sd3, "flux": flux}


def _run(pipe: Any, scheduler: Any, num_steps: int, output_type: str = "latent", **kwargs) -> Any:
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 5, 16, generator=generator)
    pooled = torch.randn(1, 8, generator=generator)
    pipe.scheduler = scheduler
    return pipe(
        prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=SIZE, width=SIZE,
        num_inference_steps=num_steps, guidance_scale=1.0, output_type=output_type,
        generator=torch.Generator().manual_seed(1), **kwargs,
    ).images  # fmt: skip


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("num_steps", [4, 8, 28])
@pytest.mark.parametrize("name", sorted(SCHEDULER_CONFIGS))
def test_flow_drop_in_matches_flow_match_euler_in_the_pipeline(pipelines, name, num_steps):
    pipe = pipelines["flux" if name == "flux" else "sd3"]
    twin = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[name])
    want = _run(pipe, twin, num_steps)
    ours = StepsearchFlowMatchEulerDiscreteScheduler.from_config(twin.config)
    got = _run(pipe, ours, num_steps)
    assert torch.allclose(ours.timesteps.float(), twin.timesteps, atol=1e-3)
    assert torch.isfinite(got).all()
    assert _error(got, want) < TOLERANCE


def test_flow_drop_in_takes_the_given_mu(pipelines):
    twin = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["sd3_dynamic"])
    ours = StepsearchFlowMatchEulerDiscreteScheduler.from_config(twin.config)
    want = _run(pipelines["sd3"], twin, 8, mu=1.1)
    got = _run(pipelines["sd3"], ours, 8, mu=1.1)
    assert _error(got, want) < TOLERANCE
    assert _error(got, _run(pipelines["sd3"], ours, 8)) > 1e-4  # mu really reached the grid


def test_flow_drop_in_config_does_not_carry_multistep_flow_keys():
    """Flux pipelines drop their own ``sigmas`` when ``scheduler.config.use_flow_sigmas`` is
    set (a DPM-Solver / UniPC key): the flow twin's config must not carry it."""
    ours = StepsearchFlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["flux"]).config
    )
    assert not ours.config.get("use_flow_sigmas")


def test_flow_pipeline_decodes_images(pipelines):
    twin = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS["flux"])
    ours = StepsearchFlowMatchEulerDiscreteScheduler.from_config(twin.config)
    images = _run(pipelines["flux"], ours, 4, output_type="np")
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    want = _run(pipelines["flux"], twin, 4, output_type="np")
    assert np.abs(images - want).max() < 1e-4
