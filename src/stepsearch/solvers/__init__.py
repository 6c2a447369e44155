"""Solvers for the probability-flow ODE on any step schedule, and their registry.

``SOLVERS`` maps a name to a factory taking keyword options; :func:`get_solver` builds one, and
``get_solver(solver.name, **solver.config())`` rebuilds an equal solver.

=====================  =====  =====================================================  ===========
name                   order  method                                                 NFE, n steps
=====================  =====  =====================================================  ===========
``ddim``               1      DDIM (``eta`` > 0: stochastic)                         n
``pndm``               4      PRK warm-up + variable-step PLMS in sigma space        n + 9 ***
``dpm_solver_1``       1      DPM-Solver-1 (noise prediction, = DDIM)                n
``dpm_solver_2``       2      DPM-Solver-2, singlestep, noise prediction             2n - 1 **
``dpm_solver_3``       3      DPM-Solver-3, singlestep, noise prediction             3n - 2 **
``dpm_solver_pp_2m``   2      DPM-Solver++(2M), multistep, data prediction           n
``dpm_solver_pp_3m``   3      DPM-Solver++(3M), multistep, data prediction           n
``dpm_solver_pp_2s``   2      DPM-Solver++(2S), singlestep, data prediction          2n - 1 **
``dpm_solver_2m``      2      DPM-Solver(2M), multistep, noise prediction            n
``dpm_solver_3m``      3      DPM-Solver(3M), multistep, noise prediction            n
``unipc_bh1``          p+1    UniPC-p (``order`` p = 2 by default), B(h) = h         n
``unipc_bh2``          p+1    UniPC-p, B(h) = e^h - 1                                n
``euler``              1      Euler in k-diffusion sigma space (= DDIM)              n
``heun``               2      Heun in k-diffusion sigma space                        2n - 1 **
``plan``               -      any SolverPlan: per-step order, prediction, UniC       n
=====================  =====  =====================================================  ===========

``**`` with a clean end (the step to ``t = 0`` takes one evaluation); ``kn`` without one; ``k - 1``
less for DPM-Solver-2/3 and Heun when the schedule starts where ``alpha = 0``. ``***`` the first
three intervals are RK4 steps with 4 evaluations (fewer on short schedules; ``warmup="lower_order"``
gives NFE n). Singlestep solvers and PNDM's warm-up evaluate off the grid (``StepInfo.on_grid``).
``order`` is the convergence order, not diffusers' ``scheduler.order`` (evaluations per step).
``solver.nfe(n_or_schedule)`` gives the exact count, ``solver.num_steps_for_nfe(nfe)`` its inverse.

Solvers with one evaluation per step (DDIM, Euler, DPM-Solver-1, the multistep ones, ``plan``)
read their per-step choices from a :class:`~stepsearch.plan.SolverPlan`:
``solver.default_plan(schedule)`` spells out their own, and ``init`` takes a schedule (meaning
that plan) or a plan.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from stepsearch.solvers.base import (
    NoiseLevel,
    Solver,
    SolverState,
    StagedState,
    StepInfo,
)
from stepsearch.solvers.ddim import DDIM
from stepsearch.solvers.dpm_solver import (
    DPMSolver,
    DPMSolverMultistep,
    DPMSolverPP,
    DPMSolverPP2S,
)
from stepsearch.solvers.euler import Euler, Heun
from stepsearch.solvers.plan_solver import PlanSolver, PlanState
from stepsearch.solvers.pndm import PNDM, PNDMState
from stepsearch.solvers.unipc import UniPC, UniPCState

SOLVERS: dict[str, Callable[..., Solver]] = {
    "ddim": DDIM,
    "pndm": PNDM,
    "dpm_solver_1": partial(DPMSolver, order=1),
    "dpm_solver_2": partial(DPMSolver, order=2),
    "dpm_solver_3": partial(DPMSolver, order=3),
    "dpm_solver_pp_2m": partial(DPMSolverPP, order=2),
    "dpm_solver_pp_3m": partial(DPMSolverPP, order=3),
    "dpm_solver_pp_2s": DPMSolverPP2S,
    "dpm_solver_2m": partial(DPMSolverMultistep, order=2),
    "dpm_solver_3m": partial(DPMSolverMultistep, order=3),
    "unipc_bh1": partial(UniPC, variant="bh1"),
    "unipc_bh2": partial(UniPC, variant="bh2"),
    "euler": Euler,
    "heun": Heun,
    "plan": PlanSolver,
}
"""Solver factories by name; each takes the solver's keyword options."""


def get_solver(name: str, **kwargs: Any) -> Solver:
    """Build the solver registered as ``name`` with keyword options (e.g. ``eta`` for DDIM,
    ``order`` for UniPC, ``lower_order_final`` for multistep solvers)."""
    try:
        factory = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose from {', '.join(SOLVERS)}") from None
    if isinstance(factory, partial):
        for key, fixed in factory.keywords.items():
            if key in kwargs and kwargs[key] != fixed:
                raise ValueError(f"solver {name!r} has {key}={fixed!r}; got {key}={kwargs[key]!r}")
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise ValueError(f"bad options for solver {name!r}: {error}") from None


__all__ = [
    "DDIM",
    "PNDM",
    "SOLVERS",
    "DPMSolver",
    "DPMSolverMultistep",
    "DPMSolverPP",
    "DPMSolverPP2S",
    "Euler",
    "Heun",
    "NoiseLevel",
    "PNDMState",
    "PlanSolver",
    "PlanState",
    "Solver",
    "SolverState",
    "StagedState",
    "StepInfo",
    "UniPC",
    "UniPCState",
    "get_solver",
]
