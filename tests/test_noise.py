"""Noise schedules against diffusers' alphas_cumprod, closed forms and their own inverses."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from stepsearch.noise import (
    EDM,
    LAMBDA_MIN,
    ZERO_SNR_ALPHA_CUMPROD,
    CosineVP,
    DiscreteVP,
    FlowMatching,
    LinearVP,
    betas_for_schedule,
    noise_schedule_from_config,
)

DIFFUSERS_CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "sigmoid"},
    {"beta_schedule": "linear", "num_train_timesteps": 100},
]

ALL_SCHEDULES = [
    DiscreteVP.stable_diffusion(),
    DiscreteVP.from_diffusers_config({"beta_schedule": "squaredcos_cap_v2"}),
    DiscreteVP.from_diffusers_config(
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "rescale_betas_zero_snr": True,
        }
    ),
    LinearVP(),
    CosineVP(),
    EDM(),
    FlowMatching(shift=3.0),
]


@pytest.mark.parametrize("config", DIFFUSERS_CONFIGS)
def test_discrete_vp_reproduces_diffusers_alphas_cumprod(config):
    scheduler = DDPMScheduler(**config)
    noise = DiscreteVP.from_diffusers_config(scheduler.config)
    timesteps = np.arange(scheduler.config.num_train_timesteps)
    ours = np.asarray(noise.alpha(noise.t_from_timestep(timesteps))) ** 2
    theirs = scheduler.alphas_cumprod.double().numpy()
    # diffusers computes in float32: agree to float32 precision.
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-6)
    # And exactly with a float64 cumprod of the same betas.
    betas = betas_for_schedule(
        config["beta_schedule"],
        scheduler.config.num_train_timesteps,
        scheduler.config.beta_start,
        scheduler.config.beta_end,
    )
    np.testing.assert_allclose(ours, np.cumprod(1 - betas), rtol=1e-12, atol=0)


def test_trained_betas_and_zero_terminal_snr():
    betas = np.linspace(1e-4, 0.03, 50)
    scheduler = DDIMScheduler(num_train_timesteps=50, trained_betas=betas.tolist())
    noise = DiscreteVP.from_diffusers_config(scheduler.config)
    np.testing.assert_allclose(noise.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)

    config = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "rescale_betas_zero_snr": True,
    }
    zero_snr = DiscreteVP.from_diffusers_config(config)
    reference = DDIMScheduler(**config).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(zero_snr.alphas_cumprod[:-1], reference[:-1], rtol=1e-4, atol=1e-7)
    assert reference[-1] == 0.0 and zero_snr.alphas_cumprod[-1] == ZERO_SNR_ALPHA_CUMPROD
    times = np.linspace(0, 1, 2001)
    for values in (zero_snr.alpha(times), zero_snr.sigma(times), zero_snr.lambda_(times)):
        assert not np.isnan(values).any()
    assert np.isfinite(zero_snr.lambda_(1.0))


@pytest.mark.parametrize("noise", ALL_SCHEDULES, ids=repr)
def test_lambda_round_trip_and_monotone(noise):
    times = np.linspace(0.0, noise.t_max, 5001)
    lambdas = np.asarray(noise.lambda_(times))
    assert lambdas[0] == math.inf
    assert (np.diff(lambdas) < 0).all(), "lambda must decrease strictly in t"
    assert np.isfinite(lambdas[1:]).all() and lambdas.min() >= LAMBDA_MIN
    np.testing.assert_allclose(noise.t_from_lambda(lambdas), times, atol=1e-9 * noise.t_max, rtol=0)
    sigmas = np.asarray(noise.kdiffusion_sigma(times))
    assert sigmas[0] == 0.0
    np.testing.assert_allclose(
        noise.t_from_kdiffusion_sigma(sigmas), times, atol=1e-9 * noise.t_max, rtol=0
    )


@pytest.mark.parametrize("noise", ALL_SCHEDULES, ids=repr)
def test_alpha_sigma_identities(noise):
    times = np.linspace(noise.t_min, noise.t_max, 101)
    alpha, sigma, lambda_ = (
        np.asarray(f(times)) for f in (noise.alpha, noise.sigma, noise.lambda_)
    )
    assert noise.alpha(0.0) == 1.0 and noise.sigma(0.0) == 0.0
    finite = lambda_ > LAMBDA_MIN
    np.testing.assert_allclose(lambda_[finite], np.log(alpha[finite] / sigma[finite]), rtol=1e-12)
    if isinstance(noise, (DiscreteVP, LinearVP, CosineVP)):
        np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
    assert isinstance(noise.alpha(0.5 * noise.t_max), float)
    assert noise_schedule_from_config(noise.to_config()) == noise


def test_continuous_schedules_closed_forms():
    linear = LinearVP(beta_0=0.1, beta_1=20.0)
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(linear.log_alpha(t), -0.25 * 19.9 * t**2 - 0.05 * t, rtol=1e-14)
    cosine = CosineVP()
    expected = np.cos(np.pi / 2 * (t[:-1] + 0.008) / 1.008) / np.cos(np.pi / 2 * 0.008 / 1.008)
    np.testing.assert_allclose(
        cosine.alpha(t[:-1] * 0.99),
        np.cos(np.pi / 2 * (t[:-1] * 0.99 + 0.008) / 1.008) / np.cos(np.pi / 2 * 0.008 / 1.008),
        rtol=1e-12,
    )
    assert expected[0] == pytest.approx(1.0)
    edm = EDM()
    assert edm.sigma(3.0) == pytest.approx(3.0, rel=1e-15) and edm.alpha(3.0) == 1.0
    flow = FlowMatching(shift=3.0)
    assert flow.alpha(0.25) == 0.75 and flow.sigma(0.25) == 0.25
    assert flow.shift_time(0.5) == pytest.approx(0.75)
    assert flow.lambda_(1.0) == LAMBDA_MIN


def test_discrete_interpolation_is_piecewise_linear_in_log_alpha():
    noise = DiscreteVP.stable_diffusion()
    t0, t1 = noise.t_from_timestep(10), noise.t_from_timestep(11)
    mid = noise.log_alpha(0.5 * (t0 + t1))
    assert mid == pytest.approx(0.5 * (noise.log_alpha(t0) + noise.log_alpha(t1)), rel=1e-12)
    assert noise.timestep_from_t(noise.t_from_timestep(417.0)) == pytest.approx(417.0, abs=1e-9)
    assert noise.model_time(1.0) == pytest.approx(999.0)
    # t = 0 is clean data, diffusers' timestep -1 (final_alpha_cumprod = 1).
    assert noise.timestep_from_t(0.0) == -1.0 and noise.alpha(0.0) == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        {"beta_schedule": "nope"},
        {"beta_schedule": "linear", "num_train_timesteps": 1},
        {"trained_betas": [0.1, float("nan")]},
        {"trained_betas": [0.1, 1.5]},
    ],
)
def test_bad_discrete_configs_raise(bad):
    with pytest.raises(ValueError):
        DiscreteVP.from_diffusers_config(bad)


def test_bad_inputs_raise():
    noise = DiscreteVP.stable_diffusion()
    with pytest.raises(ValueError, match="outside"):
        noise.alpha(1.5)
    with pytest.raises(ValueError, match="NaN"):
        noise.sigma(float("nan"))
    with pytest.raises(ValueError, match="decrease strictly"):
        DiscreteVP([0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match="unknown noise schedule kind"):
        noise_schedule_from_config({"kind": "nope"})
    with pytest.raises(ValueError):
        EDM(sigma_min=2.0, sigma_max=1.0)
    assert torch.is_tensor(torch.as_tensor(noise.alpha(np.array([0.5, 0.6]))))
