"""Drop-in schedulers where they used to differ from diffusers silently (issue 23): the Euler /
Heun initial noise on linspace / trailing, noise-prediction DPM-Solver configs that diffusers must
accept, DEIS configs read as diffusers reads them."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from stepsearch.integrations.diffusers import (
    StepsearchDPMSolverMultistepScheduler,
    StepsearchEulerDiscreteScheduler,
    StepsearchHeunDiscreteScheduler,
    StepsearchScheduler,
)

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _model(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A deterministic noise predictor that depends on both inputs (float64 inside)."""
    time = float(torch.as_tensor(t).reshape(-1)[0])
    return (torch.tanh(x.double() * 0.7 + 0.3) * (1.0 + time / 1000.0)).to(x.dtype)


def _loop(scheduler, unit_noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The plain pipeline loop, starting from the scheduler's own ``init_noise_sigma``."""
    scheduler.set_timesteps(steps)
    x = unit_noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading"])
@pytest.mark.parametrize(
    ("diffusers_class", "twin"),
    [
        (EulerDiscreteScheduler, StepsearchEulerDiscreteScheduler),
        (HeunDiscreteScheduler, StepsearchHeunDiscreteScheduler),
    ],
)
def test_euler_and_heun_twins_start_from_diffusers_initial_noise(diffusers_class, twin, spacing):
    """Same unit noise through each scheduler's own init_noise_sigma: the same samples (before,
    the twins started at sigma~ = sqrt(sigma~_max^2 + 1) on every spacing: 4.7e-3 relative)."""
    reference = diffusers_class(**SD_CONFIG, timestep_spacing=spacing)
    ours = twin.from_config(reference.config)
    unit = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = _loop(reference, unit, 20)
    got = _loop(ours, unit, 20)
    relative = float((got - expected).norm() / expected.norm())
    assert relative < 1e-5


@pytest.mark.parametrize("solver", ["dpm_solver_2m", "dpm_solver_3m", "dpm_solver_2", "dpm_solver_3"])
@pytest.mark.parametrize("diffusers_class", [DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler])
def test_noise_prediction_configs_load_in_diffusers(solver, diffusers_class):
    """A noise-prediction twin's config is one diffusers accepts (it refuses final_sigmas_type
    "zero" with algorithm_type "dpmsolver"), naming the same method."""
    config = StepsearchScheduler(solver=solver, **SD_CONFIG).config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = diffusers_class.from_config(config)
    assert loaded.config.algorithm_type == "dpmsolver"
    assert loaded.config.solver_order == int(solver[-2] if solver.endswith("m") else solver[-1])
    back = StepsearchScheduler.from_config(config)
    assert back.config.solver == solver


def test_deis_config_reads_as_diffusers_reads_it():
    """diffusers' DPMSolverMultistepScheduler reads a DEIS config as dpmsolver++ (logrho ->
    midpoint); the twin does the same instead of refusing it as an SDE variant."""
    deis = DEISMultistepScheduler(**SD_CONFIG)
    reference = DPMSolverMultistepScheduler.from_config(deis.config)
    ours = StepsearchDPMSolverMultistepScheduler.from_config(deis.config)
    assert reference.config.algorithm_type == "dpmsolver++"
    assert ours.config.solver == "dpm_solver_pp_2m"
    assert ours.config.algorithm_type == "dpmsolver++"
