"""Work budgets of an optimize run: what the trial-budgeted (``expensive``) families may spend,
in model sample-evaluations, whatever the machine's speed.

A *model sample-evaluation* is one sample through one model call (a batch of 64 samples at one
step is 64). A trial of a search family scores one candidate on the search seed: ``search_samples``
samples of ``nfe`` model calls each, so ``search_samples * nfe`` evaluations. A run's work budget
``budget_evals`` is split evenly over its expensive stages (one family, one solver, one NFE); each
stage first scores its starting spacings (the runner's, ``len(starts)`` trials), and its trial
budget is what is left of its share, capped at the family's ``max_trials``. Every number here is
computed from the settings alone, so a run with a work budget searches the same candidates on a
fast and on a slow machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stepsearch.noise import NoiseSchedule
from stepsearch.search.family import family
from stepsearch.search.job import spacing_schedules
from stepsearch.search.optimize.settings import OptimizeSettings
from stepsearch.solvers import get_solver

__all__ = ["StageKey", "WorkShare", "expensive_stages", "stage_steps", "work_shares"]

StageKey = tuple[str, int, str]
"""A search stage: (family, NFE, solver name)."""


@dataclass(frozen=True)
class WorkShare:
    """One expensive stage's part of a work budget."""

    evaluations: int
    """Its share of the budget (model sample-evaluations)."""
    starts: int
    """Its starting spacings (trials the runner scores before the search)."""
    per_trial: int
    """Model sample-evaluations of one trial (``search_samples * nfe``)."""
    trials: int
    """The search's trial budget: what the share leaves after the starts, capped."""


def stage_steps(name: str, solver: str, nfe: int) -> int:
    """The step count of family ``name``'s solver ``solver`` at ``nfe`` evaluations."""
    make_solver = getattr(family(name), "make_solver", get_solver)
    return int(make_solver(solver).num_steps_for_nfe(int(nfe)))


def expensive_stages(
    settings: OptimizeSettings, methods: Sequence[str], nfes: Sequence[int]
) -> list[StageKey]:
    """The trial-budgeted stages of a run, in the order it runs them."""
    return [
        (method, int(nfe), name)
        for method in methods
        if family(method).expensive
        for nfe in nfes
        for name in settings.solvers(method)
    ]


def work_shares(
    noise: NoiseSchedule,
    settings: OptimizeSettings,
    methods: Sequence[str],
    nfes: Sequence[int],
    budget_evals: int,
) -> dict[StageKey, WorkShare]:
    """Each expensive stage's share of ``budget_evals`` (module docstring).

    Raises:
        ValueError: a budget that is not a positive integer, or one too small to give every
            expensive stage its starting spacings and one trial (the message says how much is).
    """
    if isinstance(budget_evals, bool) or int(budget_evals) != budget_evals or budget_evals < 1:
        raise ValueError(f"--budget-evals must be a positive integer, got {budget_evals!r}")
    stages = expensive_stages(settings, methods, nfes)
    if not stages:
        return {}
    share = int(budget_evals) // len(stages)
    shares: dict[StageKey, WorkShare] = {}
    needed = 0
    for key in stages:
        name, nfe, solver = key
        starts = len(spacing_schedules(noise, stage_steps(name, solver, nfe)))
        per_trial = int(settings.search_samples) * nfe
        trials = min(share // per_trial - starts, settings.max_trials(name))
        needed = max(needed, (starts + 1) * per_trial * len(stages))
        shares[key] = WorkShare(share, starts, per_trial, trials)
    short = [key for key, item in shares.items() if item.trials < 1]
    if short:
        name, nfe, solver = short[0]
        raise ValueError(
            f"--budget-evals {budget_evals} is too small: {family(name).stage_label(solver)} at "
            f"NFE {nfe} gets {share} model evaluations ({len(stages)} trial-budgeted stages), "
            f"less than its {shares[short[0]].starts} starting spacings and one trial of "
            f"{shares[short[0]].per_trial} ({settings.search_samples} samples x NFE {nfe}); "
            f"give at least {needed}"
        )
    return shares
