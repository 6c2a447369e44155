"""Model-output conversions and classifier-free guidance."""

import numpy as np
import pytest
import torch

from stepsearch.denoiser import (
    ModelDenoiser,
    classifier_free_guidance,
    eps_from_x0,
    x0_from_model_output,
)
from stepsearch.guidance import GuidanceSchedule
from stepsearch.noise import EDM, DiscreteVP, FlowMatching
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

SD = DiscreteVP.stable_diffusion()


def _exact_outputs(noise, x, t, x0):
    alpha, sigma = float(noise.alpha(t)), float(noise.sigma(t))
    eps = (x - alpha * x0) / sigma
    return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_model_denoiser_recovers_the_exact_denoiser(prediction_type):
    mixture = GaussianMixture.random(2, 6, SD, seed=0)
    x = mixture.sample_noisy(8, 0.4, torch.Generator().manual_seed(0))
    seen_times = []

    def model(sample, model_time):
        seen_times.append(model_time)
        t = float(SD.t_from_timestep(float(model_time[0])))
        return _exact_outputs(SD, sample, t, mixture(sample, t))[prediction_type]

    denoiser = ModelDenoiser(model, SD, prediction_type)
    torch.testing.assert_close(denoiser(x, 0.4), mixture(x, 0.4))
    assert seen_times[0].shape == (8,) and seen_times[0][0] == pytest.approx(399.0)


def test_flow_prediction():
    noise = FlowMatching()
    mixture = GaussianMixture.random(2, 3, noise, seed=1)
    x0 = mixture.sample(5)
    eps = torch.randn_like(x0)
    t = 0.3
    x = (1 - t) * x0 + t * eps
    torch.testing.assert_close(x0_from_model_output(noise, x, t, eps - x0, "flow"), x0)
    with pytest.raises(ValueError, match="FlowMatching"):
        ModelDenoiser(lambda x, t: x, SD, "flow")
    with pytest.raises(ValueError, match="prediction_type"):
        ModelDenoiser(lambda x, t: x, SD, "score")


def test_eps_from_x0_inverts_epsilon_conversion_per_sample_times():
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    eps = torch.randn_like(x)
    t = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=torch.float64)
    x0 = x0_from_model_output(EDM(), x, t, eps, "epsilon")
    torch.testing.assert_close(eps_from_x0(EDM(), x, t, x0), eps)


def test_classifier_free_guidance_and_rescale():
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 4, 8, 8, generator=generator)
    uncond = torch.randn(3, 4, 8, 8, generator=generator)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    guided = classifier_free_guidance(cond, uncond, 7.5)
    torch.testing.assert_close(guided, uncond + 7.5 * (cond - uncond))
    full = classifier_free_guidance(cond, uncond, 7.5, rescale=1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    half = classifier_free_guidance(cond, uncond, 7.5, rescale=0.5)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * guided)


def test_model_denoiser_with_guidance_schedule_uses_per_sample_weights():
    def cond(x, model_time):
        return torch.ones_like(x)

    def uncond(x, model_time):
        return torch.zeros_like(x)

    schedule = GuidanceSchedule.linear(3.0, sigma_min=0.002, sigma_max=80.0)
    denoiser = ModelDenoiser(cond, EDM(), "sample", unconditional=uncond, guidance=schedule)
    x = torch.zeros(2, 5)
    t = torch.tensor([80.0, 8.0])  # EDM: t is the k-diffusion sigma
    out = denoiser(x, t)
    expected = schedule(np.array([80.0, 8.0]))
    torch.testing.assert_close(out[:, 0], torch.tensor(expected, dtype=torch.float32))
    assert denoiser.passes == 2
