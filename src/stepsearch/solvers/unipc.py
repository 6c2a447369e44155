"""UniPC (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", arXiv 2302.04867; reference code wl-zhao/UniPC, diffusers
``UniPCMultistepScheduler``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import (
    LOWER_ORDER_FINAL_BELOW,
    NoiseLevel,
    Solver,
    SolverState,
    check_choice,
    check_lower_order_final_below,
    linear_combination,
    multistep_order,
    multistep_plan,
)


@dataclass(frozen=True, eq=False)
class UniPCState(SolverState):
    """``history``: ``(t, denoised)`` of the last evaluations; ``last_sample``: the (corrected)
    sample the previous predictor started from; ``last_order``: that predictor's order (the next
    corrector uses the same)."""

    last_sample: Tensor | None = None
    last_order: int = 0


@dataclass(frozen=True)
class _Coefficients:
    """``h phi_1(h) = e^{-h} - 1``, ``B(h)`` and the order conditions ``R rho = b``."""

    h_phi_1: float
    b_h: float
    r_matrix: np.ndarray
    b_vector: np.ndarray


def _coefficients(h: float, ratios: list[float], variant: str, order: int) -> _Coefficients:
    """Data-prediction coefficients (``hh = -h``) for nodes ``r_k = (lambda_{s_k} - lambda_{s_0})
    / h`` (the last one 1): ``R[i, k] = r_k^i`` and ``b_i = (i + 1)! phi_{i+2}(hh) / B(h)`` with
    ``phi`` the exponential-integrator functions (Zhao et al. 2023, Sec. 3, UniC / UniP)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if variant == "bh1" else math.expm1(hh)
    nodes = np.array([*ratios, 1.0], dtype=np.float64)
    rows, values = [], []
    factorial = 1.0
    for i in range(1, order + 1):
        rows.append(nodes ** (i - 1))
        values.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return _Coefficients(h_phi_1, b_h, np.array(rows), np.array(values))


class UniPC(Solver):
    """UniPC-p: the UniP-p predictor and UniC-p corrector in data-prediction form, variants
    ``B(h) = h`` ("bh1") and ``B(h) = e^h - 1`` ("bh2"); global order ``p + 1``.

    Step ``t_i -> t_{i+1}`` (``h = lambda_{i+1} - lambda_i``, ``m_k`` the stored denoised
    estimates, ``D_k = (m_k - m_i) / r_k`` with ``r_k = (lambda_k - lambda_i) / h``)::

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} h phi_1 m_i
                  - alpha_{i+1} B(h) sum_k rho_k D_k

    The predictor uses the ``p - 1`` previous outputs (``rho`` from the order conditions, and
    ``rho = 1/2`` for p = 2 as in the paper's code; with ``B(h) = e^h - 1`` that is
    DPM-Solver++(2M)). The corrector runs at the start of the next ``step``: the model output at
    the predicted ``x_{i+1}`` (which is the next evaluation, so the corrector costs no extra NFE)
    joins as the node ``r = 1``, and the corrected sample replaces
    ``x_{i+1}`` for the next predictor (the model output itself is reused as is). After the last
    evaluation there is no corrector (diffusers' ``disable_corrector`` on the final step); the step
    to clean data returns ``denoised``. Warm-up: step ``i`` uses order at most ``i + 1``.

    ``lower_order_final`` lowers the order of the last steps (last 1, the one before at most 2) on
    schedules with fewer than ``lower_order_final_below`` steps (default 15, the rule of diffusers'
    DPM-Solver schedulers). diffusers' ``UniPCMultistepScheduler`` applies it at every step count:
    pass ``lower_order_final_below=None`` for parity with it.

    Orders (measured on the Gaussian test bed): UniPC-1 2.0, UniPC-2 (default) 3.0, UniPC-3 3.9-4.0
    from pure noise. For UniPC-3 the warm-up step (UniP-1 + UniC-1, local error ``O(h^3)``) limits
    the asymptotic order to 3; its constant is negligible from pure noise. The per-step orders and
    correctors are read from the state's :class:`~stepsearch.plan.SolverPlan`
    (:meth:`default_plan` spells out the rules above). bh1's ``B(h) = h`` makes corrections grow
    linearly with ``h``: on a first step of many units of ``lambda`` (flow matching from ``t = 1``)
    prefer bh2.
    """

    state_type = UniPCState
    uses_plan = True
    plan_correctors = ("none", "unipc")

    def __init__(
        self,
        variant: str = "bh2",
        order: int = 2,
        lower_order_final: bool = True,
        lower_order_final_below: int | None = LOWER_ORDER_FINAL_BELOW,
    ):
        check_choice("variant", variant, ("bh1", "bh2"))
        check_choice("order", order, (1, 2, 3))
        self.variant = variant
        self.solver_order = int(order)
        self.order = self.solver_order + 1
        self.plan_max_order = self.solver_order
        self.lower_order_final = bool(lower_order_final)
        self.lower_order_final_below = check_lower_order_final_below(lower_order_final_below)
        self.name = f"unipc_{variant}"

    def config(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "order": self.solver_order,
            "lower_order_final": self.lower_order_final,
            "lower_order_final_below": self.lower_order_final_below,
        }

    def step_order(self, step: int, num_steps: int) -> int:
        """The predictor order ``p`` used by step ``step`` of ``num_steps``."""
        return multistep_order(
            self.solver_order, step, num_steps, self.lower_order_final, self.lower_order_final_below
        )

    def default_plan(self, schedule: StepSchedule) -> SolverPlan:
        return multistep_plan(schedule, self.step_order, "data", "unipc")

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        assert isinstance(state, UniPCState) and state.solver_plan is not None
        plan = state.solver_plan
        now, target = state.level(i), state.target_level(i)
        if i > 0 and plan.correctors[i - 1] == "unipc":
            x = unic_update(state, denoised, i, self.variant)
        history = (*state.history, (now.t, denoised))[-self.solver_order :]
        order = plan.orders[i]
        next_state = state.evolve(history=history, last_sample=x, last_order=order)
        if target.is_clean:
            return denoised, next_state
        outputs = [m for _, m in history[-order:]][::-1]  # newest first
        levels = [state.grid_levels[i - k] for k in range(order)]
        return unip_update(x, outputs, levels, target, self.variant), next_state


def _differences(
    outputs: list[Tensor], levels: list[NoiseLevel], start: NoiseLevel, h: float
) -> tuple[list[float], list[Tensor]]:
    """Nodes ``r_k = (lambda_k - lambda_start) / h`` and scaled differences
    ``D_k = (m_k - m_start) / r_k`` of earlier outputs ``m_k`` (``outputs[0]`` is ``m_start``)."""
    ratios = [(level.lambda_ - start.lambda_) / h for level in levels]
    differences = [(m_k - outputs[0]) / r_k for m_k, r_k in zip(outputs[1:], ratios, strict=True)]
    return ratios, differences


def unip_update(
    x: Tensor, outputs: list[Tensor], levels: list[NoiseLevel], target: NoiseLevel, variant: str
) -> Tensor:
    """UniP-p (Zhao et al. 2023, data prediction) from ``levels[0]`` to ``target`` with the ``x0``
    estimates ``outputs`` at ``levels`` (newest first; their number is ``p``)."""
    now, order = levels[0], len(outputs)
    h = target.lambda_ - now.lambda_
    ratios, differences = _differences(outputs, levels[1:], now, h)
    coefficients = _coefficients(h, ratios, variant, order)
    x_next = (target.sigma / now.sigma) * x - (target.alpha * coefficients.h_phi_1) * outputs[0]
    if order == 1:
        return x_next
    if order == 2:
        rhos = np.array([0.5])
    else:
        rhos = np.linalg.solve(coefficients.r_matrix[:-1, :-1], coefficients.b_vector[:-1])
    correction = linear_combination(rhos.tolist(), differences)
    return x_next - (target.alpha * coefficients.b_h) * correction


def unic_update(state: UniPCState, denoised: Tensor, i: int, variant: str) -> Tensor:
    """UniC-p (Zhao et al. 2023, data prediction): correct the result of step ``i - 1`` (from
    ``state.last_sample``, with ``p = state.last_order`` and the ``x0`` estimates in
    ``state.history``) with the model output ``denoised`` at it (node ``r = 1``)."""
    assert state.last_sample is not None
    order = state.last_order
    now = state.grid_levels[i]
    levels = [state.grid_levels[i - 1 - k] for k in range(order)]  # start first, then older
    start = levels[0]
    outputs = [m for _, m in state.history[-order:]][::-1]
    h = now.lambda_ - start.lambda_
    ratios, differences = _differences(outputs, levels[1:], start, h)
    coefficients = _coefficients(h, ratios, variant, order)
    if order == 1:
        rhos = np.array([0.5])
    else:
        rhos = np.linalg.solve(coefficients.r_matrix, coefficients.b_vector)
    x_corrected = (now.sigma / start.sigma) * state.last_sample - (
        now.alpha * coefficients.h_phi_1
    ) * outputs[0]
    correction = linear_combination(rhos.tolist(), [*differences, denoised - outputs[0]])
    return x_corrected - (now.alpha * coefficients.b_h) * correction
