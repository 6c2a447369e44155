"""Solvers for the probability-flow ODE on any step schedule, their registry and JSON codec.

``SOLVERS`` maps a name to a factory taking keyword options; :func:`get_solver` builds one, and
``get_solver(solver.name, **solver.config())`` rebuilds an equal solver. Solvers that run fitted
data (``olss``: ``coefficients=``, :class:`~stepsearch.solvers.olss.OLSSCoefficients` or their
JSON) are registered too; :data:`NEEDS_DATA` names them and what they need.

The one solver <-> JSON codec: :func:`solver_to_json` writes ``{"name": ..., "config": ...}``
(the shape of every schedule file, cache key and study-store key) and :func:`solver_from_json`
reads it back (``ValueError`` on an unknown name or a bad config).

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
``olss``               -      fitted OLSS coefficients (needs ``coefficients=``)     n
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

from collections.abc import Callable, Mapping
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
from stepsearch.solvers.olss import OLSSCoefficients, OLSSSolver
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
    "olss": OLSSSolver.from_options,
}
"""Solver factories by name; each takes the solver's keyword options."""

NEEDS_DATA: Mapping[str, tuple[str, ...]] = {"olss": ("coefficients",)}
"""Registered solvers that cannot be built from defaults, with the options they need (fitted
data); every other name in :data:`SOLVERS` builds with ``get_solver(name)``."""

BUILT_IN_SOLVERS: tuple[str, ...] = tuple(name for name in SOLVERS if name not in NEEDS_DATA)
"""The names in :data:`SOLVERS` that ``get_solver(name)`` builds without options."""


def get_solver(name: str, **kwargs: Any) -> Solver:
    """Build the solver registered as ``name`` with keyword options (e.g. ``eta`` for DDIM,
    ``order`` for UniPC, ``lower_order_final`` for multistep solvers)."""
    try:
        factory = SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose from {', '.join(SOLVERS)}") from None
    missing = [key for key in NEEDS_DATA.get(name, ()) if key not in kwargs]
    if missing:
        raise ValueError(
            f"solver {name!r} runs fitted data: pass {', '.join(f'{k}=...' for k in missing)}"
        )
    if isinstance(factory, partial):
        for key, fixed in factory.keywords.items():
            if key in kwargs and kwargs[key] != fixed:
                raise ValueError(f"solver {name!r} has {key}={fixed!r}; got {key}={kwargs[key]!r}")
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise ValueError(f"bad options for solver {name!r}: {error}") from None


def solver_to_json(solver: Solver) -> dict[str, Any]:
    """``{"name": solver.name, "config": solver.config()}``: the one JSON form of a solver (schedule
    file provenance, cache keys, study-store keys). :func:`solver_from_json` reads it back."""
    if not isinstance(solver, Solver):
        raise TypeError(f"expected a Solver, got {type(solver).__name__}")
    return {"name": solver.name, "config": solver.config()}


def solver_from_json(payload: Mapping[str, Any]) -> Solver:
    """The solver written by :func:`solver_to_json` (``config`` may be absent or null: the
    defaults; a ``name`` key inside ``config`` is ignored, as the readers this replaces did).
    ``ValueError`` on a payload that is not such an object, a missing name, keys other than
    ``name`` / ``config``, an unknown solver or options the solver rejects."""
    if not isinstance(payload, Mapping):
        raise ValueError(
            f"a solver is a JSON object {{name, config}}, got {type(payload).__name__}"
        )
    name = payload.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a solver needs a 'name' (a string), got {name!r}")
    unknown = set(payload) - {"name", "config"}
    if unknown:
        raise ValueError(f"solver {name!r}: unknown keys {sorted(unknown)} (expected name, config)")
    config = payload.get("config")
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ValueError(f"solver {name!r}: 'config' must be an object, got {config!r}")
    return get_solver(name, **{k: v for k, v in config.items() if k != "name"})


__all__ = [
    "BUILT_IN_SOLVERS",
    "DDIM",
    "NEEDS_DATA",
    "PNDM",
    "SOLVERS",
    "DPMSolver",
    "DPMSolverMultistep",
    "DPMSolverPP",
    "DPMSolverPP2S",
    "Euler",
    "Heun",
    "NoiseLevel",
    "OLSSCoefficients",
    "OLSSSolver",
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
    "solver_from_json",
    "solver_to_json",
]
