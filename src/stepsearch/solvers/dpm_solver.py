"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927) and DPM-Solver++ (Lu et al. 2022b, arXiv 2211.01095).

Both are exponential integrators of the probability-flow ODE in ``lambda = log(alpha / sigma)``:
DPM-Solver expands the noise prediction ``eps`` (singlestep, orders 1-3), DPM-Solver++ the data
prediction ``denoised`` (multistep 2M / 3M, singlestep 2S). Reference code: LuChengTHU/dpm-solver
``dpm_solver_pytorch.py``; diffusers ``DPMSolverMultistepScheduler`` / ``...SinglestepScheduler``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import (
    LOWER_ORDER_FINAL_BELOW,
    NoiseLevel,
    Solver,
    SolverState,
    StagedState,
    StepInfo,
    check_choice,
    check_lower_order_final_below,
    eps_from_denoised,
    first_order_intervals,
    first_order_update,
    interval_plan,
    interval_stages,
    linear_combination,
    multistep_order,
    multistep_plan,
    noise_levels,
)

_STAGE_FRACTIONS: dict[int, tuple[float, ...]] = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}
"""DPM-Solver-k's intermediate points ``lambda_t + r h`` (Lu et al. 2022, Algorithms 1 and 2)."""


def _singlestep_plan(
    schedule: StepSchedule, fractions: tuple[float, ...], noise_prediction: bool
) -> tuple[StepInfo, ...]:
    """One evaluation at each ``t_i`` plus one at each intermediate ``lambda_t + r h``; a single
    (first-order) evaluation on the step to clean data and, for noise prediction, out of alpha = 0."""
    noise = schedule.noise
    levels = noise_levels(noise, schedule.times)
    plan: list[StepInfo] = []
    for i in range(schedule.num_steps):
        now, target = levels[i], levels[i + 1]
        stages = [now.t]
        if not (target.is_clean or (noise_prediction and now.alpha_is_zero)):
            h = target.lambda_ - now.lambda_
            stages += [float(noise.t_from_lambda(now.lambda_ + r * h)) for r in fractions]
        plan.extend(interval_plan(i, stages, target.t))
    return tuple(plan)


class DPMSolver(Solver):
    """DPM-Solver-k, singlestep, noise prediction (Lu et al. 2022, Sec. 3; Algorithm 1 is
    DPM-Solver-2, Algorithm 2 DPM-Solver-3).

    Each interval ``t -> s`` (``h = lambda_s - lambda_t``) evaluates the model at ``t`` and at
    ``k - 1`` intermediate points ``lambda_t + r h`` (``r = 1/2`` for k = 2; ``1/3, 2/3`` for k = 3),
    so ``evaluation_times`` holds them and the NFE is ``k`` per interval. With
    ``eps_t = (x_t - alpha_t denoised_t) / sigma_t`` and ``D_j = eps(u_j, s_j) - eps_t``:

    - k = 1: ``x_s = (alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_t`` (= DDIM);
    - k = 2: ``x_s = ... - sigma_s / (2 r_1) (e^h - 1) D_1``;
    - k = 3: ``u_2 = ... - sigma_{s_2} (r_2 / r_1) ((e^{r_2 h} - 1) / (r_2 h) - 1) D_1``,
      ``x_s = ... - (sigma_s / r_2) ((e^h - 1) / h - 1) D_2``.

    The shared first-order part ``(alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_t`` is computed
    as the algebraically equal ``alpha_s denoised_t + sigma_s eps_t`` (substitute
    ``x_t = alpha_t denoised_t + sigma_t eps_t``), which avoids ``1 / alpha_t`` and the cancellation
    of two large terms in float32. ``r`` is recomputed from the actual evaluation times.

    Special intervals take one evaluation and a first-order step: the last one to clean data
    (returns ``denoised``) and one that starts where ``alpha_t = 0`` (flow matching at ``t = 1``):
    there ``e^h = alpha_s sigma_t / (sigma_s alpha_t)`` is infinite and the higher-order terms are
    meaningless. (The first-order step out of ``alpha = 0`` errs by ``O(alpha_s^2)``, negligible on
    logSNR or Karras grids but ``O(1/n^2)`` on time-uniform flow grids.) The same ``e^h`` amplifies
    the corrections on any step spanning many units of ``lambda`` near ``alpha ~ 0``: finite but
    inaccurate there (prefer data prediction, DPM-Solver++).
    """

    state_type = StagedState

    def __init__(self, order: int = 2):
        check_choice("order", order, (1, 2, 3))
        self.order = int(order)
        self.name = f"dpm_solver_{self.order}"
        self.uses_plan = self.order == 1  # DPM-Solver-1 is DDIM: one first-order step per step
        self.plan_predictions = ("noise", "data")

    def config(self) -> dict[str, Any]:
        return {"order": self.order}

    def plan(self, schedule: StepSchedule) -> tuple[StepInfo, ...]:
        return _singlestep_plan(schedule, _STAGE_FRACTIONS[self.order], noise_prediction=True)

    def default_plan(self, schedule: StepSchedule) -> SolverPlan:
        if self.order != 1:
            return super().default_plan(schedule)
        return SolverPlan.uniform(schedule, 1, prediction="noise")

    def _nfe(self, num_steps: int, clean_end: bool, alpha_zero_start: bool) -> int:
        single = first_order_intervals(num_steps, clean_end, alpha_zero_start)
        return self.order * num_steps - (self.order - 1) * single

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        assert isinstance(state, StagedState)
        stages = interval_stages(state, i)
        stage = state.plan[i].stage
        target = state.target_level(i)
        if len(stages) == 1:
            return first_order_update(x, denoised, state.level(i), target), state
        first = i - stage
        levels = [state.level(first + k) for k in range(stage + 1)]
        start, end = levels[0], state.target_level(first + len(stages) - 1)
        xs, ds = (*state.stage_x, x), (*state.stage_denoised, denoised)
        eps = [eps_from_denoised(xk, dk, lk) for xk, dk, lk in zip(xs, ds, levels, strict=True)]
        h = end.lambda_ - start.lambda_
        ratios = [(level.lambda_ - start.lambda_) / h for level in levels[1:]]
        x_next = target.alpha * ds[0] + target.sigma * eps[0]  # the first-order part
        if stage == 1 and len(stages) == 2:  # DPM-Solver-2, final stage
            r_1 = ratios[0]
            x_next = x_next - (target.sigma / (2.0 * r_1) * math.expm1(h)) * (eps[1] - eps[0])
        elif stage == 1:  # DPM-Solver-3: u_2 at lambda_t + r_2 h
            r_1, r_2 = ratios[0], (target.lambda_ - start.lambda_) / h
            phi_22 = math.expm1(r_2 * h) / (r_2 * h) - 1.0
            x_next = x_next - (target.sigma * (r_2 / r_1) * phi_22) * (eps[1] - eps[0])
        elif stage == 2:  # DPM-Solver-3, final stage
            r_2 = ratios[1]
            phi_2 = math.expm1(h) / h - 1.0
            x_next = x_next - (target.sigma / r_2 * phi_2) * (eps[2] - eps[0])
        if stage == len(stages) - 1:
            return x_next, state.evolve(stage_x=(), stage_denoised=())
        return x_next, state.evolve(stage_x=xs, stage_denoised=ds)


class DPMSolverPP2S(Solver):
    """DPM-Solver++(2S), singlestep, data prediction (Lu et al. 2022b, Algorithm 1, r = 1/2).

    Each interval ``t -> s`` evaluates at ``t`` and at ``u`` with ``lambda_u = lambda_t + r h``::

        u   = (sigma_u / sigma_t) x_t - alpha_u (e^{-r h} - 1) denoised_t
        D   = (1 - 1/(2r)) denoised_t + 1/(2r) denoised(u)
        x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D

    NFE 2 per interval; the last interval to clean data takes one evaluation and returns
    ``denoised``. Data prediction stays finite out of ``alpha = 0``, so no other special case.
    """

    order = 2
    name = "dpm_solver_pp_2s"
    state_type = StagedState
    _R = 0.5

    def plan(self, schedule: StepSchedule) -> tuple[StepInfo, ...]:
        return _singlestep_plan(schedule, (self._R,), noise_prediction=False)

    def _nfe(self, num_steps: int, clean_end: bool, alpha_zero_start: bool) -> int:
        single = first_order_intervals(num_steps, clean_end, alpha_zero_start, at_alpha_zero=False)
        return 2 * num_steps - single

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        assert isinstance(state, StagedState)
        target = state.target_level(i)
        if state.plan[i].stage == 0:
            x_next = first_order_update(x, denoised, state.level(i), target)
            if len(interval_stages(state, i)) == 1:
                return x_next, state
            return x_next, state.evolve(stage_x=(x,), stage_denoised=(denoised,))
        start, middle = state.level(i - 1), state.level(i)
        h = target.lambda_ - start.lambda_
        r = (middle.lambda_ - start.lambda_) / h
        combined = linear_combination(
            (1.0 - 1.0 / (2.0 * r), 1.0 / (2.0 * r)), (state.stage_denoised[0], denoised)
        )
        x_next = first_order_update(state.stage_x[0], combined, start, target)
        return x_next, state.evolve(stage_x=(), stage_denoised=())


class _Multistep(Solver):
    """The options shared by the two multistep DPM-Solvers (data prediction :class:`DPMSolverPP`,
    noise prediction :class:`DPMSolverMultistep`): ``order`` (one of ``order_choices``), diffusers'
    ``lower_order_final`` rule and ``legacy_3m``; their plan is :func:`multistep_plan` with the
    solver's one prediction (``plan_predictions[0]``) and no corrector."""

    uses_plan = True
    order_choices: tuple[int, ...]
    name_format: str

    def __init__(
        self,
        order: int = 2,
        lower_order_final: bool = True,
        lower_order_final_below: int | None = LOWER_ORDER_FINAL_BELOW,
        legacy_3m: bool = False,
    ):
        check_choice("order", order, self.order_choices)
        self.order = int(order)
        self.plan_max_order = self.order
        self.lower_order_final = bool(lower_order_final)
        self.lower_order_final_below = check_lower_order_final_below(lower_order_final_below)
        self.legacy_3m = bool(legacy_3m)
        self.name = self.name_format.format(order=self.order)

    def config(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "lower_order_final": self.lower_order_final,
            "lower_order_final_below": self.lower_order_final_below,
            "legacy_3m": self.legacy_3m,
        }

    def step_order(self, step: int, num_steps: int) -> int:
        """The order used by step ``step`` of ``num_steps`` (before the clean-end rule)."""
        return multistep_order(
            self.order, step, num_steps, self.lower_order_final, self.lower_order_final_below
        )

    def default_plan(self, schedule: StepSchedule) -> SolverPlan:
        return multistep_plan(schedule, self.step_order, self.plan_predictions[0], "none")


class DPMSolverPP(_Multistep):
    """DPM-Solver++ multistep, data prediction (Lu et al. 2022b, Algorithm 2 and its third-order
    extension in ``dpm_solver_pytorch.py``); order 1 is DDIM, 2 is "2M", 3 is "3M".

    3M weights the second difference ``D2 ~ h^2 denoised'' / 2`` by ``-2 phi_3``, the Taylor
    coefficient ``int_0^h e^{u - h} u^2 / 2 du / h^2 * 2``. dpm-solver's and diffusers' 3M use
    ``-phi_3`` (half of it), so their "3M" integrates a quadratic ``denoised(lambda)`` inexactly and
    converges at order 2 (measured slope 2.1 vs 3.1 here); ``legacy_3m=True`` reproduces them for
    parity. Asymptotically the first-order warm-up step also limits 3M to order 2; from pure noise
    its error constant is negligible, from an intermediate start (img2img) it dominates.

    Step ``t_i -> t_{i+1}`` with ``h = lambda_{i+1} - lambda_i``, previous steps
    ``h_0 = lambda_i - lambda_{i-1}``, ``h_1 = lambda_{i-1} - lambda_{i-2}``, ``r_k = h_k / h``:

    - 2M: ``D = (1 + 1/(2 r_0)) denoised_i - 1/(2 r_0) denoised_{i-1}``,
      ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D``;
    - 3M: ``D1_0 = (denoised_i - denoised_{i-1}) / r_0``, ``D1_1 = (denoised_{i-1} -
      denoised_{i-2}) / r_1``, ``D1 = D1_0 + r_0/(r_0 + r_1) (D1_0 - D1_1)``,
      ``D2 = (D1_0 - D1_1)/(r_0 + r_1)``, ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi_1
      denoised_i + alpha_{i+1} phi_2 D1 - alpha_{i+1} phi_3 D2`` with ``phi_1 = e^{-h} - 1``,
      ``phi_2 = phi_1 / h + 1``, ``phi_3 = phi_2 / h - 1/2``.

    Warm-up: step ``i`` uses order at most ``i + 1`` (as in the paper and diffusers), so the first
    step is first order. ``lower_order_final`` (diffusers): on schedules with fewer than
    ``lower_order_final_below`` steps (default 15; ``None``: always) the last step is first order
    and the one before at most second order. The step to clean data is always first order (returns
    ``denoised``). One evaluation per step, all on the grid. The per-step orders are read from the
    state's :class:`~stepsearch.plan.SolverPlan` (:meth:`default_plan` spells out the rules above).
    """

    order_choices = (1, 2, 3)
    name_format = "dpm_solver_pp_{order}m"

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        assert state.solver_plan is not None
        now, target = state.level(i), state.target_level(i)
        history = (*state.history, (now.t, denoised))[-self.order :]
        next_state = state.evolve(history=history)
        order = state.solver_plan.orders[i]
        if target.is_clean or order == 1:
            return first_order_update(x, denoised, now, target), next_state
        levels = [state.grid_levels[i - k] for k in range(order)]  # newest first
        outputs = [d for _, d in history[-order:]][::-1]
        return dpm_solver_pp_multistep_update(
            x, outputs, levels, target, self.legacy_3m
        ), next_state


def _step_ratios(levels: list[NoiseLevel], h: float) -> list[float]:
    """``r_k = h_k / h`` with ``h_k = lambda_{i-k} - lambda_{i-k-1}`` (levels newest first)."""
    return [(levels[k].lambda_ - levels[k + 1].lambda_) / h for k in range(len(levels) - 1)]


def _second_differences(outputs: list[Tensor], r_0: float, r_1: float) -> tuple[Tensor, Tensor]:
    """``D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1)`` and ``D2 = (D1_0 - D1_1) / (r_0 + r_1)``
    of three outputs (newest first), ``D1_k = (m_k - m_{k+1}) / r_k``: ``D1 ~ h m'``, ``D2 ~ h^2 m''
    / 2`` (Lu et al. 2022b, the third-order multistep update of ``dpm_solver_pytorch.py``)."""
    d1_0 = (outputs[0] - outputs[1]) / r_0
    d1_1 = (outputs[1] - outputs[2]) / r_1
    d1 = d1_0 + (r_0 / (r_0 + r_1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r_0 + r_1)
    return d1, d2


def dpm_solver_pp_multistep_update(
    x: Tensor,
    outputs: list[Tensor],
    levels: list[NoiseLevel],
    target: NoiseLevel,
    legacy_3m: bool = False,
) -> Tensor:
    """One DPM-Solver++(2M) / (3M) step from ``levels[0]`` to ``target`` with the ``x0`` estimates
    ``outputs`` (newest first; their number is the order, 2 or 3) at ``levels``. See
    :class:`DPMSolverPP` for the formulas and ``legacy_3m``."""
    now = levels[0]
    h = target.lambda_ - now.lambda_
    ratios = _step_ratios(levels, h)
    ratio = target.sigma / now.sigma
    phi_1 = math.expm1(-h)
    if len(outputs) == 2:
        r_0 = ratios[0]
        combined = linear_combination((1.0 + 0.5 / r_0, -0.5 / r_0), outputs)
        return ratio * x - (target.alpha * phi_1) * combined
    d1, d2 = _second_differences(outputs, *ratios)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    d2_scale = 1.0 if legacy_3m else 2.0
    return (
        ratio * x
        - (target.alpha * phi_1) * outputs[0]
        + (target.alpha * phi_2) * d1
        - (target.alpha * phi_3 * d2_scale) * d2
    )


def dpm_solver_multistep_correction(
    eps_outputs: list[Tensor],
    levels: list[NoiseLevel],
    target: NoiseLevel,
    legacy_3m: bool = False,
) -> Tensor:
    """The higher-order terms of a multistep DPM-Solver step (noise prediction; Lu et al. 2022,
    the multistep form of diffusers' ``algorithm_type="dpmsolver"``), to add to the first-order
    step ``(alpha_s / alpha_t) x_t - sigma_s (e^h - 1) eps_t``. ``eps_outputs`` are the noise
    estimates at ``levels`` (newest first; their number is the order, 2 or 3)::

        2M: - sigma_s (e^h - 1) D / 2,          D = (eps_t - eps_{t-1}) / r_0
        3M: - sigma_s phi_2 D1 - 2 sigma_s phi_3 D2,
            phi_2 = (e^h - 1) / h - 1,  phi_3 = phi_2 / h - 1/2,

    with ``D1, D2`` as in :func:`_second_differences`. ``2 phi_3`` is the Taylor coefficient of
    ``h^2 eps'' / 2`` (``int_0^h e^{h - u} u^2 / 2 du = h^2 phi_3``); diffusers and dpm-solver use
    ``phi_3`` (``legacy_3m=True``), which makes their noise-prediction 3M second order.
    """
    now = levels[0]
    h = target.lambda_ - now.lambda_
    ratios = _step_ratios(levels, h)
    phi_1 = math.expm1(h)
    if len(eps_outputs) == 2:
        return (eps_outputs[0] - eps_outputs[1]) * (-0.5 * target.sigma * phi_1 / ratios[0])
    d1, d2 = _second_differences(eps_outputs, *ratios)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    d2_scale = 1.0 if legacy_3m else 2.0
    return linear_combination((-target.sigma * phi_2, -target.sigma * phi_3 * d2_scale), (d1, d2))


@dataclass(frozen=True, eq=False)
class NoiseHistoryState(SolverState):
    """``eps_history``: the noise estimates ``eps = (x - alpha denoised) / sigma`` of the last
    evaluations, newest last (alongside ``history``'s ``x0`` estimates)."""

    eps_history: tuple[Tensor, ...] = ()


class DPMSolverMultistep(_Multistep):
    """Multistep DPM-Solver, noise prediction (Lu et al. 2022's exponential integrator with
    multistep derivative estimates; diffusers ``DPMSolverMultistepScheduler(algorithm_type=
    "dpmsolver", solver_type="midpoint")``); order 2 is "2M", 3 is "3M".

    Step ``t_i -> t_{i+1}`` adds :func:`dpm_solver_multistep_correction` to the first-order step,
    which is computed as the equal ``alpha_s denoised_t + sigma_s eps_t`` (no ``1 / alpha_t``, so a
    first step out of ``alpha = 0`` is fine). Warm-up, ``lower_order_final`` and the clean end as
    in :class:`DPMSolverPP`. The noise-prediction corrections scale with ``e^h``: on steps of many
    units of ``lambda`` near ``alpha ~ 0`` prefer data prediction (DPM-Solver++).
    ``legacy_3m=True`` reproduces diffusers' (second-order) 3M.
    """

    state_type = NoiseHistoryState
    plan_predictions = ("noise",)
    order_choices = (2, 3)
    name_format = "dpm_solver_{order}m"

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        assert isinstance(state, NoiseHistoryState) and state.solver_plan is not None
        now, target = state.level(i), state.target_level(i)
        eps = eps_from_denoised(x, denoised, now)
        eps_history = (*state.eps_history, eps)[-self.order :]
        next_state = state.evolve(eps_history=eps_history)
        x_next = first_order_update(x, denoised, now, target)
        order = state.solver_plan.orders[i]
        if target.is_clean or order == 1:
            return x_next, next_state
        levels = [state.grid_levels[i - k] for k in range(order)]  # newest first
        outputs = list(eps_history[-order:])[::-1]
        correction = dpm_solver_multistep_correction(outputs, levels, target, self.legacy_3m)
        return x_next.add_(correction), next_state
