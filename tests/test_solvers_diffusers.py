"""Parity with diffusers' schedulers where diffusers is right (and a record of where it is not).

Each diffusers scheduler runs its own loop with an exact ``x0`` model (``prediction_type="sample"``)
on the Gaussian test bed; our solver runs the same grid (``StepSchedule.from_diffusers_timesteps``).
diffusers computes its schedule in float32, so results agree to ~1e-6, not 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from stepsearch.noise import DiscreteVP
from stepsearch.sampling import sample
from stepsearch.schedule import StepSchedule
from stepsearch.solvers import get_solver
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

_RNG = np.random.default_rng(0)
MEAN = _RNG.normal(size=8)
VARIANCE = np.exp(_RNG.uniform(-3.0, 0.7, 8))


def run_diffusers(scheduler, noise, data, x_start, steps, generator=None):
    """diffusers' loop; k-diffusion-style schedulers see ``x / alpha`` and scale the model input."""
    scheduler.set_timesteps(steps)
    x = x_start * scheduler.init_noise_sigma
    evaluated = []
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, timestep)
        t = float(noise.t_from_timestep(float(timestep)))
        evaluated.append(t)
        denoised = data(model_input, t)
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(denoised, timestep, x, **kwargs).prev_sample
    return x, scheduler.timesteps.numpy().astype(np.float64), evaluated


CASES = [
    ("ddim", lambda: DDIMScheduler(timestep_spacing="trailing", clip_sample=False), {}),
    ("dpm_solver_pp_2m", DPMSolverMultistepScheduler, {}),
    ("dpm_solver_pp_3m", lambda: DPMSolverMultistepScheduler(solver_order=3), {"legacy_3m": True}),
    (
        "unipc_bh2",
        UniPCMultistepScheduler,
        {"lower_order_final_below": None},  # diffusers' UniPC lowers the final orders always
    ),
    (
        "unipc_bh2",
        lambda: UniPCMultistepScheduler(solver_order=3),
        {"order": 3, "lower_order_final_below": None},
    ),
    ("euler", lambda: EulerDiscreteScheduler(timestep_spacing="trailing"), {}),
    ("heun", lambda: HeunDiscreteScheduler(timestep_spacing="leading"), {}),
]


@pytest.mark.parametrize("steps", [10, 20])  # below and above lower_order_final's 15
@pytest.mark.parametrize(("name", "factory", "kwargs"), CASES)
def test_matches_diffusers(name, factory, kwargs, steps):
    scheduler = factory()
    scheduler.register_to_config(prediction_type="sample")
    noise = DiscreteVP.from_diffusers_config(scheduler.config)
    data = GaussianMixture.gaussian(MEAN, VARIANCE, noise)
    x_start = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected, timesteps, evaluated = run_diffusers(scheduler, noise, data, x_start, steps)
    grid = np.unique(timesteps)[::-1]  # Heun repeats its inner timesteps
    schedule = StepSchedule.from_diffusers_timesteps(noise, grid, final="clean")
    solver = get_solver(name, **kwargs)
    result = sample(data, x_start, schedule, solver)
    np.testing.assert_allclose(solver.evaluation_times(schedule), evaluated, rtol=1e-12)
    torch.testing.assert_close(result.sample, expected.double(), rtol=2e-5, atol=2e-5)


def test_stochastic_ddim_matches_diffusers_variance_and_noise():
    scheduler = DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    scheduler.register_to_config(prediction_type="sample")
    noise = DiscreteVP.from_diffusers_config(scheduler.config)
    data = GaussianMixture.gaussian(MEAN, VARIANCE, noise)
    scheduler.set_timesteps(8)
    schedule = StepSchedule.from_diffusers_timesteps(
        noise, scheduler.timesteps.numpy().astype(np.float64)
    )
    solver = get_solver("ddim", eta=0.6)
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    state = solver.init(x, schedule)
    ours, reference = x, x
    for i, timestep in enumerate(scheduler.timesteps):
        t = float(state.evaluation_times[i])
        ours, state = solver.step(
            state, ours, data(ours, t), i, generator=torch.Generator().manual_seed(i)
        )
        reference = scheduler.step(
            data(reference, t),
            timestep,
            reference,
            eta=0.6,
            generator=torch.Generator().manual_seed(i),
        ).prev_sample
    torch.testing.assert_close(ours, reference.double(), rtol=2e-5, atol=2e-5)


def test_diffusers_unipc_bh1_to_clean_data_is_nan_ours_is_not():
    """diffusers' bh1 multiplies ``B(h) = -h = -inf`` by a zero correction on the step to
    ``sigma = 0``; we return ``denoised`` there. With ``final_sigmas_type="sigma_min"`` they agree."""
    scheduler = UniPCMultistepScheduler(solver_type="bh1", prediction_type="sample")
    noise = DiscreteVP.from_diffusers_config(scheduler.config)
    data = GaussianMixture.gaussian(MEAN, VARIANCE, noise)
    x_start = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected, timesteps, _ = run_diffusers(scheduler, noise, data, x_start, 10)
    assert torch.isnan(expected).all()
    solver = get_solver("unipc_bh1", lower_order_final_below=None)
    clean = StepSchedule.from_diffusers_timesteps(noise, timesteps, final="clean")
    assert torch.isfinite(sample(data, x_start, clean, solver).sample).all()

    scheduler = UniPCMultistepScheduler(
        solver_type="bh1", prediction_type="sample", final_sigmas_type="sigma_min"
    )
    expected, timesteps, _ = run_diffusers(scheduler, noise, data, x_start, 10)
    noisy_end = StepSchedule.from_diffusers_timesteps(noise, timesteps, final="t_min")
    result = sample(data, x_start, noisy_end, solver).sample
    torch.testing.assert_close(result, expected.double(), rtol=2e-5, atol=2e-5)
