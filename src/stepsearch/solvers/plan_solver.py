"""The plan executor: run any :class:`~stepsearch.plan.SolverPlan`, step by step.

Rule ``"unipc"`` steps use the multistep predictors of UniPC (:mod:`stepsearch.solvers.unipc`) and
multistep DPM-Solver (:mod:`stepsearch.solvers.dpm_solver`), with UniC as corrector; rule
``"taylor"`` steps are the unified step of S3 / USF (Liu, Ning, Yang & Wang, ICLR 2024, arXiv
2312.07243, Sec. 3, eq. 6-7), with chosen derivative-estimation points, the first-derivative
relaxation ``(1 + c h)`` and the pseudo-corrector; an analytical first step skips the network at
``t_0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch.noise import FloatArray
from stepsearch.plan import CORRECTORS, ORDERS, PREDICTIONS, SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import (
    NoiseLevel,
    SolverState,
    StepInfo,
    check_choice,
    compute_dtype,
    eps_from_denoised,
    first_order_update,
    linear_combination,
)
from stepsearch.solvers.dpm_solver import dpm_solver_multistep_correction
from stepsearch.solvers.unipc import UniPC, UniPCState, unic_update, unip_update

MAX_UNIPC_ORDER = 3
_SERIES_BELOW = 1.0
"""``phi_k(z)`` comes from its power series for ``|z|`` below this (the recurrence cancels)."""


@dataclass(frozen=True, eq=False)
class PlanState(UniPCState):
    """UniPC's state plus ``eps_history``: the noise estimates of the last points (newest last),
    computed from the sample the model saw (only for plans with noise-prediction steps), and
    ``last_start_corrected``: whether the previous step started from a corrected sample.
    ``history`` holds one ``(t, denoised)`` per grid point, the analytical first step's included."""

    eps_history: tuple[Tensor, ...] = ()
    last_start_corrected: bool = False


class PlanSolver(UniPC):
    """Runs any valid :class:`SolverPlan` (registry name ``plan``) with exact NFE accounting.

    Step ``i`` (``s = t_i -> t = t_{i+1}``, ``h = lambda_t - lambda_s``):

    1. if step ``i - 1`` has a corrector, ``x_i`` is first replaced by its corrected value, using
       the model output at ``x_i`` (the evaluation step ``i`` needs anyway: no extra NFE):
       ``"unipc"`` is UniC-p (``p = orders[i - 1]``); ``"pseudo"`` recomputes step ``i - 1`` by
       its Taylor rule with that output appended as an estimation point (order + 1);
    2. rule ``"unipc"``: the multistep predictor of order ``orders[i]``: ``"data"`` is UniP-p
       (:func:`~stepsearch.solvers.unipc.unip_update`; with ``variant="bh2"``, ``B(h) = e^h - 1``,
       it is DPM-Solver++(1 / 2M / 3M)), ``"noise"`` is multistep DPM-Solver
       (:func:`~stepsearch.solvers.dpm_solver.dpm_solver_multistep_correction`, exact ``2 phi_3``);
    3. rule ``"taylor"``: :func:`taylor_terms` added to the first-order step (USF eq. 6 / 7).

    ``variant`` (``"bh1"``: ``B(h) = h``; ``"bh2"``) is UniPC's and applies to UniP and UniC. A
    noise step after a corrected sample starts from the corrected ``x_i`` with the model's own
    ``eps_i``: ``(alpha_t / alpha_s) x_i - sigma_t (e^h - 1) eps_i + ...`` (diffusers' UniPC with
    noise prediction does the same); otherwise the first-order part is the equal, stabler
    data-prediction form. UniC is in data-prediction form whatever the predictions.

    Analytical first step (``plan.first_step``): :meth:`start` computes step 0 before any model
    call, from the ``x0`` estimate ``"zero_x0"`` (``eps := x_T / sqrt(alpha_0^2 + sigma_0^2)``) or
    ``"data_mean"`` (``x0 :=`` the ``data_mean`` given here, e.g. :func:`data_mean_of` of the
    objective's data); ``evaluation_times`` then omits ``t_0`` and the NFE is ``n - 1``.
    :func:`~stepsearch.sampling.sample` calls :meth:`start`; loops that drive solvers themselves
    must call it too (the diffusers adapters take plain schedules, whose plans never skip).

    Given a plain StepSchedule it runs :meth:`default_plan`, UniPC-2's plan, so ``plan`` on a
    schedule samples like ``unipc_<variant>``; ``order`` (3) is that plan's order.
    """

    state_type = PlanState
    plan_predictions = PREDICTIONS
    plan_correctors = CORRECTORS

    def __init__(self, variant: str = "bh2", data_mean: Any = None):
        check_choice("variant", variant, ("bh1", "bh2"))
        super().__init__(variant=variant)
        self.plan_max_order = max(ORDERS)
        self.name = "plan"
        self.data_mean = None if data_mean is None else _as_mean(data_mean)

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"variant": self.variant}
        if self.data_mean is not None:
            config["data_mean"] = self.data_mean.tolist()
        return config

    # plans and budgets ------------------------------------------------------------------------
    def check_plan(self, plan: SolverPlan) -> None:
        """Any valid plan runs; ``"data_mean"`` first steps need this solver's ``data_mean``."""
        if plan.first_step == "data_mean" and self.data_mean is None:
            raise ValueError(
                "step 0: first_step 'data_mean' needs the data mean at run time: "
                "PlanSolver(data_mean=...) (see stepsearch.solvers.plan_solver.data_mean_of)"
            )

    def init(self, x_T: Tensor, schedule: StepSchedule | SolverPlan) -> SolverState:
        del x_T
        schedule, solver_plan = self.resolve_plan(schedule)
        assert solver_plan is not None
        entries = _evaluations(schedule, solver_plan)
        times = np.array([info.t for info in entries], dtype=np.float64)
        return PlanState(
            schedule=schedule, evaluation_times=times, plan=entries, solver_plan=solver_plan
        )

    def evaluation_times(self, schedule: StepSchedule | SolverPlan) -> FloatArray:
        """Times of the model evaluations: ``t_0 .. t_{n-1}``, without ``t_0`` after an
        analytical first step."""
        schedule, solver_plan = self.resolve_plan(schedule)
        assert solver_plan is not None
        return np.array([info.t for info in _evaluations(schedule, solver_plan)], dtype=np.float64)

    def nfe(
        self,
        num_steps: int | StepSchedule | SolverPlan,
        *,
        clean_end: bool | None = None,
        alpha_zero_start: bool | None = None,
    ) -> int:
        """One evaluation per step; a plan's :attr:`~stepsearch.plan.SolverPlan.nfe` (one less
        with an analytical first step)."""
        count = super().nfe(num_steps, clean_end=clean_end, alpha_zero_start=alpha_zero_start)
        return num_steps.nfe if isinstance(num_steps, SolverPlan) else count

    # steps ------------------------------------------------------------------------------------
    def start(self, state: SolverState, x_T: Tensor) -> tuple[Tensor, SolverState]:
        """Take an analytical first step (no model call) if the plan has one."""
        assert isinstance(state, PlanState) and state.solver_plan is not None
        if not state.solver_plan.analytical_first_step:
            return x_T, state
        x = x_T.to(compute_dtype(x_T.dtype))
        denoised = self.analytical_denoised(state.solver_plan.first_step, x, state.grid_levels[0])
        x_next, next_state = self._grid_step(state, x, denoised, 0)
        return x_next.to(x_T.dtype), next_state

    def analytical_denoised(self, first_step: str, x_T: Tensor, level: NoiseLevel) -> Tensor:
        """The ``x0`` estimate an analytical first step uses at ``level`` (module
        :mod:`stepsearch.plan`): ``"zero_x0"``: ``eps := x_T / r`` with ``r = sqrt(alpha^2 +
        sigma^2)``, so ``x0 = (x_T - sigma eps) / alpha = alpha x_T / (r (r + sigma))``;
        ``"data_mean"``: the solver's ``data_mean``, broadcast to ``x_T``."""
        if first_step == "zero_x0":
            r = math.hypot(level.alpha, level.sigma)
            return x_T * (level.alpha / (r * (r + level.sigma)))
        assert first_step == "data_mean" and self.data_mean is not None
        mean = self.data_mean.to(dtype=x_T.dtype, device=x_T.device)
        try:
            return torch.broadcast_to(mean, x_T.shape).clone()
        except RuntimeError:
            raise ValueError(
                f"data_mean of shape {tuple(mean.shape)} does not broadcast to x_T "
                f"{tuple(x_T.shape)}"
            ) from None

    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        assert isinstance(state, PlanState) and state.solver_plan is not None
        return self._grid_step(state, x, denoised, state.plan[i].interval)

    def _grid_step(
        self, state: PlanState, x: Tensor, denoised: Tensor, k: int
    ) -> tuple[Tensor, PlanState]:
        """Step ``k`` of the plan (grid ``t_k -> t_{k+1}``) from the sample ``x`` at ``t_k`` and
        its ``x0`` estimate ``denoised`` (the model's, or the analytical one at ``k = 0``)."""
        plan = state.solver_plan
        assert plan is not None
        now, target = state.grid_levels[k], state.grid_levels[k + 1]
        corrector = plan.correctors[k - 1] if k > 0 else "none"
        if corrector == "unipc":
            x_start = unic_update(state, denoised, k, self.variant)
        elif corrector == "pseudo":
            x_start = self._pseudo_corrected(state, x, denoised, k)
        else:
            x_start = x
        corrected = corrector != "none"
        order, keep = plan.orders[k], max(MAX_UNIPC_ORDER, plan.lookback + 2)
        next_state = state.evolve(
            history=(*state.history, (now.t, denoised))[-keep:],
            last_sample=x_start,
            last_order=order,
            last_start_corrected=corrected,
        )
        eps = None
        if "noise" in plan.predictions:
            eps = eps_from_denoised(x, denoised, now)
            next_state = next_state.evolve(eps_history=(*state.eps_history, eps)[-keep:])
        if target.is_clean:
            return denoised, next_state
        prediction = plan.predictions[k]
        levels = [state.grid_levels[k - j] for j in range(order)]  # newest first
        if plan.rules[k] == "unipc" and prediction == "data":
            outputs = [m for _, m in next_state.history[-order:]][::-1]
            return unip_update(x_start, outputs, levels, target, self.variant), next_state
        x_next = _first_order(x_start, denoised, eps, now, target, prediction, corrected)
        if plan.rules[k] == "unipc":
            if order > 1:
                eps_outputs = list(next_state.eps_history[-order:])[::-1]
                x_next = x_next + dpm_solver_multistep_correction(eps_outputs, levels, target)
            return x_next, next_state
        values = _values(next_state, prediction)
        earlier = [
            (state.grid_levels[k - j].lambda_, values[-1 - j]) for j in plan.estimation_points[k]
        ]
        terms = taylor_terms(
            values[-1], earlier, now, target, order, prediction, plan.relaxations[k]
        )
        return (x_next if terms is None else x_next + terms), next_state

    def _pseudo_corrected(self, state: PlanState, x: Tensor, denoised: Tensor, k: int) -> Tensor:
        """USF's pseudo-corrector: step ``k - 1`` recomputed from its start with the model output
        at ``t_k`` (seen at ``x``) as one more estimation point (``Delta lambda = h``) and order
        ``orders[k - 1] + 1``; the model output itself is kept as it is."""
        plan = state.solver_plan
        assert plan is not None and state.last_sample is not None
        j = k - 1
        start, now = state.grid_levels[j], state.grid_levels[k]
        prediction = plan.predictions[j]
        values = _values(state, prediction)
        new = denoised if prediction == "data" else eps_from_denoised(x, denoised, now)
        earlier = [
            (state.grid_levels[j - o].lambda_, values[-1 - o]) for o in plan.estimation_points[j]
        ]
        earlier.append((now.lambda_, new))
        denoised_start = state.history[-1][1]
        eps_start = state.eps_history[-1] if prediction == "noise" else None
        x_next = _first_order(
            state.last_sample,
            denoised_start,
            eps_start,
            start,
            now,
            prediction,
            state.last_start_corrected,
        )
        terms = taylor_terms(
            values[-1], earlier, start, now, plan.orders[j] + 1, prediction, plan.relaxations[j]
        )
        return x_next if terms is None else x_next + terms


# ------------------------------------------------------------------------------------------------
# the unified step (USF)
# ------------------------------------------------------------------------------------------------


def phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_{j >= 0} z^j / (j + k)!`` (``phi_1(z) = (e^z - 1) / z``, ``phi_{k+1}(z) =
    (phi_k(z) - 1 / k!) / z``; USF Sec. 3): the power series for small ``|z|``, where the
    recurrence cancels, else the recurrence."""
    if abs(z) < _SERIES_BELOW:
        term, total = 1.0 / math.factorial(k), 0.0
        for j in range(30):
            total += term
            term *= z / (j + k + 1)
        return total
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def derivative_weights(ratios: Sequence[float]) -> np.ndarray:
    """``W`` with ``h^k f^(k)(s) ~ sum_j W[k - 1, j] (f_j - f_s)`` for points at ``lambda_s + r_j
    h``: the inverse of the Taylor matrix ``T[j, k - 1] = r_j^k / k!`` (``k = 1 .. m``, ``m`` the
    number of points; USF's ``T[k][j] = Delta lambda_j^k / k!`` scaled by ``h^k``)."""
    m = len(ratios)
    taylor = np.array(
        [[r**k / math.factorial(k) for k in range(1, m + 1)] for r in ratios], dtype=np.float64
    )
    return np.linalg.inv(taylor)


def taylor_terms(
    value: Tensor,
    earlier: Sequence[tuple[float, Tensor]],
    now: NoiseLevel,
    target: NoiseLevel,
    order: int,
    prediction: str,
    relaxation: float = 0.0,
) -> Tensor | None:
    """The derivative terms ``k = 1 .. K - 1`` of USF's unified step from ``now`` (``s``) to
    ``target`` (``t``), order ``K``, to add to the first-order step (USF eq. 6 / 7)::

        noise: - sum_k sigma_t h^{k+1} phi_{k+1}(h)  eps^(k)(s)
        data:  + sum_k alpha_t h^{k+1} phi_{k+1}(-h) x0^(k)(s)

    ``value`` is ``f(s)`` (the ``x0`` or ``eps`` estimate at ``s``), ``earlier`` the ``(lambda_j,
    f_j)`` of the estimation points; derivatives ``1 .. min(K - 1, m)`` come from
    :func:`derivative_weights` (``m`` points), the others are dropped. The ``k = 1`` term is
    multiplied by ``(1 + relaxation h)``. ``None`` when there is no term.
    """
    h = target.lambda_ - now.lambda_
    count = min(order - 1, len(earlier))
    if count < 1:
        return None
    weights = derivative_weights([(lam - now.lambda_) / h for lam, _ in earlier])
    hh, scale = (-h, target.alpha) if prediction == "data" else (h, -target.sigma)
    factors = [scale * h * phi(k + 1, hh) for k in range(1, count + 1)]
    factors[0] *= 1.0 + relaxation * h
    coefficients = [
        sum(factors[k] * weights[k, j] for k in range(count)) for j in range(len(earlier))
    ]
    return linear_combination(coefficients, [f_j - value for _, f_j in earlier])


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def data_mean_of(data: Any) -> Tensor:
    """The data mean for ``"data_mean"`` first steps (``PlanSolver(data_mean=...)``), from what an
    objective's data provides: a Gaussian-mixture test bed (``sum_k w_k mu_k``, exact), a
    :class:`~stepsearch.models.source.SampleSource` whose denoiser is one (its exact mean) or whose
    ``reference_data`` lives in the solver's space (``sample_shape``; the mean over samples), or a
    tensor of data samples (the mean over the first dimension). Returned as float64, shaped like
    one sample."""
    model = getattr(data, "model", None)
    if model is not None and hasattr(model, "means") and hasattr(model, "weights"):
        data = model
    if hasattr(data, "means") and hasattr(data, "weights") and hasattr(data, "shape"):
        mean = (data.weights.double()[:, None] * data.means.double()).sum(0)
        return mean.reshape(tuple(data.shape))
    if isinstance(data, Tensor):
        return data.detach().double().mean(0).cpu()
    reference = getattr(data, "reference_data", None)
    if isinstance(reference, Tensor):
        shape = tuple(getattr(data, "sample_shape", reference.shape[1:]))
        if tuple(reference.shape[1:]) != shape:
            raise ValueError(
                f"reference data of shape {tuple(reference.shape[1:])} per sample is not in the "
                f"solver's space {shape} (decoded latents?): give the mean of x0 in that space"
            )
        return reference.detach().double().mean(0).cpu()
    raise ValueError(f"cannot find a data mean in {type(data).__name__}")


def _as_mean(value: Any) -> Tensor:
    mean = torch.as_tensor(value, dtype=torch.float64).detach().to("cpu").clone()
    if not torch.isfinite(mean).all():
        raise ValueError("data_mean must be finite")
    return mean


def _evaluations(schedule: StepSchedule, plan: SolverPlan) -> tuple[StepInfo, ...]:
    """One evaluation at ``t_k`` for each step ``k``, skipping step 0 when it is analytical."""
    times = schedule.times.tolist()
    first = 1 if plan.analytical_first_step else 0
    return tuple(StepInfo(times[k], k, 0, times[k + 1]) for k in range(first, schedule.num_steps))


def _values(state: PlanState, prediction: str) -> Sequence[Tensor]:
    """The ``x0`` (``"data"``) or ``eps`` (``"noise"``) estimates of the last points, newest last."""
    if prediction == "data":
        return [m for _, m in state.history]
    return state.eps_history


def _first_order(
    x: Tensor,
    denoised: Tensor,
    eps: Tensor | None,
    now: NoiseLevel,
    target: NoiseLevel,
    prediction: str,
    corrected: bool,
) -> Tensor:
    """The ``k = 0`` term with the start sample: DDIM's data form, which equals the noise form
    ``(alpha_t / alpha_s) x - sigma_t (e^h - 1) eps`` when ``x`` is the sample the estimates were
    made at; after a corrector (``corrected``), noise prediction uses that form literally."""
    if prediction == "data" or not corrected:
        return first_order_update(x, denoised, now, target)
    assert eps is not None  # a corrected start is never t_0, so alpha_s > 0
    h = target.lambda_ - now.lambda_
    return (target.alpha / now.alpha) * x - (target.sigma * math.expm1(h)) * eps
