"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", arXiv 2010.02502)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import (
    NoiseLevel,
    Solver,
    SolverState,
    eps_from_denoised,
    first_order_update,
    randn_like,
)


class DDIM(Solver):
    """DDIM on any schedule, one model evaluation per step.

    ``eta = 0`` (deterministic) is the first-order exponential integrator of the probability-flow
    ODE in data-prediction form (Lu et al. 2022b, DPM-Solver++, Sec. 4 with k = 1; equal to DDIM's
    eq. 12 with sigma = 0, to DPM-Solver-1 and to Euler in k-diffusion sigma space)::

        x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - exp(-h)) denoised,   h = lambda_s - lambda_t.

    ``eta > 0`` samples DDIM's generalised posterior (Song et al. 2021, eq. 12 and 16)::

        x_s = alpha_s denoised + sqrt(sigma_s^2 - c^2) eps + c z,   z ~ N(0, I),
        c = eta sigma_s sqrt(1 - exp(-2 h)),

    where ``sigma_s^2 (1 - exp(-2h))`` is the DDPM posterior variance; for variance-preserving
    schedules it equals diffusers' ``(1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)``.
    ``eta = 1`` is ancestral DDPM sampling. The step to clean data returns ``denoised``.

    Unlike diffusers' ``DDIMScheduler`` (which takes the previous timestep as ``t - T // N``), the
    target of every step is the next time of the given schedule.
    """

    order = 1
    uses_plan = True
    plan_predictions = ("data", "noise")

    def __init__(self, eta: float = 0.0):
        eta = float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
        self.eta = eta
        self.name = "ddim"
        self.stochastic = eta > 0.0

    def config(self) -> dict[str, Any]:
        return {"eta": self.eta}

    def default_plan(self, schedule: StepSchedule) -> SolverPlan:
        """Order 1 at every step (data and noise prediction coincide at first order)."""
        return SolverPlan.uniform(schedule, 1)

    def direction_std(self, now: NoiseLevel, target: NoiseLevel) -> float:
        """The coefficient ``sqrt(sigma_s^2 - c^2)`` of ``eps`` in the step from ``now`` to
        ``target`` (Song et al. 2021, eq. 12; ``sigma_s`` for ``eta = 0``)."""
        if target.is_clean:
            return 0.0
        h = target.lambda_ - now.lambda_
        return target.sigma * math.sqrt(1.0 + self.eta**2 * math.expm1(-2.0 * h))

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        now, target = state.level(i), state.target_level(i)
        if target.is_clean or self.eta == 0.0:
            return first_order_update(x, denoised, now, target), state
        h = target.lambda_ - now.lambda_
        posterior_variance_fraction = -math.expm1(-2.0 * h)  # 1 - exp(-2h)
        noise_std = self.eta * target.sigma * math.sqrt(posterior_variance_fraction)
        direction_std = self.direction_std(now, target)
        eps = eps_from_denoised(x, denoised, now)
        z = randn_like(x, generator)
        x_next = target.alpha * denoised + direction_std * eps + noise_std * z
        return x_next, state
