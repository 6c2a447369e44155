"""The plan executor: run any :class:`~stepsearch.plan.SolverPlan`, step by step.

Per step it uses the multistep predictor of the plan's order in the plan's prediction type and,
where the plan says so, the UniC corrector; the update maths is that of UniPC
(:mod:`stepsearch.solvers.unipc`) and multistep DPM-Solver (:mod:`stepsearch.solvers.dpm_solver`).
This is the per-step search space of S3 / USF (Liu et al. 2024, arXiv 2312.07243) restricted to
multistep predictors (one model evaluation per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from stepsearch.plan import CORRECTORS, PREDICTIONS
from stepsearch.solvers.base import (
    SolverState,
    check_choice,
    eps_from_denoised,
    first_order_update,
)
from stepsearch.solvers.dpm_solver import dpm_solver_multistep_correction
from stepsearch.solvers.unipc import UniPC, UniPCState, unic_update, unip_update

MAX_ORDER = 3


@dataclass(frozen=True, eq=False)
class PlanState(UniPCState):
    """UniPC's state plus ``eps_history``: the noise estimates of the last evaluations (newest
    last), computed from the sample the model saw (only for plans with noise-prediction steps)."""

    eps_history: tuple[Tensor, ...] = ()


class PlanSolver(UniPC):
    """Runs any valid :class:`SolverPlan` (registry name ``plan``). Step ``i`` (``t_i -> t_{i+1}``):

    1. if the plan puts a corrector on step ``i - 1``, UniC-p (``p = orders[i - 1]``) first
       replaces ``x_i`` by its corrected value, using the model output at ``x_i`` (no extra NFE);
    2. then a multistep predictor of order ``orders[i]``: ``"data"`` is UniP-p
       (:func:`~stepsearch.solvers.unipc.unip_update`; with ``variant="bh2"``, ``B(h) = e^h - 1``,
       it is DPM-Solver++(1 / 2M / 3M): the order-2 rule ``rho = 1/2`` and the order-3 order
       conditions give the same coefficients), ``"noise"`` is multistep DPM-Solver
       (:func:`~stepsearch.solvers.dpm_solver.dpm_solver_multistep_correction`, third order with the
       exact ``2 phi_3``).

    ``variant`` (``"bh1"``: ``B(h) = h``; ``"bh2"``) is UniPC's and applies to UniP and UniC. A
    noise step after a corrected sample starts from the corrected ``x_i`` with the model's own
    ``eps_i``: ``(alpha_s / alpha_t) x_i - sigma_s (e^h - 1) eps_i + ...`` (diffusers' UniPC with
    noise prediction does the same); otherwise the first-order part is the stable
    ``alpha_s denoised_i + sigma_s eps_i``. The corrector is UniC in data-prediction form whatever
    the predictions. Given a plain StepSchedule it runs :meth:`default_plan`, UniPC-2's plan, so
    ``plan`` on a schedule samples like ``unipc_<variant>``; ``order`` (3) is that plan's order.
    """

    state_type = PlanState
    plan_predictions = PREDICTIONS
    plan_correctors = CORRECTORS

    def __init__(self, variant: str = "bh2"):
        check_choice("variant", variant, ("bh1", "bh2"))
        super().__init__(variant=variant)
        self.plan_max_order = MAX_ORDER
        self.name = "plan"

    def config(self) -> dict[str, Any]:
        return {"variant": self.variant}

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        assert isinstance(state, PlanState) and state.solver_plan is not None
        plan = state.solver_plan
        now, target = state.level(i), state.target_level(i)
        corrected = i > 0 and plan.correctors[i - 1] == "unipc"
        x_start = unic_update(state, denoised, i, self.variant) if corrected else x
        order = plan.orders[i]
        next_state = replace(
            state,
            history=(*state.history, (now.t, denoised))[-MAX_ORDER:],
            last_sample=x_start,
            last_order=order,
        )
        if "noise" in plan.predictions:
            eps = eps_from_denoised(x, denoised, now)
            next_state = replace(next_state, eps_history=(*state.eps_history, eps)[-MAX_ORDER:])
        if target.is_clean:
            return denoised, next_state
        levels = [state.grid_levels[i - k] for k in range(order)]  # newest first
        if plan.predictions[i] == "data":
            outputs = [m for _, m in next_state.history[-order:]][::-1]
            return unip_update(x_start, outputs, levels, target, self.variant), next_state
        eps_outputs = list(next_state.eps_history[-order:])[::-1]
        if corrected:  # i > 0, so alpha_t > 0
            h = target.lambda_ - now.lambda_
            x_next = (target.alpha / now.alpha) * x_start - (
                target.sigma * math.expm1(h)
            ) * eps_outputs[0]
        else:
            x_next = first_order_update(x, denoised, now, target)
        if order > 1:
            x_next = x_next + dpm_solver_multistep_correction(eps_outputs, levels, target)
        return x_next, next_state
