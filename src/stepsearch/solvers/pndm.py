"""Pseudo numerical methods (PNDM, Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds", arXiv 2202.09778): pseudo Runge-Kutta warm-up and pseudo linear
multistep (PLMS) with variable-step Adams-Bashforth coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import (
    NoiseLevel,
    Solver,
    SolverState,
    StagedState,
    StepInfo,
    check_choice,
    eps_from_denoised,
    first_order_update,
    linear_combination,
    noise_levels,
)


@dataclass(frozen=True, eq=False)
class PNDMState(StagedState):
    """``eps_history``: noise estimates ``(t, eps)`` at the last grid times, newest last;
    ``stage_eps``: the Runge-Kutta slopes ``k_1 ..`` of the current warm-up interval."""

    eps_history: tuple[tuple[float, Tensor], ...] = ()
    stage_eps: tuple[Tensor, ...] = ()


@cache
def _gauss_legendre(count: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(count)
    return (nodes + 1.0) / 2.0, weights / 2.0  # on [0, 1]


def adams_bashforth_coefficients(nodes: np.ndarray) -> np.ndarray:
    """Variable-step Adams-Bashforth weights ``c_j = int_0^1 L_j(u) du`` of the Lagrange basis on
    ``nodes`` (in units of the current step; the newest node is 0, older ones negative). For
    equally spaced nodes ``0, -1, -2, -3`` this gives PLMS's ``(55, -59, 37, -9) / 24``."""
    return np.array(
        _adams_bashforth_coefficients(tuple(np.asarray(nodes, dtype=np.float64).tolist()))
    )


@lru_cache(maxsize=4096)
def _adams_bashforth_coefficients(node_values: tuple[float, ...]) -> tuple[float, ...]:
    """Cached on the nodes: a schedule replays the same ones on every run."""
    nodes = np.asarray(node_values, dtype=np.float64)
    points, weights = _gauss_legendre(nodes.size)  # exact for degree <= 2 k - 1
    coefficients = np.empty(nodes.size)
    for j, node in enumerate(nodes):
        others = np.delete(nodes, j)
        basis = np.prod((points[:, None] - others[None]) / (node - others[None]), axis=1)
        coefficients[j] = float(weights @ basis)
    return tuple(coefficients.tolist())


def transfer(
    x: Tensor, denoised: Tensor, eps: Tensor, now: NoiseLevel, target: NoiseLevel, eps_bar: Tensor
) -> Tensor:
    """PNDM's transfer part ``phi(x_t, eps_bar, t, s)`` (Liu et al. 2022, Sec. 3): the DDIM step driven by
    the noise estimate ``eps_bar``, i.e. ``y_s = y_t + (sigma~_s - sigma~_t) eps_bar`` for
    ``y = x / alpha``. Written as the DDIM step with the model's own ``eps = eps(x_t)`` plus
    ``alpha_s (sigma~_s - sigma~_t) (eps_bar - eps)``, so nothing divides by ``alpha_t``."""
    x_ddim = first_order_update(x, denoised, now, target)
    if target.is_clean:
        return x_ddim
    scale = target.alpha * (target.kdiffusion_sigma - now.kdiffusion_sigma)
    return x_ddim.add_(eps_bar - eps, alpha=scale)  # x_ddim is a fresh tensor


class PNDM(Solver):
    """PNDM on any schedule: the DDIM ODE ``dy / dsigma~ = eps`` (``y = x / alpha``, ``sigma~ =
    sigma / alpha``) integrated with PNDM's transfer (:func:`transfer`) in k-diffusion sigma space.

    PLMS (Liu et al. 2022, Sec. 3) feeds the transfer ``(55 e_t - 59 e_{t-1} + 37 e_{t-2} -
    9 e_{t-3}) / 24``, the Adams-Bashforth weights for equal steps, which diffusers hard-codes for
    any grid. Here the weights integrate the Lagrange polynomial through the last ``order`` noise
    estimates over the actual step in ``sigma~`` (:func:`adams_bashforth_coefficients`; iPNDM /
    DEIS-style variable-step AB), so PLMS is exact for eps polynomial in ``sigma~`` on any grid.

    Warm-up (``warmup``):

    - ``"prk"`` (default, the paper's Algorithm 1): the first ``order - 1`` intervals are pseudo
      Runge-Kutta steps, i.e. classical RK4 in ``sigma~`` with evaluations at ``t_i``, twice at the
      ``sigma~`` midpoint, and at ``t_{i+1}`` (the paper's midpoint is half a timestep; the
      ``sigma~`` midpoint makes it RK4 on any grid). Global order 4; NFE ``n + 3 (order - 1)``; the midpoints are
      off-grid evaluations, the evaluation at ``t_{i+1}`` is RK4's ``k_4`` (on a predicted sample).
    - ``"lower_order"``: step ``i`` uses ``min(order, i + 1)`` estimates (the first step is DDIM),
      one evaluation per step (as in iPNDM). The Euler first step leaves an ``O(h^2)`` error, so
      the asymptotic global order is 2, with a constant proportional to how fast ``eps`` changes at
      the first time (tiny when sampling starts at pure noise).

    The step to clean data returns ``denoised``; an interval starting where ``alpha = 0`` is a
    DDIM step (RK4's midpoint in ``sigma~ = inf`` is meaningless) and still feeds the history.
    """

    name = "pndm"
    state_type = PNDMState

    def __init__(self, order: int = 4, warmup: str = "prk"):
        check_choice("order", order, (1, 2, 3, 4))
        check_choice("warmup", warmup, ("prk", "lower_order"))
        self.order = int(order)
        self.warmup = warmup

    def config(self) -> dict[str, Any]:
        return {"order": self.order, "warmup": self.warmup}

    def _nfe(self, num_steps: int, clean_end: bool, alpha_zero_start: bool) -> int:
        if self.warmup != "prk":
            return num_steps
        runge_kutta = sum(
            1
            for i in range(min(self.order - 1, num_steps))
            if not (clean_end and i == num_steps - 1) and not (alpha_zero_start and i == 0)
        )
        return num_steps + 3 * runge_kutta

    def plan(self, schedule: StepSchedule) -> tuple[StepInfo, ...]:
        noise = schedule.noise
        levels = noise_levels(noise, schedule.times)
        plan: list[StepInfo] = []
        for i in range(schedule.num_steps):
            now, target = levels[i], levels[i + 1]
            runge_kutta = (
                self.warmup == "prk"
                and i < self.order - 1
                and not (target.is_clean or now.alpha_is_zero)
            )
            if not runge_kutta:
                plan.append(StepInfo(now.t, i, 0, target.t))
                continue
            middle = 0.5 * (now.kdiffusion_sigma + target.kdiffusion_sigma)
            t_mid = float(noise.t_from_kdiffusion_sigma(middle))
            plan += [
                StepInfo(now.t, i, 0, t_mid),
                StepInfo(t_mid, i, 1, t_mid, on_grid=False),
                StepInfo(t_mid, i, 2, target.t, on_grid=False),
                StepInfo(target.t, i, 3, target.t),
            ]
        return tuple(plan)

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        assert isinstance(state, PNDMState)
        info, now, target = state.plan[i], state.level(i), state.target_level(i)
        eps = eps_from_denoised(x, denoised, now)
        if info.stage > 0:
            return self._runge_kutta_stage(state, eps, i)
        history = (*state.eps_history, (now.t, eps))[-self.order :]
        next_state = state.evolve(eps_history=history)
        if state.plan[min(i + 1, len(state.plan) - 1)].stage == 1:  # a Runge-Kutta interval
            x_next = transfer(x, denoised, eps, now, target, eps)
            return x_next, next_state.evolve(
                stage_x=(x,), stage_denoised=(denoised,), stage_eps=(eps,)
            )
        if target.is_clean or len(history) == 1:
            return first_order_update(x, denoised, now, target), next_state
        # the nodes (sigma~_{i-k} - sigma~_i) / (sigma~_s - sigma~_i), newest first, in float64
        # Python arithmetic (as numpy's) straight into the cached weights: no arrays per step
        grid, sigma_now = state.grid_levels, now.kdiffusion_sigma
        step = target.kdiffusion_sigma - sigma_now
        nodes = tuple(
            (grid[info.interval - k].kdiffusion_sigma - sigma_now) / step
            for k in range(len(history))
        )
        coefficients = _adams_bashforth_coefficients(nodes)
        eps_bar = linear_combination(coefficients, [e for _, e in history[::-1]])
        return transfer(x, denoised, eps, now, target, eps_bar), next_state

    def _runge_kutta_stage(self, state: PNDMState, eps: Tensor, i: int) -> tuple[Tensor, PNDMState]:
        """Pseudo Runge-Kutta stages 1-3 (classical RK4 in ``sigma~``; Liu et al. 2022, PRK)."""
        stage = state.plan[i].stage
        start = state.level(i - stage)
        slopes = (*state.stage_eps, eps)  # k_1 .. k_{stage + 1}
        x_start, denoised_start = state.stage_x[0], state.stage_denoised[0]
        if stage == 3:
            eps_bar = linear_combination((1 / 6, 2 / 6, 2 / 6, 1 / 6), slopes)
        else:
            eps_bar = slopes[-1]  # k_2 to the midpoint again, k_3 to the end
        x_next = transfer(x_start, denoised_start, slopes[0], start, state.target_level(i), eps_bar)
        if stage == 3:
            return x_next, state.evolve(stage_x=(), stage_denoised=(), stage_eps=())
        return x_next, state.evolve(stage_eps=slopes)
