"""Euler and Heun in k-diffusion sigma space (Karras, Aittala, Aila & Laine 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", arXiv 2206.00364, Algorithms 1 and 2).

With ``y = x / alpha_t`` and the k-diffusion sigma ``sigma_t / alpha_t = exp(-lambda_t)`` (written
``sigma~`` below) the probability-flow ODE is ``dy / dsigma~ = d`` with ``d = (y - denoised) /
sigma~``, which in ``x`` is just the noise estimate ``eps = (x - alpha_t denoised) / sigma_t``.
The updates are computed in ``x`` (multiplying through by ``alpha_s``) so that nothing divides by
``alpha_t`` (``alpha = 0`` at flow matching's ``t = 1``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import (
    Solver,
    SolverState,
    StagedState,
    StepInfo,
    first_order_intervals,
    first_order_update,
    linear_combination,
    noise_levels,
)


class Euler(Solver):
    """Euler's method in sigma space (Karras et al. 2022, Algorithm 1 without churn)::

        y_s = y_t + (sigma~_s - sigma~_t) d_t,   i.e.   x_s = alpha_s denoised + sigma_s eps_t.

    It is the same update as deterministic DDIM (``first_order_update``). One evaluation per step;
    the step to ``sigma = 0`` returns ``denoised``.
    """

    order = 1
    name = "euler"
    uses_plan = True
    plan_predictions = ("data", "noise")

    def default_plan(self, schedule: StepSchedule) -> SolverPlan:
        return SolverPlan.uniform(schedule, 1)

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        return first_order_update(x, denoised, state.level(i), state.target_level(i)), state


class Heun(Solver):
    """Heun's second-order method in sigma space (Karras et al. 2022, Algorithm 2, deterministic).

    Interval ``t -> s``: evaluation at ``t`` gives the Euler predictor ``x^_s``; the second
    evaluation, at ``s`` on ``x^_s``, gives ``d'_s`` and the trapezoidal correction::

        y_s = y_t + (sigma~_s - sigma~_t) (d_t + d'_s) / 2
            = y^_s + (sigma~_s - sigma~_t) (d'_s - d_t) / 2,

    i.e. ``x_s = x^_s + alpha_s (sigma~_s - sigma~_t) (eps'_s - eps_t) / 2``. Evaluation times are
    ``t_0, t_1, t_1, t_2, t_2, ...`` (each inner grid time twice, as in diffusers'
    ``HeunDiscreteScheduler``): NFE ``2n - 1`` with a clean end, whose step to ``sigma = 0`` is Euler
    (returns ``denoised``), and ``2n`` otherwise. An interval starting where ``alpha = 0``
    (``sigma~ = inf``, flow matching at ``t = 1``) is an Euler step too: the trapezoid over an
    infinite sigma interval diverges (one evaluation less). The correction's factor
    ``alpha_s (sigma~_s - sigma~_t) = -sigma_s (e^h - 1)`` also makes single steps spanning many
    units of ``lambda`` at high noise inaccurate (e.g. 3 zero-SNR steps from ``sigma~ = 4096``).
    """

    order = 2
    name = "heun"
    state_type = StagedState

    def plan(self, schedule: StepSchedule) -> tuple[StepInfo, ...]:
        levels = noise_levels(schedule.noise, schedule.times)
        plan: list[StepInfo] = []
        for i in range(schedule.num_steps):
            t, s = levels[i].t, levels[i + 1].t
            euler_only = levels[i + 1].is_clean or levels[i].alpha_is_zero
            plan.append(StepInfo(t, i, 0, s))
            if not euler_only:
                plan.append(StepInfo(s, i, 1, s))
        return tuple(plan)

    def _nfe(self, num_steps: int, clean_end: bool, alpha_zero_start: bool) -> int:
        return 2 * num_steps - first_order_intervals(num_steps, clean_end, alpha_zero_start)

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        assert isinstance(state, StagedState)
        info = state.plan[i]
        target = state.target_level(i)
        if info.stage == 0:
            x_euler = first_order_update(x, denoised, state.level(i), target)
            heun = i + 1 < len(state.plan) and state.plan[i + 1].interval == info.interval
            if not heun:
                return x_euler, state
            return x_euler, state.evolve(stage_x=(x,), stage_denoised=(denoised,))
        start = state.level(i - 1)
        # alpha_s (sigma~_s - sigma~_t) = sigma_s (1 - e^h), finite for alpha_t > 0.
        h = target.lambda_ - start.lambda_
        scale = -target.sigma * math.expm1(h) / 2.0
        # x^_s + scale (eps'_s - eps_t), eps = (x - alpha denoised) / sigma, as one linear
        # combination of x^_s, denoised'_s, x_t, denoised_t (four kernels instead of six)
        x_next = linear_combination(
            (
                1.0 + scale / target.sigma,
                -scale * target.alpha / target.sigma,
                -scale / start.sigma,
                scale * start.alpha / start.sigma,
            ),
            (x, denoised, state.stage_x[0], state.stage_denoised[0]),
        )
        return x_next, state.evolve(stage_x=(), stage_denoised=())
