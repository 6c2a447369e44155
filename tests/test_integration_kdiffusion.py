"""k-diffusion adapter: stepsearch solvers equal k-diffusion's own loops on the same sigmas, reach
the exact ODE solution for Gaussian data, and sigma exports are valid k-diffusion / ComfyUI input."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from stepsearch.integrations.kdiffusion import (
    KDiffusionDenoiser,
    kdiffusion_sampler,
    sample_kdiffusion,
    to_comfyui_sigmas,
    to_kdiffusion_sigmas,
)
from stepsearch.noise import EDM, DiscreteVP, FlowMatching
from stepsearch.sampling import sample
from stepsearch.schedule import (
    StepSchedule,
    ays_gaussian,
    diffusers_spacing,
    flow_shifted,
    karras,
    logsnr_uniform,
)
from stepsearch.solvers import BUILT_IN_SOLVERS, get_solver

SIGMA_DATA = 0.5


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """k-diffusion's ``get_sigmas_karras`` (float64 here), with the appended 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(high + ramp * (low - high)) ** rho, torch.zeros(1, dtype=torch.float64)])


class GaussianDenoiser:
    """The exact denoiser of N(0, c^2 I) data in EDM space: ``D(x, sigma) = c^2 x / (c^2 +
    sigma^2)``, times a per-pixel map so that samples are not all parallel. Declares its sigma
    range like k-diffusion's wrappers and counts calls."""

    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self):
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        c2 = SIGMA_DATA**2
        return scale * c2 / (c2 + sigma.reshape(-1, 1, 1, 1) ** 2) * x


def exact_solution(x_T: torch.Tensor, sigma_T: float, sigma: float) -> torch.Tensor:
    """The probability-flow ODE of Gaussian data: ``x(sigma) = x_T sqrt(c^2 + sigma^2) /
    sqrt(c^2 + sigma_T^2)``."""
    c2 = SIGMA_DATA**2
    return x_T * math.sqrt(c2 + sigma**2) / math.sqrt(c2 + sigma_T**2)


def start(sigmas: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return noise * sigmas[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# k-diffusion's own loops, written out (crowsonkb/k-diffusion sampling.py, deterministic)
# --------------------------------------------------------------------------------------------


def kdiffusion_euler(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def kdiffusion_heun(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def kdiffusion_dpmpp_2m(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised
        else:
            r = (t + sigmas[i - 1].log()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


@pytest.mark.parametrize(
    ("solver", "reference", "solver_kwargs"),
    [
        ("euler", kdiffusion_euler, {}),
        ("ddim", kdiffusion_euler, {}),  # DDIM is Euler in sigma space
        ("heun", kdiffusion_heun, {}),
        ("dpm_solver_pp_2m", kdiffusion_dpmpp_2m, {"lower_order_final": False}),
    ],
)
@pytest.mark.parametrize("num_steps", [5, 12])
def test_equals_kdiffusion_loops(solver, reference, solver_kwargs, num_steps):
    sigmas = karras_sigmas(num_steps)
    x = start(sigmas)
    expected = reference(GaussianDenoiser(), x, sigmas)
    model = GaussianDenoiser()
    ours = sample_kdiffusion(model, x, sigmas, solver, solver_kwargs=solver_kwargs)
    assert relative_error(ours, expected) < 1e-10  # float64 throughout
    assert model.calls == (2 * num_steps - 1 if solver == "heun" else num_steps)


LATE_ORDER = {"dpm_solver_3m": 2}
"""Noise-prediction 3M reaches its order late on these grids (measured doubling ratios 10-160
steps: -0.5, 2.16, 2.83, 4.03): the order checked at 20 -> 40 steps."""


@pytest.mark.parametrize("solver", sorted(BUILT_IN_SOLVERS))
def test_every_solver_converges_to_the_exact_gaussian_solution(solver):
    """Karras grids from sigma 80 to 0 on Gaussian data (closed-form ODE solution): doubling the
    steps from 20 to 40 shrinks the error by ``2^p`` with ``p`` near the solver's order (capped at
    3: at 40 steps the float64 floor of the final jump to sigma 0 is near for higher orders)."""
    errors = []
    for num_steps in (20, 40):
        sigmas = karras_sigmas(num_steps)
        x = start(sigmas)
        exact = exact_solution(x, float(sigmas[0]), 0.0)
        ours = sample_kdiffusion(GaussianDenoiser(), x, sigmas, solver)
        errors.append(relative_error(ours, exact))
    observed_order = math.log2(errors[0] / errors[1])
    expected_order = LATE_ORDER.get(solver, min(get_solver(solver).order, 3))
    assert observed_order > expected_order - 0.4, (errors, observed_order)
    assert errors[1] < 0.08


def test_denoiser_contract_and_extra_args():
    model = GaussianDenoiser()
    denoiser = KDiffusionDenoiser(model, extra_args={"scale": 2.0})
    assert denoiser.noise == EDM(0.002, 80.0)  # read off the model's sigma_min / sigma_max
    x = torch.ones(2, 2, 4, 4, dtype=torch.float64)
    expected = 2.0 * SIGMA_DATA**2 / (SIGMA_DATA**2 + 1.0)
    assert torch.allclose(denoiser(x, 1.0), torch.full_like(x, expected))
    per_sample = denoiser(x, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(per_sample[1], 2.0 * x[1])
    with pytest.raises(TypeError, match="EDM"):
        KDiffusionDenoiser(model, noise=FlowMatching())


def test_core_sampler_on_the_denoiser_equals_sample_kdiffusion():
    sigmas = karras_sigmas(8)
    x = start(sigmas)
    noise = EDM(0.002, 80.0)
    schedule = StepSchedule.from_kdiffusion_sigmas(noise, sigmas.numpy())
    core = sample(
        KDiffusionDenoiser(GaussianDenoiser(), noise), x, schedule, get_solver("unipc_bh2")
    )
    adapter = sample_kdiffusion(GaussianDenoiser(), x, sigmas, "unipc_bh2")
    assert torch.equal(core.sample, adapter)


def test_callback_and_sampler_signature():
    seen = []
    sigmas = karras_sigmas(4)
    sampler = kdiffusion_sampler("dpm_solver_pp_2s")
    parameters = list(inspect.signature(sampler).parameters)
    assert parameters == ["model", "x", "sigmas", "extra_args", "callback", "disable"]
    sampler(GaussianDenoiser(), start(sigmas), sigmas, callback=seen.append, disable=True)
    assert [info["i"] for info in seen] == list(range(7))  # 2 per step, 1 for the step to 0
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert seen[0]["sigma"] == pytest.approx(80.0)
    with pytest.raises(ValueError, match="unknown solver"):
        kdiffusion_sampler("lms")


def test_bad_sigmas_are_errors():
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="duplicated"):
        sample_kdiffusion(GaussianDenoiser(), x, [14.6, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_kdiffusion(GaussianDenoiser(), x, [1.0, 14.6, 0.0])


# --------------------------------------------------------------------------------------------
# exports
# --------------------------------------------------------------------------------------------


def export_cases() -> list[StepSchedule]:
    sd = DiscreteVP.stable_diffusion()
    return [
        karras(sd, 10),
        logsnr_uniform(sd, 7),
        ays_gaussian(sd, 10),
        diffusers_spacing(sd, 25, "leading", steps_offset=1),
        diffusers_spacing(sd, 1000, "trailing"),
        karras(EDM(), 40),
        flow_shifted(FlowMatching(shift=3.0), 28),
    ]


@pytest.mark.parametrize("schedule", export_cases(), ids=lambda s: s.metadata["spacing"])
def test_exports_end_in_zero_and_decrease(schedule):
    for sigmas in (to_kdiffusion_sigmas(schedule), to_comfyui_sigmas(schedule)):
        assert sigmas.dtype == torch.float32
        assert len(sigmas) == schedule.num_steps + 1
        assert sigmas[-1] == 0.0
        assert bool((sigmas[1:] < sigmas[:-1]).all())
    exact = to_kdiffusion_sigmas(schedule, dtype=torch.float64)
    np.testing.assert_allclose(exact.numpy(), schedule.to_kdiffusion_sigmas(), rtol=0)
    round_trip = StepSchedule.from_kdiffusion_sigmas(schedule.noise, exact.numpy())
    np.testing.assert_allclose(round_trip.times, schedule.times, rtol=1e-9, atol=1e-12)


def test_comfyui_needs_a_clean_end():
    noise = DiscreteVP.stable_diffusion()
    ends_at_t_min = StepSchedule(np.array([1.0, 0.5, noise.t_min]), noise)
    assert to_kdiffusion_sigmas(ends_at_t_min)[-1] > 0
    with pytest.raises(ValueError, match="end in 0"):
        to_comfyui_sigmas(ends_at_t_min)
