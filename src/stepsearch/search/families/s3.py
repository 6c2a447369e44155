"""The S³ family: the predictor-guided plan search of :mod:`stepsearch.search.s3` as a
:class:`~stepsearch.search.family.SearchFamily`.

Its result is a :class:`~stepsearch.plan.SolverPlan` (every step's time, prediction, Taylor order,
estimation points, relaxation, corrector; an analytical first step) run by the ``plan`` solver,
with the data mean of the objective's data when it has one. The runner's starting points (the
built-in spacings, scored with ``plan``, i.e. UniPC-bh2) count as already-evaluated plans; stage 0
adds every seed solver's default plan on them (and, in ``optimize``, the other families' results
at the same NFE: ``inputs``). ``optimize`` runs it last with the time left (``expensive``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from stepsearch.models.trajectories import DEFAULT_TEACHER
from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.search.family import FamilyBase, Found, JobContext
from stepsearch.search.job import sortable
from stepsearch.search.plan_space import plan_key
from stepsearch.search.s3 import S3Settings, plan_solver_for, s3_search
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

__all__ = ["S3Family"]


class S3Family(FamilyBase):
    """S³ (Liu et al., ICLR 2024): the solver rule of every step, searched with a predictor."""

    name = "s3"
    label = "S³"
    settings_type = S3Settings
    default_solvers = ("plan",)
    expensive = True
    fits_solver = True
    seeded_by_others = True
    """``optimize`` passes the other families' results at the same NFE as ``inputs``."""

    def make_solver(self, name: str) -> Solver:
        """The ``plan`` solver (the starting points run UniPC-bh2's plan on the spacings)."""
        if name != "plan":
            raise ValueError(f"S³ searches plans of the 'plan' solver, not {name!r}")
        return get_solver("plan")

    def search(self, job: JobContext) -> Found:
        if job.budget is None:
            raise ValueError("S³ needs a trial budget (--budget)")
        settings: S3Settings = job.settings
        job.bar.budget = len(job.starts) + int(job.budget) * int(settings.restarts)
        solver = plan_solver_for(job.objective)
        evaluated = [
            (f"start {b.name}", job.solver.default_plan(b.schedule), b.value) for b in job.baselines
        ]
        schedules, plans = _other_results(job.inputs)
        ranked = sorted(job.baselines, key=lambda b: sortable(b.value))
        result = s3_search(
            job.objective,
            nfe=job.nfe,
            budget=int(job.budget),
            store=job.store,
            seed=job.seed,
            # other searches' results first, then the spacings from the best start down
            schedules={**schedules, **{b.name: b.schedule for b in ranked}},
            plans=plans,
            evaluated=evaluated,
            settings=settings,
            solver=solver,
            on_trial=lambda done, best: job.bar.update(len(job.starts) + done, best),
        )
        picks = result.indices("predictor")
        # distinct plans the search evaluated (a second evolution looks up the first's seeds)
        searched = {plan_key(r.plan) for r in result.history if r.stage >= 0}
        return Found(
            result.best,
            result.best_score,
            {**settings.to_json_dict(), "budget": int(job.budget), "seed": int(job.seed)},
            solver=solver,
            summary={
                "budget": int(job.budget),
                "seed": int(job.seed),
                "evaluated": len(searched),
                "restarts": int(settings.restarts),
                "predictor_picks": picks,
                "best_origin": _origin_of(result),
                "ranking_agreement": [round(a, 4) for a in result.agreement],
                "seeds_not_adopted": list(result.not_adopted),
                "selection": _selection_of(result),
                "best": {"plan": result.best.describe()},
            },
            values=result.values,
            marks={"predictor's picks": picks} if picks else {},
            details=result,
        )

    def planned_evaluations(
        self, settings: Any, solver: str, nfe: int, search_samples: int, trials: int | None
    ) -> dict[str, int] | None:
        """The trials of every evolution (at most: their shared seeds are evaluated once), and the
        selection seed's re-scoring of their best plans (with its converged solve, for trajectory
        error, once)."""
        restarts = int(settings.restarts) if isinstance(settings, S3Settings) else 1
        total = None if trials is None else int(trials) * restarts
        planned = super().planned_evaluations(settings, solver, nfe, search_samples, total)
        if planned is not None and isinstance(settings, S3Settings) and settings.selects:
            samples = settings.selection_samples(search_samples)
            # each evolution's best (at most: a plan two of them found is scored once)
            pool = min(int(settings.select_plans), int(trials)) * restarts
            planned["selection"] = pool * samples * int(nfe)
            planned["once:selection teacher"] = samples * DEFAULT_TEACHER.num_steps
        return planned

    def optimize_settings(self, options: Any) -> S3Settings:
        found = super().optimize_settings(options)
        return found if isinstance(found, S3Settings) else S3Settings()


def _other_results(inputs: Any) -> tuple[dict[str, StepSchedule], dict[str, SolverPlan]]:
    """Seeds from other searches (``inputs``: name -> schedule or plan)."""
    schedules: dict[str, StepSchedule] = {}
    plans: dict[str, SolverPlan] = {}
    for name, found in dict(inputs or {}).items() if isinstance(inputs, Mapping) else ():
        if isinstance(found, SolverPlan):
            plans[str(name)] = found
        elif isinstance(found, StepSchedule):
            schedules[str(name)] = found
    return schedules, plans


def _selection_of(result: Any) -> dict[str, Any] | None:
    """``result.json``'s record of the pick on the selection seed (``None``: none was made)."""
    if not result.selection:
        return None
    history = {record.index: record for record in result.history}
    return {
        "seed": int(result.settings.select_seed),
        "samples": int(result.selection_samples),
        "plans": [
            {
                "origin": history[index].origin,
                "restart": int(history[index].restart),
                "search": _finite(history[index].value),
                "selection": _finite(value),
                "picked": history[index].plan is result.best,
            }
            for index, value in result.selection
        ],
    }


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _origin_of(result: Any) -> str:
    for record in result.history:
        if record.plan is result.best:
            return record.origin
    return "?"
