"""The solver contract.

A solver turns a :class:`~stepsearch.schedule.StepSchedule` into a list of *evaluation times* (where
the denoiser is called, one entry per model evaluation, so ``len(...)`` is the NFE) and advances the
sample once per evaluation::

    state = solver.init(x_T, schedule)
    x, state = solver.start(state, x_T)               # x_T, unless a step needs no model call
    for i, t in enumerate(state.evaluation_times):
        denoised = denoiser(x, t)                     # the model call happens outside the solver
        x, state = solver.step(state, x, denoised, i)

``step`` returns the sample at ``evaluation_times[i + 1]`` (or the final sample after the last
evaluation). Each call maps one-to-one onto a diffusers ``scheduler.step()``. State is an immutable
dataclass passed in and returned; solvers keep no hidden counters and never edit inputs in place.

Notation (Lu et al. 2022, DPM-Solver, Sec. 2): ``x_t = alpha_t x0 + sigma_t eps``, the half log-SNR
``lambda_t = log(alpha_t / sigma_t)``, the step ``h = lambda_s - lambda_t`` from ``t`` to ``s < t``,
the k-diffusion sigma ``sigma_t / alpha_t = exp(-lambda_t)``. Solvers receive only ``denoised``
(``x0`` estimates); ``eps = (x - alpha_t denoised) / sigma_t``. Schedule maths is float64 Python
floats; tensors keep their dtype (float16 / bfloat16 inputs are computed in float32 and cast back).

Two special points every solver handles explicitly:

- **Clean end** (``t = 0``: ``sigma = 0``, ``lambda = +inf``): the last step returns the denoised
  estimate, which is what every first-order update gives there (diffusers'
  ``final_sigmas_type="zero"``, k-diffusion's Euler step to ``sigma = 0``).
- **alpha = 0** (flow matching at ``t = 1``, ``lambda`` clamped at ``LAMBDA_MIN``): data-prediction
  updates stay finite. Noise-prediction and sigma-space corrections carry ``alpha_s / alpha_t =
  inf`` there, so the solvers that use them (DPM-Solver-2/3, Heun, PNDM's Runge-Kutta warm-up) take
  a first-order step out of such a point.

Large steps in ``lambda``: those corrections scale with ``e^h = alpha_s sigma_t / (sigma_s alpha_t)``
(and UniPC bh1's with ``B(h) = h``). Across one step of many units of ``lambda`` (a Karras grid
from flow matching's ``t = 1``, three zero-SNR steps) they stay finite but are meaningless; the
data-prediction solvers (DDIM, DPM-Solver++, UniPC bh2) stay bounded on any grid.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from stepsearch.noise import LAMBDA_MIN, FloatArray, NoiseSchedule
from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule

LOWER_ORDER_FINAL_BELOW = 15
"""diffusers' rule: ``lower_order_final`` applies to schedules with fewer steps than this."""


@dataclass(frozen=True)
class StepInfo:
    """One model evaluation in a solver's plan.

    ``t`` is the evaluation time, ``interval`` the schedule step ``t_i -> t_{i+1}`` it belongs to,
    ``stage`` 0 for the evaluation at ``t_i`` and 1, 2, ... for later evaluations inside the same
    interval (intermediate points of singlestep methods, Heun's second evaluation at ``t_{i+1}``),
    ``t_next`` the time of the sample ``step`` returns after it, ``on_grid`` whether ``t`` is one of
    the schedule's times (False for the intermediate points of singlestep methods).
    """

    t: float
    interval: int
    stage: int
    t_next: float
    on_grid: bool = True


@dataclass(frozen=True)
class NoiseLevel:
    """``alpha_t``, ``sigma_t`` and ``lambda_t`` of one time, as float64 Python floats."""

    t: float
    alpha: float
    sigma: float
    lambda_: float

    @classmethod
    def at(cls, noise: NoiseSchedule, t: float) -> NoiseLevel:
        return noise_levels(noise, [t])[0]

    @property
    def is_clean(self) -> bool:
        """``t = 0``: ``sigma = 0``, ``lambda = +inf``."""
        return self.sigma == 0.0

    @property
    def alpha_is_zero(self) -> bool:
        """Pure noise (flow matching at ``t = 1``): ``lambda`` sits at its clamp ``LAMBDA_MIN``."""
        return self.alpha == 0.0 or self.lambda_ <= LAMBDA_MIN + 1e-9

    @property
    def kdiffusion_sigma(self) -> float:
        """``sigma_t / alpha_t = exp(-lambda_t)`` (``exp(-LAMBDA_MIN)`` where ``alpha = 0``)."""
        return math.exp(-self.lambda_)


def noise_levels(
    noise: NoiseSchedule, times: Sequence[float] | FloatArray
) -> tuple[NoiseLevel, ...]:
    """:class:`NoiseLevel` of each time (vectorised: three schedule calls in all)."""
    array = np.asarray(times, dtype=np.float64).reshape(-1)
    alphas = np.asarray(noise.alpha(array)).tolist()
    sigmas = np.asarray(noise.sigma(array)).tolist()
    lambdas = np.asarray(noise.lambda_(array)).tolist()
    return tuple(
        NoiseLevel(t, a, s, lam)
        for t, a, s, lam in zip(array.tolist(), alphas, sigmas, lambdas, strict=True)
    )


def one_per_interval_plan(schedule: StepSchedule) -> tuple[StepInfo, ...]:
    """One evaluation per interval, at ``t_0 .. t_{n-1}`` (every first-order and multistep solver)."""
    times = schedule.times.tolist()
    return tuple(StepInfo(times[i], i, 0, times[i + 1]) for i in range(schedule.num_steps))


@dataclass(frozen=True, eq=False)
class SolverState:
    """What every solver carries between steps; solvers subclass it to add their memory.

    ``evaluation_times[i]`` is where the ``i``-th model evaluation happens (read-only float64; may
    repeat a time, e.g. Heun evaluates at ``t_{i+1}`` twice); ``plan[i]`` says which interval and
    stage that evaluation belongs to (default: one evaluation per interval). ``history`` holds
    previous ``(t, denoised)`` pairs, newest last, for multistep methods. ``solver_plan`` is the
    :class:`~stepsearch.plan.SolverPlan` being run (per-step order, prediction, corrector) for the
    solvers that read one (``Solver.uses_plan``), else ``None``. ``grid_levels`` and
    ``evaluation_levels`` cache ``alpha, sigma, lambda`` of the schedule's times and of the
    evaluation times (filled in when left empty).

    States hold references to the tensors passed to ``step``; callers must not modify those in
    place afterwards. ``step`` makes the next state with :meth:`evolve` (new memory, the checked
    fields shared). States compare by identity (they hold tensors).
    """

    schedule: StepSchedule
    evaluation_times: FloatArray
    plan: tuple[StepInfo, ...] = ()
    history: tuple[tuple[float, Tensor], ...] = ()
    solver_plan: SolverPlan | None = None
    grid_levels: tuple[NoiseLevel, ...] = ()
    evaluation_levels: tuple[NoiseLevel, ...] = ()

    def __post_init__(self) -> None:
        times = self.evaluation_times
        if not (
            isinstance(times, np.ndarray)
            and times.dtype == np.float64
            and not times.flags.writeable
        ):
            times = np.array(times, dtype=np.float64).reshape(-1)
            times.setflags(write=False)
            object.__setattr__(self, "evaluation_times", times)
        if not self.plan:
            object.__setattr__(self, "plan", one_per_interval_plan(self.schedule))
        if len(self.plan) != times.size:
            raise ValueError(f"plan has {len(self.plan)} entries for {times.size} evaluations")
        noise = self.schedule.noise
        if not self.grid_levels:
            object.__setattr__(self, "grid_levels", noise_levels(noise, self.schedule.times))
        if not self.evaluation_levels:
            object.__setattr__(self, "evaluation_levels", noise_levels(noise, times))

    def evolve(self: _State, **memory: Any) -> _State:
        """A copy of this state with new values of its memory fields (``history``, ``stage_x``,
        ...): the state ``step`` returns.

        Unlike :func:`dataclasses.replace`, no ``__post_init__`` runs again (it is the per-step hot
        path): the fields that ``__post_init__`` checks and fills in (:data:`CHECKED_FIELDS`) are
        shared with this state, and changing them here is a ``ValueError``.
        """
        fields = type(self).__dataclass_fields__
        for name in memory:
            if name not in fields or name in CHECKED_FIELDS:
                raise ValueError(
                    f"{type(self).__name__}.evolve: {name!r} is not a memory field "
                    f"(checked fields {sorted(CHECKED_FIELDS)} are fixed at init)"
                )
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(memory)
        return new

    @property
    def num_evaluations(self) -> int:
        return len(self.plan)

    def level(self, i: int) -> NoiseLevel:
        """``alpha, sigma, lambda`` at evaluation ``i``."""
        return self.evaluation_levels[i]

    def target_level(self, i: int) -> NoiseLevel:
        """``alpha, sigma, lambda`` at ``plan[i].t_next``, where step ``i`` lands."""
        info = self.plan[i]
        end = self.grid_levels[info.interval + 1]
        if info.t_next == end.t:
            return end
        return self.evaluation_levels[i + 1]


CHECKED_FIELDS = frozenset(
    ("schedule", "evaluation_times", "plan", "solver_plan", "grid_levels", "evaluation_levels")
)
"""The :class:`SolverState` fields set once by ``init`` (and checked there), never by ``step``."""

_State = TypeVar("_State", bound=SolverState)


@dataclass(frozen=True, eq=False)
class StagedState(SolverState):
    """State of solvers with several evaluations per interval (singlestep methods, Heun).

    ``stage_x`` and ``stage_denoised`` hold the samples the model saw in the current interval and its
    ``x0`` estimates there, in evaluation order; both are empty at the start of an interval.
    """

    stage_x: tuple[Tensor, ...] = ()
    stage_denoised: tuple[Tensor, ...] = ()


class Solver(ABC):
    """A sampling rule for the probability-flow ODE (or SDE) on any strictly decreasing schedule.

    Attributes:
        name: registry key (:data:`stepsearch.solvers.SOLVERS`).
        order: the global convergence order on smooth problems (1 for DDIM, 2 for Heun, ...).
        stochastic: whether ``step`` draws noise (then it takes a ``generator``).

    Subclasses implement :meth:`plan` (where the model is evaluated) and :meth:`_step` (one update,
    on tensors already in the compute dtype), and set ``state_type`` to their typed state.
    """

    name: str
    order: int
    stochastic: bool = False
    state_type: type[SolverState] = SolverState

    uses_plan: bool = False
    """Whether the solver reads its per-step choices from a :class:`SolverPlan` (one evaluation
    per step, multistep updates); the others take only a :class:`StepSchedule`."""
    plan_max_order: int = 1
    plan_predictions: tuple[str, ...] = ("data",)
    plan_correctors: tuple[str, ...] = ("none",)

    # plan -------------------------------------------------------------------------------------
    def plan(self, schedule: StepSchedule) -> tuple[StepInfo, ...]:
        """The model evaluations in call order (default: one per interval, at ``t_0 .. t_{n-1}``)."""
        return one_per_interval_plan(schedule)

    def evaluation_times(self, schedule: StepSchedule | SolverPlan) -> FloatArray:
        """Times of the model evaluations, in call order; ``len`` is the NFE."""
        schedule = self.resolve_plan(schedule)[0]
        return np.array([info.t for info in self.plan(schedule)], dtype=np.float64)

    def default_plan(self, schedule: StepSchedule) -> SolverPlan:
        """The solver's own per-step choices on ``schedule`` as a :class:`SolverPlan` (only for
        solvers with ``uses_plan``; singlestep methods, Heun and PNDM evaluate the model several
        times per step and have none)."""
        raise ValueError(
            f"solver {self.name!r} evaluates the model off the grid or several times per step; "
            "its steps cannot be written as a SolverPlan (use the 'plan' solver to run plans)"
        )

    def check_plan(self, plan: SolverPlan) -> None:
        """Raise ``ValueError`` (naming the step) unless this solver can run ``plan``."""
        if not self.uses_plan:
            self.default_plan(plan.schedule)  # raises the reason
        for i, (order, prediction, corrector) in enumerate(
            zip(plan.orders, plan.predictions, plan.correctors, strict=True)
        ):
            if order > self.plan_max_order:
                raise ValueError(
                    f"step {i}: solver {self.name!r} runs orders up to {self.plan_max_order}, the "
                    f"plan asks for {order} (the 'plan' solver runs any plan)"
                )
            if prediction not in self.plan_predictions:
                raise ValueError(
                    f"step {i}: solver {self.name!r} runs {' / '.join(self.plan_predictions)} "
                    f"prediction, the plan asks for {prediction!r} "
                    "(the 'plan' solver runs any plan)"
                )
            if corrector not in self.plan_correctors:
                raise ValueError(
                    f"step {i}: solver {self.name!r} runs corrector "
                    f"{' / '.join(self.plan_correctors)}, the plan asks for {corrector!r} "
                    "(the 'plan' solver runs any plan)"
                )
        extensions = plan.extensions()
        if extensions:
            raise ValueError(
                f"{extensions[0]}: solver {self.name!r} runs version-1 plans only "
                "(the 'plan' solver runs any plan)"
            )

    def resolve_plan(
        self, schedule: StepSchedule | SolverPlan
    ) -> tuple[StepSchedule, SolverPlan | None]:
        """``(schedule, plan)`` to run: a StepSchedule means :meth:`default_plan` (``None`` for
        solvers without plans); a SolverPlan is checked with :meth:`check_plan`."""
        if isinstance(schedule, SolverPlan):
            self.check_plan(schedule)
            return schedule.schedule, schedule
        if not isinstance(schedule, StepSchedule):
            raise TypeError(f"expected a StepSchedule or SolverPlan, got {type(schedule).__name__}")
        return schedule, self.default_plan(schedule) if self.uses_plan else None

    def init(self, x_T: Tensor, schedule: StepSchedule | SolverPlan) -> SolverState:
        """Start state for sampling ``x_T`` (a sample at the first time) along ``schedule``, or
        along a :class:`SolverPlan` (a StepSchedule means the solver's :meth:`default_plan`)."""
        del x_T
        schedule, solver_plan = self.resolve_plan(schedule)
        plan = self.plan(schedule)
        times = np.array([info.t for info in plan], dtype=np.float64)
        return self.state_type(
            schedule=schedule, evaluation_times=times, plan=plan, solver_plan=solver_plan
        )

    def start(self, state: SolverState, x_T: Tensor) -> tuple[Tensor, SolverState]:
        """Work before the first model evaluation: the sample that evaluation sees and the state
        to step from (default: ``x_T`` and ``state`` unchanged; the ``plan`` solver takes an
        analytical first step here, which calls no model)."""
        return x_T, state

    # budget -----------------------------------------------------------------------------------
    def nfe(
        self,
        num_steps: int | StepSchedule | SolverPlan,
        *,
        clean_end: bool | None = None,
        alpha_zero_start: bool | None = None,
    ) -> int:
        """Exact model evaluations on a schedule of ``num_steps`` steps.

        The count can depend on two facts of the schedule: whether it ends at clean data
        (``clean_end``, default True) and whether it starts where ``alpha = 0`` (flow matching at
        ``t = 1``; ``alpha_zero_start``, default False). Pass a StepSchedule / SolverPlan instead
        of a count to read both from it.
        """
        num_steps, clean_end, alpha_zero_start = schedule_facts(
            num_steps, clean_end, alpha_zero_start
        )
        return self._nfe(num_steps, clean_end, alpha_zero_start)

    def _nfe(self, num_steps: int, clean_end: bool, alpha_zero_start: bool) -> int:
        """Evaluations for ``num_steps`` steps (default: one per step)."""
        del clean_end, alpha_zero_start
        return num_steps

    def num_steps_for_nfe(
        self,
        nfe: int,
        *,
        clean_end: bool | None = None,
        alpha_zero_start: bool | None = None,
        like: StepSchedule | SolverPlan | None = None,
    ) -> int:
        """The step count that spends exactly ``nfe`` model evaluations (the inverse of
        :meth:`nfe`); ``ValueError`` naming the nearest reachable budgets if none does.

        The count depends on whether the schedule ends at clean data (``clean_end``, default True)
        and starts where ``alpha = 0`` (``alpha_zero_start``, default False); ``like`` reads both
        from a schedule of the kind to be run (e.g. ``make_schedule(noise, 1, "time_uniform")``)
        instead. This is the one NFE -> steps rule: it agrees with counting
        ``evaluation_times`` of such schedules for every registered solver. ``nfe(n)`` grows
        strictly with ``n`` and ``nfe(n) >= n``, so a bisection over ``1 .. nfe`` answers in
        ``O(log nfe)`` calls of :meth:`_nfe` (each O(1)).
        """
        if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
        nfe = int(nfe)
        if like is not None:
            _, clean_end, alpha_zero_start = schedule_facts(like, clean_end, alpha_zero_start)
        clean = True if clean_end is None else bool(clean_end)
        alpha_zero = bool(alpha_zero_start)

        def spent(steps: int) -> int:
            return self._nfe(steps, clean, alpha_zero)

        low, high = 1, nfe  # the answer, if any, is the least n with spent(n) >= nfe: n <= nfe
        while low < high:
            middle = (low + high) // 2
            if spent(middle) >= nfe:
                high = middle
            else:
                low = middle + 1
        num_steps = low
        if spent(num_steps) == nfe:
            return num_steps
        above = num_steps if spent(num_steps) > nfe else num_steps + 1
        below = above - 1 if above > 1 else None
        facts = f"clean end {clean}, alpha = 0 start {alpha_zero}"
        nearest = f"{spent(above)} ({_steps(above)})"
        if below is not None:
            nearest = f"{spent(below)} ({_steps(below)}) or {nearest}"
        raise ValueError(
            f"solver {self.name!r} cannot spend exactly {nfe} model evaluations ({facts}); "
            f"nearest reachable: {nearest}"
        )

    # step -------------------------------------------------------------------------------------
    def step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, SolverState]:
        """Advance after evaluation ``i``: return the next sample and the next state.

        ``x`` is the sample the model saw at ``evaluation_times[i]`` and ``denoised`` its ``x0``
        estimate; neither is modified.
        """
        if not isinstance(state, self.state_type):
            raise TypeError(
                f"{type(self).__name__} needs a {self.state_type.__name__} from its own init(), "
                f"got {type(state).__name__}"
            )
        check_step_index(state, i)
        if x.shape != denoised.shape:
            raise ValueError(f"x {tuple(x.shape)} and denoised {tuple(denoised.shape)} differ")
        dtype = compute_dtype(x.dtype)
        x_next, next_state = self._step(
            state,
            x if x.dtype == dtype else x.to(dtype),
            denoised if denoised.dtype == dtype else denoised.to(dtype),
            i,
            generator,
        )
        return (x_next if x_next.dtype == x.dtype else x_next.to(x.dtype)), next_state

    @abstractmethod
    def _step(
        self,
        state: SolverState,
        x: Tensor,
        denoised: Tensor,
        i: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, SolverState]:
        """One update after evaluation ``i`` (``i`` already validated)."""

    # configuration ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable keyword arguments: ``get_solver(self.name, **self.config())`` rebuilds
        an equal solver."""
        return {}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.config().items())
        return f"{type(self).__name__}({arguments})"

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and isinstance(other, Solver)
            and other.name == self.name
            and other.config() == self.config()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name, repr(sorted(self.config().items()))))


# ------------------------------------------------------------------------------------------------
# helpers shared by the solvers
# ------------------------------------------------------------------------------------------------


def check_step_index(state: SolverState, i: int) -> None:
    """Clear error for an out-of-range evaluation index."""
    if type(i) is int and 0 <= i < len(state.plan):  # the common case, checked first
        return
    if isinstance(i, bool) or int(i) != i or not 0 <= i < state.num_evaluations:
        raise IndexError(f"evaluation index {i!r} outside 0..{state.num_evaluations - 1}")


_HALF_DTYPES = frozenset((torch.float16, torch.bfloat16))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision tensors are updated in float32 (diffusers does the same); others as they are."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def eps_from_denoised(x: Tensor, denoised: Tensor, level: NoiseLevel) -> Tensor:
    """The noise estimate ``eps = (x - alpha_t denoised) / sigma_t`` (needs ``sigma_t > 0``)."""
    return x.sub(denoised, alpha=level.alpha).div_(level.sigma)


def linear_combination(coefficients: Sequence[float], tensors: Sequence[Tensor]) -> Tensor:
    """``sum_k c_k T_k`` for same-shaped tensors of any rank (no hard-coded layout)."""
    if len(coefficients) != len(tensors) or not tensors:
        raise ValueError("need one coefficient per tensor and at least one tensor")
    total = tensors[0] * float(coefficients[0])
    for coefficient, tensor in zip(coefficients[1:], tensors[1:], strict=True):
        total.add_(tensor, alpha=float(coefficient))  # total is a fresh tensor: inputs untouched
    return total


def first_order_update(x: Tensor, denoised: Tensor, now: NoiseLevel, target: NoiseLevel) -> Tensor:
    """DDIM / DPM-Solver-1 / DPM-Solver++(1) / Euler in sigma space, data-prediction form
    (Lu et al. 2022b, DPM-Solver++, Sec. 4, the data-prediction exponential integrator with k = 1):
    ``x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - exp(-h)) denoised``, ``h = lambda_s - lambda_t``.

    Returns ``denoised`` itself at a clean target (``sigma_s = 0``); finite where ``alpha_t = 0``.
    """
    if target.is_clean:
        return denoised
    h = target.lambda_ - now.lambda_
    # the product is a fresh tensor: adding in place saves an allocation (same kernel, same bits)
    return torch.mul(x, target.sigma / now.sigma).add_(
        denoised, alpha=target.alpha * -math.expm1(-h)
    )


def multistep_order(
    solver_order: int,
    step: int,
    num_steps: int,
    lower_order_final: bool,
    lower_order_final_below: int | None = LOWER_ORDER_FINAL_BELOW,
) -> int:
    """The order of multistep update ``step`` (0-based) of ``num_steps``.

    Warm-up: at most ``step + 1`` (only that many model outputs exist). ``lower_order_final``
    (diffusers): on schedules with fewer than ``lower_order_final_below`` steps (``None``: always),
    the last steps use order at most ``num_steps - step`` (1 for the last, 2 for the one before),
    which stabilises few-step sampling.
    """
    order = min(solver_order, step + 1)
    applies = lower_order_final_below is None or num_steps < lower_order_final_below
    if lower_order_final and applies:
        order = min(order, num_steps - step)
    return max(order, 1)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_lower_order_final_below(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(
            f"lower_order_final_below must be a positive integer or None, got {value!r}"
        )
    return int(value)


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device, then moved."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
    return noise.to(x.device)


def interval_plan(interval: int, stage_times: Sequence[float], t_end: float) -> list[StepInfo]:
    """Plan entries of one interval whose evaluations happen at ``stage_times`` (the first one the
    interval start ``t_i``, the others intermediate points) and which ends at ``t_end``."""
    times = [float(t) for t in stage_times]
    targets = [*times[1:], float(t_end)]
    return [
        StepInfo(t, interval, stage, t_next, on_grid=stage == 0)
        for stage, (t, t_next) in enumerate(zip(times, targets, strict=True))
    ]


def interval_stages(state: SolverState, i: int) -> tuple[StepInfo, ...]:
    """All plan entries of the interval that evaluation ``i`` belongs to, in stage order."""
    info = state.plan[i]
    first = i - info.stage
    last = first
    while last + 1 < len(state.plan) and state.plan[last + 1].interval == info.interval:
        last += 1
    return state.plan[first : last + 1]


def _steps(count: int) -> str:
    return f"{count} step" if count == 1 else f"{count} steps"


def schedule_facts(
    num_steps: int | StepSchedule | SolverPlan,
    clean_end: bool | None,
    alpha_zero_start: bool | None,
) -> tuple[int, bool, bool]:
    """``(num_steps, clean_end, alpha_zero_start)`` of a step count (defaults True, False) or of
    a schedule / plan (then the two facts must not be passed as well)."""
    if isinstance(num_steps, SolverPlan):
        num_steps = num_steps.schedule
    if isinstance(num_steps, StepSchedule):
        if clean_end is not None or alpha_zero_start is not None:
            raise ValueError("pass either a schedule or clean_end / alpha_zero_start, not both")
        start = NoiseLevel.at(num_steps.noise, float(num_steps.times[0]))
        return num_steps.num_steps, num_steps.ends_clean, start.alpha_is_zero
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    clean = True if clean_end is None else bool(clean_end)
    return int(num_steps), clean, bool(alpha_zero_start)


def multistep_plan(
    schedule: StepSchedule,
    step_order: Callable[[int, int], int],
    prediction: str,
    corrector: str,
) -> SolverPlan:
    """The plan of a multistep solver whose step ``i`` of ``n`` has order ``step_order(i, n)``
    (order 1 on the step to clean data, no corrector after the last step)."""
    n = schedule.num_steps
    orders = [step_order(i, n) for i in range(n)]
    if schedule.ends_clean:
        orders[-1] = 1
    correctors = (corrector,) * (n - 1) + ("none",)
    return SolverPlan(schedule, tuple(orders), (prediction,) * n, correctors)


def first_order_intervals(
    num_steps: int, clean_end: bool, alpha_zero_start: bool, *, at_alpha_zero: bool = True
) -> int:
    """How many intervals of a schedule singlestep methods (and Heun) take with one evaluation:
    the last one when it ends at clean data and, with ``at_alpha_zero``, the first one when it
    starts where ``alpha = 0`` (one interval counted once on a one-step schedule)."""
    intervals = set()
    if clean_end:
        intervals.add(num_steps - 1)
    if alpha_zero_start and at_alpha_zero:
        intervals.add(0)
    return len(intervals)
