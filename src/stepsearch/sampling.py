"""The one sampling loop: ``sample(denoiser, x_T, schedule, solver)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from stepsearch.denoiser import Denoiser
from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import Solver


@dataclass(frozen=True)
class StepRecord:
    """What a callback sees after each model evaluation.

    ``index`` is the evaluation index (0-based), ``t`` its time, ``x`` the sample the model saw,
    ``denoised`` the model's ``x0`` estimate and ``x_next`` the sample the solver returned.
    """

    index: int
    t: float
    x: Tensor
    denoised: Tensor
    x_next: Tensor


@dataclass(frozen=True)
class SampleResult:
    """The final sample and the exact number of function (model) evaluations spent."""

    sample: Tensor
    nfe: int


def sample(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: StepSchedule | SolverPlan,
    solver: Solver,
    callback: Callable[[StepRecord], None] | None = None,
    generator: torch.Generator | None = None,
) -> SampleResult:
    """Integrate from ``x_T`` (a sample at the first time) along ``schedule``, or along a
    :class:`~stepsearch.plan.SolverPlan` (its schedule with per-step solver choices; a plain
    schedule runs the solver's own ``default_plan``).

    ``x_T`` must already carry the scale of its time (``sigma(t_0)`` times unit noise for
    variance-preserving schedules). Model calls happen here, one per solver evaluation time;
    ``solver.start`` runs first (the ``plan`` solver's analytical first step, which calls no model;
    no ``callback`` record for it), so ``nfe`` is always the solver's exact count.
    """
    times = schedule.schedule if isinstance(schedule, SolverPlan) else schedule
    if times.noise != denoiser.noise:
        raise ValueError("schedule and denoiser use different noise schedules")
    state = solver.init(x_T, schedule)
    x, state = solver.start(state, x_T)
    nfe = 0
    for i, t in enumerate(state.evaluation_times):
        time = float(t)
        denoised = denoiser(x, time)
        nfe += 1
        x_next, state = solver.step(state, x, denoised, i, generator=generator)
        if callback is not None:
            callback(StepRecord(index=i, t=time, x=x, denoised=denoised, x_next=x_next))
        x = x_next
    return SampleResult(sample=x, nfe=nfe)


def initial_noise_scale(schedule: StepSchedule) -> float:
    """Scale of the starting noise at the schedule's first time
    (:meth:`stepsearch.noise.NoiseSchedule.initial_noise_scale`)."""
    return schedule.noise.initial_noise_scale(float(schedule.times[0]))


def initial_noise(
    schedule: StepSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``x_T = initial_noise_scale(schedule) * eps`` with ``eps ~ N(0, I)``."""
    eps = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return initial_noise_scale(schedule) * eps
