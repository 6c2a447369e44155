"""S³: a predictor-guided evolutionary search over solver plans at a fixed NFE.

Liu, Ning, Yang & Wang, "A Unified Sampling Framework for Solver Searching of Diffusion
Probabilistic Models" (ICLR 2024, arXiv 2312.07243). A candidate is a
:class:`~stepsearch.plan.SolverPlan` (every step's time, prediction, rule, Taylor order,
estimation points, relaxation and corrector, and an analytical first step) in the space of
:mod:`stepsearch.search.plan_space`; its fitness is the shared
:class:`~stepsearch.eval.objective.Objective` on the search seed (common random numbers), run by
the ``plan`` solver.

The search runs in stages, each a fixed number of true evaluations:

- stage 0, the seeds: every built-in multistep solver's default plan on the given schedules (the
  built-in spacings, and other families' results where available), and the same plans with an
  analytical first step (one more step at the same NFE); at most half the budget, in the order
  given;
- stage ``s >= 1``: (1) train the predictor (:mod:`stepsearch.search.predictor`) on every plan
  evaluated so far (each step's features and, where the objective's data allow, the plan's
  trajectory error on a Gaussian mixture fitted to the data, :mod:`stepsearch.search.plan_proxy`,
  which ranks plans on digits far better than the step features alone); (2) evolve ``generations`` generations of ``children`` candidates on the
  predictor alone, from the ``parents`` best evaluated plans (mutation, crossover with
  probability ``crossover_probability``); (3) truly evaluate ``proposals`` unseen candidates
  the predictor ranks well plus ``explore`` bold random variants of the best plans. How it
  picks is ``pick``: ``"screen"`` (the default) draws them at random from its best-ranked
  ``screen_fraction`` of the candidates, ``"best"`` takes its best-ranked ones; taking the best
  made the search stall on near-copies of the best plan once the predictor ranked well
  (``docs/s3.md``); ``"siblings"`` draws each proposal's parent(s) as the evolution without
  the predictor does and lets the predictor keep the best of ``siblings`` children of them (on
  digits its held-out FD was lower than without the predictor at NFE 5 only: its single
  best-ranked child is where its errors concentrate, ``docs/s3.md``). With one generation (the
  default) the predictor screens ``children`` children of the best plans; more generations
  let it evolve on its own predictions, further from the plans it was trained on (on the digits
  model 8 generations ended with a higher held-out FD than 1 at 3 of NFE 3-6, within the seeds'
  spread: ``docs/s3.md``).

**The pick.** The search re-scores its ``select_plans`` (8) best plans on a third noise stream,
the *selection* seed (``select_seed``, ``select_samples`` samples, by default 16 times the
search's: neither the search nor the held-out seed), and the lowest there is the result; those
scores are a sibling study of the store (:meth:`~stepsearch.search.store.StudyStore.sibling`),
resumed and shared like the trials. It is there against the winner's curse: the best of ~200
scores on a few hundred samples is partly luck, and FD's small-sample bias differs from plan to
plan, so the ranking that matters is the one at thousands of samples. On the digits model
(``benchmarks/s3_selection.py``) the 8 best plans' FD on 4,096 samples of the selection seed
ranked them as 5,000 held-out samples do (Kendall's tau +0.71 and +1.00 at NFE 5 and 6; the
search seed's own scores +0.29 and +0.14) and picked the best of the eight held-out at both;
1,024 samples ranked them nearly as well but picked the fourth at NFE 5. ``select_plans=0``
takes the search seed's best.

**Restarts.** The search runs ``restarts`` (2) independent evolutions, the ``r``-th drawn with
seed ``seed + r`` (it is exactly the single search with that seed: its own history, predictor and
parents; its stage-0 seeds and any plan another evolution already evaluated are store lookups, not
new evaluations), each of ``budget`` true evaluations; the selection seed then picks among the
``select_plans`` best of every evolution. An evolution's outcome depends on its draws far more
than on its length: on the digits model at NFE 5, four single searches' picks were 1.13x-1.22x
the converged solve's FD on fresh noise, 400 evaluations in one evolution did no better than 200,
and the picks' selection-seed scores ranked the four nearly as the fresh noise did (``docs/s3.md``). A
second evolution buys a second draw, and the selection seed tells which is the better one.

Without the predictor (``use_predictor=False``, the ablation of the done-when) a stage evaluates
``proposals + explore`` children of the best plans drawn by the same operators: the same
evolution, no ranking.

Every true evaluation is a trial of the :class:`~stepsearch.search.store.StudyStore`, and each
stage's proposals are a pure function of the seed, the stage number and the stored values of the
earlier stages (the predictor included: :func:`~stepsearch.search.predictor.train_predictor` is
deterministic). A rerun of a killed search replays every stage, finds the evaluated plans in the
store and ends with the identical plan; several workers running the same search share each stage's
evaluations through the store and end with the same result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stepsearch.eval.objective import Objective, Score
from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.search.job import sortable
from stepsearch.search.plan_proxy import PlanProxy
from stepsearch.search.plan_space import PlanSpace, plan_key, step_features
from stepsearch.search.predictor import (
    PlanPredictor,
    PredictorSettings,
    ranking_agreement,
    train_predictor,
)
from stepsearch.search.store import StudyStore
from stepsearch.solvers import get_solver
from stepsearch.solvers.plan_solver import PlanSolver, data_mean_of

__all__ = [
    "PICKS",
    "SEED_SOLVERS",
    "Evaluated",
    "S3Result",
    "S3Settings",
    "plan_solver_for",
    "s3_search",
    "seed_plans",
]

SEED_SOLVERS = (
    "ddim",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_3m",
    "dpm_solver_2m",
    "dpm_solver_3m",
    "unipc_bh2",
)
"""The built-in solvers whose default plans seed the search (every plan the ``plan`` solver runs
as that solver does; UniPC-bh1 needs another variant)."""
PICKS = ("screen", "best", "siblings")
"""How the predictor picks the plans to evaluate (:attr:`S3Settings.pick`)."""
SELECTION_FACTOR = 16
"""The selection seed's samples per plan, as a multiple of the search's (the default of
:attr:`S3Settings.select_samples`)."""


@dataclass(frozen=True)
class S3Settings:
    """The search's settings (defaults: two evolutions of an NFE-5 search on the digits model in
    ~8.5 minutes on one CPU core at 256 samples per candidate, the pick on 4,096)."""

    proposals: int = 12
    """Plans the predictor picks per stage."""
    explore: int = 4
    """Bold random variants per stage."""
    parents: int = 16
    generations: int = 1
    """Generations evolved on the predictor per stage (1: it screens one generation of
    children of the best evaluated plans)."""
    children: int = 96
    """Candidates per generation on the predictor."""
    crossover_probability: float = 0.3
    pick: str = "screen"
    """How the predictor picks the ``proposals`` from its ranked candidates: ``"screen"`` draws
    them at random from the best ``screen_fraction`` of them (it screens out the likely bad ones
    and keeps the evolution's spread), ``"best"`` takes the best-ranked ones."""
    screen_fraction: float = 0.5
    siblings: int = 8
    """Children per proposal with ``pick="siblings"``: each proposal draws its parent(s) as the
    evolution without the predictor does, makes ``siblings`` children of them, and the predictor
    keeps its best-ranked one (it only chooses among mutations of the same plans; recorded in
    :meth:`to_json_dict` only with that pick)."""
    use_predictor: bool = True
    analytical_seeds: bool = True
    free_start: bool = True
    """Whether the first time is searched (:class:`~stepsearch.search.plan_space.PlanSpace`'s
    ``free_start``; AutoDiffusion's results, which start below the largest time, then seed the
    search)."""
    seed_solvers: tuple[str, ...] = SEED_SOLVERS
    predictor: PredictorSettings = field(default_factory=PredictorSettings)
    proxy: bool = True
    """Give the predictor each plan's trajectory error on a Gaussian mixture fitted to the data
    (:mod:`stepsearch.search.plan_proxy`) as a feature, where the objective's source has such
    data (the digits models, not latent pipelines). On digits it raised the predictor's ranking
    of unseen children from Kendall's tau +0.39 / +0.21 to +0.58 / +0.52 at NFE 4 / 5
    (``docs/s3.md``). Recorded in :meth:`to_json_dict` only with the predictor."""
    select_plans: int = 8
    """The best plans on the search seed re-scored on the selection seed (that many of each
    evolution's), the lowest there picked (0 or 1: the search seed's best is the pick). Module
    docstring: "The pick"."""
    select_samples: int | None = None
    """Samples per plan on the selection seed (``None``: 16 times the objective's search
    samples, 4,096 for the digits default)."""
    select_seed: int = 3
    """The selection seed's noise stream: neither the objective's search nor its held-out seed
    (3: neither a search's 0 and 1 nor ``stepsearch optimize``'s report seed 2)."""
    restarts: int = 2
    """Independent evolutions, the ``r``-th drawn with seed ``seed + r`` (so restart ``r`` is
    exactly the single search with that seed), each of ``budget`` evaluations; the selection seed
    picks among every evolution's ``select_plans`` best. Module docstring: "Restarts"."""

    def __post_init__(self) -> None:
        for name in ("proposals", "parents", "generations", "children", "siblings", "restarts"):
            if isinstance(getattr(self, name), bool) or int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if int(self.explore) < 0:
            raise ValueError(f"explore must be >= 0, got {self.explore!r}")
        if self.pick not in PICKS:
            raise ValueError(f"pick must be one of {list(PICKS)}, got {self.pick!r}")
        for name, least in (("select_plans", 0), ("select_samples", 2), ("select_seed", 0)):
            value = getattr(self, name)
            if value is None and name == "select_samples":
                continue
            if isinstance(value, bool) or int(value) < least:
                raise ValueError(f"{name} must be at least {least}, got {value!r}")
        if not 0.0 < self.screen_fraction <= 1.0:
            raise ValueError(f"screen_fraction must be in (0, 1], got {self.screen_fraction!r}")
        if not 0.0 <= self.crossover_probability <= 1.0:
            raise ValueError(
                f"crossover_probability must be in [0, 1], got {self.crossover_probability!r}"
            )
        for name in self.seed_solvers:
            get_solver(name).default_plan  # noqa: B018 - refuses unknown names early

    @property
    def per_stage(self) -> int:
        return int(self.proposals) + int(self.explore)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "proposals": self.proposals,
            "explore": self.explore,
            "parents": self.parents,
            "generations": self.generations,
            "children": self.children,
            "crossover_probability": self.crossover_probability,
            "pick": self.pick,
            "screen_fraction": self.screen_fraction,
            # only where it acts: a study made before the key existed still resumes
            **({"siblings": self.siblings} if self.pick == "siblings" else {}),
            "use_predictor": self.use_predictor,
            "analytical_seeds": self.analytical_seeds,
            "free_start": self.free_start,
            "seed_solvers": list(self.seed_solvers),
            "predictor": self.predictor.to_json_dict(),
            # only where it acts: a search without the predictor made before it still resumes
            **({"proxy": self.proxy} if self.use_predictor else {}),
            "select_plans": self.select_plans,
            "select_samples": self.select_samples,
            "select_seed": self.select_seed,
            # only where it acts: a study made before the key existed (one evolution) still resumes
            **({"restarts": self.restarts} if self.restarts != 1 else {}),
        }

    @property
    def selects(self) -> bool:
        """Whether the pick is made on the selection seed."""
        return int(self.select_plans) > 1

    def selection_samples(self, num_samples: int) -> int:
        """Samples per plan on the selection seed for an objective of ``num_samples`` search
        samples."""
        return int(self.select_samples or SELECTION_FACTOR * int(num_samples))


@dataclass(frozen=True)
class Evaluated:
    """One truly evaluated plan: its place (``index``, ``stage``), how it was made (``origin``:
    ``seed <solver> / <schedule>``, ``predictor``, ``explore``, ``evolution``) and its value."""

    index: int
    stage: int
    origin: str
    plan: SolverPlan
    value: float
    restart: int = 0
    """The evolution that evaluated it (:attr:`S3Settings.restarts`)."""


@dataclass(frozen=True)
class S3Result:
    """The search's outcome: the best plan and its search-seed score, every evaluated plan, and
    the predictor's ranking agreement (Kendall's tau on each stage's new plans)."""

    best: SolverPlan
    best_score: Score
    history: tuple[Evaluated, ...] = field(repr=False)
    seed: int
    settings: S3Settings
    agreement: tuple[float, ...] = ()
    not_adopted: tuple[str, ...] = ()
    """The given seeds that are not points of the search space, each with the reason."""
    selection: tuple[tuple[int, float], ...] = ()
    """``(index in history, selection-seed value)`` of the plans re-scored on the selection
    seed, best on the search seed first (empty: the search seed's best is the pick)."""
    selection_samples: int = 0
    """Samples per plan on the selection seed (0: no selection)."""

    @property
    def values(self) -> list[float]:
        return [record.value for record in self.history]

    def indices(self, origin: str) -> list[int]:
        """Positions in :attr:`values` of the plans of ``origin`` (prefix match)."""
        return [k for k, r in enumerate(self.history) if r.origin.startswith(origin)]


def plan_solver_for(objective: Objective) -> PlanSolver:
    """The ``plan`` solver with the objective's data mean when its data provides one (so the
    ``"data_mean"`` analytical first step is available), else without."""
    try:
        return PlanSolver(data_mean=data_mean_of(objective.source))
    except ValueError:
        return PlanSolver()


def seed_plans(
    space: PlanSpace,
    schedules: Mapping[str, StepSchedule],
    solvers: Sequence[str] = SEED_SOLVERS,
    *,
    analytical: bool = True,
    refused: list[str] | None = None,
) -> list[tuple[str, SolverPlan]]:
    """Stage 0 (module docstring): ``(origin, plan)`` of every solver's default plan on every
    schedule with this space's NFE (schedule by schedule, in the given order: put the most
    promising first), then (``analytical``) with each analytical first step the
    space allows (``t_1`` inserted at the log-SNR midpoint of the first step); duplicates
    dropped. A schedule no solver's plan of which is a point of the space is appended to
    ``refused`` with the reason."""
    found: dict[str, tuple[str, SolverPlan]] = {}
    for label, schedule in schedules.items():
        problems: list[str] = []
        for name in solvers:
            solver = get_solver(name)
            try:
                default = solver.default_plan(schedule)
            except ValueError as error:
                problems.append(str(error))
                continue
            plan = space.adopt(default)
            if plan is not None:
                found.setdefault(plan_key(plan), (f"seed {name} / {label}", plan))
            else:
                problems.append(space.adoption_problem(default) or "no valid repair")
        if refused is not None and len(problems) == len(solvers) and problems:
            refused.append(f"{label}: {problems[0]}")
    if analytical:
        for first in space.first_steps:
            if first == "model":
                continue
            for origin, plan in list(found.values()):
                if plan.first_step != "model":
                    continue
                times = plan.schedule.times
                middle = space._between(float(times[0]), float(times[1]), np.random.default_rng(0))
                steps = plan.num_steps + 1
                child = space.repair(
                    [times[0], middle, *times[1:]],
                    [1, *plan.orders],
                    [plan.predictions[0], *plan.predictions],
                    [plan.rules[0], *plan.rules],
                    [(), *plan.estimation_points],
                    [0.0, *plan.relaxations],
                    ["none", *plan.correctors],
                    first,
                )
                if child is not None and child.num_steps == steps:
                    found.setdefault(plan_key(child), (f"{origin}, {first}", child))
    return list(found.values())


def s3_search(
    objective: Objective,
    *,
    nfe: int,
    budget: int,
    store: StudyStore,
    seed: int = 0,
    schedules: Mapping[str, StepSchedule] | None = None,
    plans: Mapping[str, SolverPlan] | None = None,
    evaluated: Sequence[tuple[str, SolverPlan, float]] = (),
    settings: S3Settings | None = None,
    solver: PlanSolver | None = None,
    on_trial: Callable[[int, float], None] | None = None,
) -> S3Result:
    """Search ``budget`` true evaluations per evolution (``settings.restarts`` of them) for the
    best plan at ``nfe`` model evaluations (module docstring); every evaluation is a trial in
    ``store``. ``schedules`` (named, e.g.
    the built-in spacings and other families' results) and ``plans`` seed stage 0;
    ``evaluated`` are already-scored ``(origin, plan, value)`` (the runner's starting points)
    that count as history without a new evaluation. ``on_trial(done, best)`` reports
    progress. Rerunning with the same store replays the search (resume)."""
    settings = settings or S3Settings()
    if isinstance(budget, bool) or int(budget) < 1:
        raise ValueError(f"budget must be a positive number of trials, got {budget!r}")
    run_solver = solver or plan_solver_for(objective)
    chooser = _selection_objective(objective, settings) if settings.selects else None
    if chooser is not None:
        _selection_store(store, chooser).close()  # refuses another selection's study up front
    noise = objective.source.noise
    space = PlanSpace.for_noise(
        noise, nfe, data_mean=run_solver.data_mean is not None, free_start=settings.free_start
    )
    given: list[tuple[str, SolverPlan, float]] = []
    keys: set[str] = set()
    for origin, plan, value in evaluated:
        adopted = space.adopt(plan)
        if adopted is not None and plan_key(adopted) not in keys:
            keys.add(plan_key(adopted))
            given.append((origin, adopted, float(value)))
    best, done = math.inf, 0
    proxy = None
    if settings.use_predictor and settings.proxy:
        proxy = PlanProxy.for_source(objective.source)
    features = _featurizer(proxy, run_solver)

    def score(candidate: SolverPlan) -> Score:
        return objective(candidate, run_solver)

    refused: list[str] = []
    seeds = seed_plans(
        space,
        dict(schedules or {}),
        settings.seed_solvers,
        analytical=settings.analytical_seeds,
        refused=refused,
    )
    for name, plan in (plans or {}).items():
        if (adopted := space.adopt(plan)) is not None:
            seeds.append((f"seed {name}", adopted))
        else:
            refused.append(f"{name}: {space.adoption_problem(plan) or 'no valid repair'}")
    for line in refused:
        warnings.warn(f"S³ does not seed its search with {line}", stacklevel=2)

    starts = [
        Evaluated(k, -1, origin, plan, value) for k, (origin, plan, value) in enumerate(given)
    ]

    def evolve(restart: int, offset: int) -> tuple[list[Evaluated], list[float]]:
        """One evolution (module docstring: "Restarts"), drawn with ``seed + restart`` as a
        search with that seed alone: the ``starts``, then its own evaluations (indexed from
        ``offset`` on)."""
        run_seed = int(seed) + restart
        history = list(starts)
        seen = {plan_key(r.plan) for r in history}
        free = len(history)
        agreement: list[float] = []

        def evaluate(stage: int, proposals: list[tuple[str, SolverPlan]]) -> None:
            proposals = proposals[: int(budget) - (len(history) - free)]
            if not proposals:
                return
            start = len(history)

            def report(position: int, result: Score) -> None:
                nonlocal best, done
                best, done = min(best, sortable(result.value)), done + 1
                if on_trial is not None:
                    on_trial(done, best)

            first = offset + start - free
            attrs = [
                {"stage": stage, "index": first + k, "origin": origin}
                for k, (origin, _) in enumerate(proposals)
            ]
            scores = store.evaluate_many(
                [plan for _, plan in proposals], score, solver=run_solver, attrs=attrs,
                on_score=report,
            )  # fmt: skip
            for k, ((origin, plan), result) in enumerate(zip(proposals, scores, strict=True)):
                seen.add(plan_key(plan))
                history.append(
                    Evaluated(first + k, stage, origin, plan, float(result.value), restart)
                )

        fresh = [(origin, plan) for origin, plan in seeds if plan_key(plan) not in seen]
        evaluate(0, fresh[: max(1, int(budget) // 2)])  # at most half the budget on the seeds
        stage = 1
        while len(history) - free < int(budget):
            rng = np.random.default_rng([run_seed, stage])
            if settings.use_predictor:
                proposals, predicted = _predictor_stage(
                    space, history, seen, settings, rng, run_seed, stage, features
                )
            else:
                proposals, predicted = _plain_stage(space, history, seen, settings, rng), None
            if not proposals:
                break  # nothing new can be proposed
            before = len(history)
            evaluate(stage, proposals)
            if predicted is not None:
                new = [r for r in history[before:] if r.origin == "predictor"]
                agreement.append(
                    ranking_agreement(predicted[: len(new)], [r.value for r in new])
                    if len(new) > 2 else 0.0
                )  # fmt: skip
            stage += 1
        return history, agreement

    history: list[Evaluated] = list(starts)  # the starts once, then every evolution's own
    agreement: list[float] = []
    pool: list[Evaluated] = []  # each evolution's best plans, for the selection seed
    pooled: set[str] = set()
    for restart in range(int(settings.restarts)):
        found, agreed = evolve(restart, len(history))
        if not any(r.stage >= 0 for r in found):
            raise ValueError("the search evaluated nothing")
        history += found[len(starts) :]
        agreement += agreed
        ranked = sorted(found, key=lambda r: (sortable(r.value), r.index))
        for record in ranked[: max(1, int(settings.select_plans))]:
            if plan_key(record.plan) not in pooled:
                pooled.add(plan_key(record.plan))
                pool.append(record)
    pool.sort(key=lambda r: (sortable(r.value), r.index))
    winner = pool[0]
    selection: list[tuple[int, float]] = []
    if chooser is not None:
        with _selection_store(store, chooser) as select_store:
            scores = select_store.evaluate_many(
                [r.plan for r in pool],
                lambda plan: chooser(plan, run_solver),
                solver=run_solver,
                attrs=[{"index": r.index, "origin": r.origin} for r in pool],
            )
        selection = [(r.index, float(found.value)) for r, found in zip(pool, scores, strict=True)]
        selected = dict(selection)
        winner = min(pool, key=lambda r: (sortable(selected[r.index]), sortable(r.value), r.index))
    best_score = store.evaluate(winner.plan, score, solver=run_solver)  # a lookup
    return S3Result(
        winner.plan,
        best_score,
        tuple(history),
        int(seed),
        settings,
        tuple(agreement),
        tuple(refused),
        tuple(selection),
        0 if chooser is None else chooser.num_samples,
    )


def _selection_objective(objective: Objective, settings: S3Settings) -> Objective:
    """The objective on the selection seed (:attr:`S3Settings.select_seed`)."""
    try:
        return objective.reseeded(
            settings.select_seed, settings.selection_samples(objective.num_samples)
        )
    except ValueError as error:
        raise ValueError(f"S³'s select_seed: {error}") from None


def _selection_store(store: StudyStore, chooser: Objective) -> StudyStore:
    """The study of the selection-seed scores beside the search's (resumed and shared as the
    search's trials are)."""
    described = {k: v for k, v in chooser.describe().items() if k != "held_out_samples"}
    return store.sibling("select", {"selection": described})


Features = Callable[[SolverPlan], np.ndarray]
"""A plan's per-step feature rows for the predictor."""


def _featurizer(proxy: PlanProxy | None, solver: PlanSolver) -> Features:
    """:func:`~stepsearch.search.plan_space.step_features`, with the plan's proxy error (one
    number, on every row) as a last column where there is a proxy."""
    if proxy is None:
        return step_features

    def features(plan: SolverPlan) -> np.ndarray:
        rows = step_features(plan)
        column = np.full((rows.shape[0], 1), proxy(plan, solver), dtype=rows.dtype)
        return np.concatenate([rows, column], axis=1)

    return features


def _parents(history: Sequence[Evaluated], count: int) -> list[SolverPlan]:
    ranked = sorted(history, key=lambda r: (sortable(r.value), r.index))
    return [r.plan for r in ranked[:count]]


def _family(size: int, settings: S3Settings, rng: np.random.Generator) -> tuple[int, ...]:
    """The parents of one child: two (a crossover, with ``crossover_probability``) or one, as
    positions in a population of ``size`` plans."""
    if size > 1 and rng.random() < settings.crossover_probability:
        first, second = rng.choice(size, size=2, replace=False)
        return int(first), int(second)
    return (int(rng.integers(size)),)


def _offspring(
    space: PlanSpace,
    population: Sequence[SolverPlan],
    family: tuple[int, ...],
    rng: np.random.Generator,
) -> SolverPlan | None:
    """One child of ``family``: the crossover of its two plans, mutated, or a mutation of its
    one plan (``None``: no valid child)."""
    if len(family) == 2:
        child = space.crossover(population[family[0]], population[family[1]], rng)
        return None if child is None else space.mutate(child, rng)
    return space.mutate(population[family[0]], rng)


def _child(
    space: PlanSpace,
    population: Sequence[SolverPlan],
    settings: S3Settings,
    rng: np.random.Generator,
) -> SolverPlan | None:
    return _offspring(space, population, _family(len(population), settings, rng), rng)


def _explore(
    space: PlanSpace,
    parents: Sequence[SolverPlan],
    taken: set[str],
    count: int,
    rng: np.random.Generator,
) -> list[tuple[str, SolverPlan]]:
    found: list[tuple[str, SolverPlan]] = []
    for _ in range(50 * count):
        if len(found) >= count:
            break
        child = space.random_variant(parents[int(rng.integers(len(parents)))], rng)
        if child is not None and (key := plan_key(child)) not in taken:
            taken.add(key)
            found.append(("explore", child))
    return found


def _plain_stage(
    space: PlanSpace,
    history: Sequence[Evaluated],
    seen: set[str],
    settings: S3Settings,
    rng: np.random.Generator,
) -> list[tuple[str, SolverPlan]]:
    """The ablation: ``proposals`` children of the best plans, then ``explore`` bold ones."""
    parents = _parents(history, settings.parents)
    taken = set(seen)
    found: list[tuple[str, SolverPlan]] = []
    for _ in range(50 * settings.proposals):
        if len(found) >= settings.proposals:
            break
        child = _child(space, parents, settings, rng)
        if child is not None and (key := plan_key(child)) not in taken:
            taken.add(key)
            found.append(("evolution", child))
    return found + _explore(space, parents, taken, settings.explore, rng)


def _pick(count: int, settings: S3Settings, rng: np.random.Generator) -> list[int]:
    """Positions, in the predictor's ranking of ``count`` candidates (best first), of the ones to
    evaluate: the first ``proposals`` (``pick="best"``), or ``proposals`` drawn without
    replacement from the first ``screen_fraction`` of them (``"screen"``), in ranking order."""
    if settings.pick == "best" or count <= settings.proposals:
        return list(range(min(count, settings.proposals)))
    kept = max(settings.proposals, math.ceil(settings.screen_fraction * count))
    return sorted(int(k) for k in rng.choice(kept, size=settings.proposals, replace=False))


def _predictor_stage(
    space: PlanSpace,
    history: Sequence[Evaluated],
    seen: set[str],
    settings: S3Settings,
    rng: np.random.Generator,
    seed: int,
    stage: int,
    features: Features = step_features,
) -> tuple[list[tuple[str, SolverPlan]], list[float]]:
    """Train the predictor, evolve on it, pick (module docstring); also returns the picks'
    predicted scores (for the ranking agreement)."""
    predictor = train_predictor(
        [features(r.plan) for r in history],
        [r.value for r in history],
        seed=int(np.random.default_rng([int(seed), stage, 1]).integers(2**31)),
        settings=settings.predictor,
    )
    parents = _parents(history, settings.parents)
    if settings.pick == "siblings":
        siblings, predicted_scores = _sibling_picks(
            space, parents, predictor, seen, settings, rng, features
        )
        picks = [("predictor", plan) for plan in siblings]
        taken = set(seen) | {plan_key(plan) for plan in siblings}
        return picks + _explore(space, parents, taken, settings.explore, rng), predicted_scores
    population = list(zip(parents, predictor.scores([features(p) for p in parents]), strict=True))
    pool: dict[str, tuple[SolverPlan, float]] = {}
    for _ in range(settings.generations):
        children: list[SolverPlan] = []
        keys: set[str] = set()
        plans = [plan for plan, _ in population]
        for _ in range(settings.children):
            child = _child(space, plans, settings, rng)
            if child is None:
                continue
            key = plan_key(child)
            if key in seen or key in pool or key in keys:
                continue
            keys.add(key)
            children.append(child)
        if not children:
            continue
        predicted = predictor.scores([features(c) for c in children])
        for child, value in zip(children, predicted, strict=True):
            pool[plan_key(child)] = (child, float(value))
        merged = population + list(zip(children, (float(v) for v in predicted), strict=True))
        merged.sort(key=lambda item: item[1])
        population = merged[: settings.parents]
    ranked = sorted(pool.items(), key=lambda item: (item[1][1], item[0]))
    ranked = [ranked[k] for k in _pick(len(ranked), settings, rng)]
    picks = [("predictor", plan) for _, (plan, _) in ranked]
    predicted_scores = [value for _, (_, value) in ranked]
    taken = set(seen) | {plan_key(plan) for _, plan in picks}
    return picks + _explore(space, parents, taken, settings.explore, rng), predicted_scores


def _sibling_picks(
    space: PlanSpace,
    parents: Sequence[SolverPlan],
    predictor: PlanPredictor,
    seen: set[str],
    settings: S3Settings,
    rng: np.random.Generator,
    features: Features = step_features,
) -> tuple[list[SolverPlan], list[float]]:
    """``pick="siblings"``: for each proposal, the parent(s) drawn as the evolution without the
    predictor draws them, ``siblings`` unseen children of them, and the predictor's best-ranked
    one; also its predicted score."""
    taken = set(seen)
    picks: list[SolverPlan] = []
    predicted: list[float] = []
    for _ in range(50 * settings.proposals):
        if len(picks) >= settings.proposals:
            break
        family = _family(len(parents), settings, rng)
        children: dict[str, SolverPlan] = {}
        for _ in range(settings.siblings):
            child = _offspring(space, parents, family, rng)
            if child is not None and (key := plan_key(child)) not in taken:
                children.setdefault(key, child)
        if not children:
            continue
        keys = list(children)
        scores = predictor.scores([features(children[k]) for k in keys])
        best = min(range(len(keys)), key=lambda k: (float(scores[k]), keys[k]))
        taken.add(keys[best])
        picks.append(children[keys[best]])
        predicted.append(float(scores[best]))
    return picks, predicted
