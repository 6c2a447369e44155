"""AutoDiffusion: evolutionary search over timestep subsets of a fixed size.

Li et al., "AutoDiffusion: Training-Free Optimization of Time Steps and Architectures for Automated
Diffusion Model Acceleration", ICCV 2023 (lilijiangg/AutoDiffusion). A candidate is a set of ``k``
distinct points of a time grid (the model's 1000 trained steps for a DiscreteVP), sampled from the
largest to the smallest and then to clean data, so ``k`` is the number of solver steps that spends
the NFE budget. Its fitness is the objective (FD / KID / trajectory error) on the search seed. Each
generation holds ``population`` candidates (the paper: 50):

- ``mutations`` (25) children of a parent drawn from the ``parents`` (10) best candidates so far,
  each gene replaced with probability ``mutation_probability`` (0.1) by a grid point the parent
  does not use;
- ``crossovers`` (10) children of two distinct such parents by uniform crossover (each position of
  the sorted gene lists from either parent with probability 1/2; a child with a repeated point is
  rejected);
- the rest drawn uniformly at random.

A candidate evaluated before (or proposed twice) is rejected and drawn again ("duplicates
skipped"). Generation 0 is the given starting schedules (snapped to the grid) and random ones.

Why these operators are written out here rather than taken from an evolutionary library: the loop
that needs a library - trial bookkeeping, storage, resume, several workers - is Optuna's (every
candidate is a trial in the :class:`~stepsearch.search.store.StudyStore`, driven by ask-and-tell).
The proposal rule itself is 40 lines that no library has as such: Optuna's GA (``NSGAIISampler``)
draws each parameter on its own (no fixed-size subset without repeats), fixes its own population
composition and keeps its random state in the process, so a killed or second worker would not
replay the same proposals; pymoo would carry its state across a restart only by pickling its
algorithm object, and DEAP draws from Python's global ``random``. Here each generation is a pure
function of the seed, the generation number and the stored values of the earlier ones
(:func:`propose_generation`), so a rerun of the same command replays every proposal, finds the
evaluated ones in the store, and ends with the identical result; several workers running the same
command share one generation's evaluations through the store and also reach the identical result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stepsearch.eval.objective import Objective, Score
from stepsearch.noise import DiscreteVP, FlowMatching, NoiseSchedule
from stepsearch.schedule import StepSchedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.family import family, run_search
from stepsearch.search.job import Baseline, sortable
from stepsearch.search.store import StudyStore
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

__all__ = [
    "AutoDiffusionResult",
    "AutoDiffusionSettings",
    "Evaluated",
    "JobSummary",
    "autodiffusion",
    "genes_from_schedule",
    "propose_generation",
    "run_autodiffusion_job",
    "schedule_from_genes",
    "time_grid",
]

Genes = tuple[int, ...]
"""A candidate: sorted, distinct indices into the time grid (ascending time)."""


@dataclass(frozen=True)
class AutoDiffusionSettings:
    """The evolutionary search's settings (defaults: the paper's)."""

    population: int = 50
    mutations: int = 25
    crossovers: int = 10
    parents: int = 10
    mutation_probability: float = 0.1
    max_tries: int = 200
    """Draws per slot before a mutation / crossover slot falls back to a random candidate."""

    def __post_init__(self) -> None:
        for name in ("population", "parents", "max_tries"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.mutations < 0 or self.crossovers < 0:
            raise ValueError("mutations and crossovers must be >= 0")
        if self.mutations + self.crossovers > self.population:
            raise ValueError(
                f"mutations + crossovers ({self.mutations} + {self.crossovers}) exceed the "
                f"population ({self.population})"
            )
        if not 0.0 < self.mutation_probability <= 1.0:
            raise ValueError(
                f"mutation_probability must be in (0, 1], got {self.mutation_probability!r}"
            )

    @property
    def randoms(self) -> int:
        return self.population - self.mutations - self.crossovers

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "population": self.population,
            "mutations": self.mutations,
            "crossovers": self.crossovers,
            "parents": self.parents,
            "mutation_probability": self.mutation_probability,
            "max_tries": self.max_tries,
        }


@dataclass(frozen=True)
class Evaluated:
    """One evaluated candidate: its place in the search (``index``, ``generation``), how it was
    made (``origin``: seed name, ``random``, ``mutation``, ``crossover``) and its value."""

    index: int
    generation: int
    origin: str
    genes: Genes
    value: float


@dataclass(frozen=True)
class AutoDiffusionResult:
    """The search's outcome: the best schedule and score (search seed), and every candidate."""

    best: StepSchedule
    best_score: Score
    history: tuple[Evaluated, ...] = field(repr=False)
    seed: int
    settings: AutoDiffusionSettings

    @property
    def values(self) -> list[float]:
        return [record.value for record in self.history]


# the search space ------------------------------------------------------------------------------
def time_grid(noise: NoiseSchedule, size: int = 1000) -> np.ndarray:
    """The points a candidate chooses from (ascending): the trained steps of a discrete schedule
    (DiscreteVP, FlowMatching's ``num_train_timesteps``), else ``size`` uniform times in
    ``[t_min, t_max]``."""
    if isinstance(noise, DiscreteVP):
        return np.asarray(noise.t_from_timestep(np.arange(noise.num_train_timesteps)), np.float64)
    if isinstance(noise, FlowMatching):
        steps = noise.num_train_timesteps
        return np.arange(1, steps + 1, dtype=np.float64) / steps * float(noise.t_max)
    return np.linspace(float(noise.t_min), float(noise.t_max), int(size))


def schedule_from_genes(genes: Genes, grid: np.ndarray, noise: NoiseSchedule) -> StepSchedule:
    """The schedule visiting ``grid[genes]`` from the largest time down, then clean data."""
    times = np.append(grid[np.asarray(genes, dtype=np.int64)][::-1], 0.0)
    return StepSchedule(times, noise, {"search": "autodiffusion"})


def genes_from_schedule(schedule: StepSchedule, grid: np.ndarray) -> Genes | None:
    """``schedule``'s noisy times snapped to the nearest grid points; ``None`` if two coincide."""
    noisy = schedule.times[schedule.times > 0]
    genes = tuple(sorted(int(np.argmin(np.abs(grid - t))) for t in noisy))
    return genes if len(set(genes)) == len(genes) else None


# the proposal rule -----------------------------------------------------------------------------
def _random(rng: np.random.Generator, k: int, grid_size: int) -> Genes:
    return tuple(sorted(int(g) for g in rng.choice(grid_size, size=k, replace=False)))


def _mutate(rng: np.random.Generator, parent: Genes, grid_size: int, probability: float) -> Genes:
    genes = set(parent)
    for gene in parent:
        if rng.random() < probability:
            unused = np.setdiff1d(np.arange(grid_size), np.fromiter(genes, np.int64))
            if unused.size == 0:
                break
            genes.discard(gene)
            genes.add(int(rng.choice(unused)))
    return tuple(sorted(genes))


def _crossover(rng: np.random.Generator, first: Genes, second: Genes) -> Genes | None:
    take_first = rng.random(len(first)) < 0.5
    child = [a if pick else b for a, b, pick in zip(first, second, take_first, strict=True)]
    return tuple(sorted(child)) if len(set(child)) == len(child) else None


def propose_generation(
    seed: int,
    generation: int,
    k: int,
    grid_size: int,
    history: Sequence[Evaluated],
    settings: AutoDiffusionSettings,
    starts: Sequence[tuple[str, Genes]] = (),
) -> list[tuple[str, Genes]]:
    """Generation ``generation``'s candidates as ``(origin, genes)`` (module docstring): a pure
    function of its arguments. Fewer than ``population`` come back only when the space has no
    unseen candidates left."""
    if k > grid_size:
        raise ValueError(f"cannot choose {k} distinct points from a grid of {grid_size}")
    rng = np.random.default_rng([int(seed), int(generation)])
    seen = {record.genes for record in history}
    proposed: list[tuple[str, Genes]] = []

    def accept(origin: str, genes: Genes | None) -> bool:
        if genes is None or genes in seen:
            return False
        seen.add(genes)
        proposed.append((origin, genes))
        return True

    def draw_random(tries: int) -> None:
        for _ in range(tries):
            if accept("random", _random(rng, k, grid_size)):
                return

    if generation == 0:
        for origin, genes in starts:
            if len(proposed) < settings.population and len(genes) == k:
                accept(origin, genes)
        while len(proposed) < settings.population and len(seen) < math.comb(grid_size, k):
            draw_random(settings.max_tries)
        return proposed
    ranked = sorted(history, key=lambda r: (sortable(r.value), r.index))
    parents = [record.genes for record in ranked[: settings.parents]]
    for _ in range(settings.mutations):
        for _ in range(settings.max_tries):
            parent = parents[int(rng.integers(len(parents)))]
            if accept("mutation", _mutate(rng, parent, grid_size, settings.mutation_probability)):
                break
        else:
            draw_random(settings.max_tries)
    for _ in range(settings.crossovers):
        for _ in range(settings.max_tries if len(parents) > 1 else 0):
            first, second = rng.choice(len(parents), size=2, replace=False)
            if accept("crossover", _crossover(rng, parents[int(first)], parents[int(second)])):
                break
        else:
            draw_random(settings.max_tries)
    while len(proposed) < settings.population and len(seen) < math.comb(grid_size, k):
        draw_random(settings.max_tries)
    return proposed


# the search ------------------------------------------------------------------------------------
def autodiffusion(
    objective: Objective,
    solver: str | Solver,
    *,
    nfe: int,
    budget: int,
    store: StudyStore,
    seed: int = 0,
    starts: Mapping[str, StepSchedule] | None = None,
    settings: AutoDiffusionSettings | None = None,
    grid: np.ndarray | None = None,
    on_trial: Callable[[int, float], None] | None = None,
) -> AutoDiffusionResult:
    """Search ``budget`` candidates for the schedule ``solver`` runs best at ``nfe`` model
    evaluations (module docstring); every candidate is a trial in ``store``. ``starts`` (named
    schedules, e.g. the built-in spacings) open generation 0. ``on_trial(done, best)`` reports
    progress. Rerunning with the same store replays the search from it (resume)."""
    settings = settings or AutoDiffusionSettings()
    run_solver = get_solver(solver) if isinstance(solver, str) else solver
    noise = objective.source.noise
    if isinstance(budget, bool) or int(budget) < 1:
        raise ValueError(f"budget must be a positive number of trials, got {budget!r}")
    k = run_solver.num_steps_for_nfe(nfe)
    grid = time_grid(noise) if grid is None else np.asarray(grid, dtype=np.float64)
    seeds = [
        (name, genes)
        for name, schedule in (starts or {}).items()
        if (genes := genes_from_schedule(schedule, grid)) is not None and len(genes) == k
    ]
    history: list[Evaluated] = []
    best, done = math.inf, 0

    def score(candidate: StepSchedule) -> Score:
        return objective(candidate, run_solver)

    generation = 0
    while len(history) < budget:
        proposals = propose_generation(seed, generation, k, grid.size, history, settings, seeds)
        proposals = proposals[: int(budget) - len(history)]
        if not proposals:
            break  # the space is exhausted
        schedules = [schedule_from_genes(genes, grid, noise) for _, genes in proposals]
        done_before = len(history)

        def report(position: int, result: Score) -> None:
            nonlocal best, done
            best, done = min(best, sortable(result.value)), done + 1
            if on_trial is not None:
                on_trial(done, best)

        attrs = [
            {"generation": generation, "index": done_before + i, "origin": origin}
            for i, (origin, _) in enumerate(proposals)
        ]
        scores = store.evaluate_many(
            schedules, score, solver=run_solver, attrs=attrs, on_score=report
        )
        for i, ((origin, genes), result) in enumerate(zip(proposals, scores, strict=True)):
            history.append(Evaluated(done_before + i, generation, origin, genes, result.value))
        generation += 1
    if not history:
        raise ValueError("the search evaluated nothing")
    winner = min(history, key=lambda r: (sortable(r.value), r.index))
    best_schedule = schedule_from_genes(winner.genes, grid, noise)
    best_score = store.evaluate(best_schedule, score, solver=run_solver)  # a lookup
    return AutoDiffusionResult(best_schedule, best_score, tuple(history), int(seed), settings)


# the job ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSummary:
    """What :func:`run_autodiffusion_job` wrote and measured."""

    result: AutoDiffusionResult
    schedule_file: ScheduleFile
    start: Baseline
    baselines: tuple[Baseline, ...]
    held_out: dict[str, float]
    files: dict[str, str]
    seconds: float


def run_autodiffusion_job(
    objective: Objective,
    solver: str,
    *,
    nfe: int,
    budget: int,
    out: str | Path,
    storage: str | None = None,
    seed: int = 0,
    settings: AutoDiffusionSettings | None = None,
    study_name: str | None = None,
    progress: bool = True,
    worker_name: str | None = None,
) -> JobSummary:
    """``stepsearch search autodiffusion``: the AutoDiffusion family
    (:mod:`stepsearch.search.families.autodiffusion`) through the job runner
    (:func:`~stepsearch.search.family.run_search`): a study store (``storage``, default
    ``out/study.sqlite3``), the built-in spacings at ``nfe`` as starting points, the result files
    with held-out scores of the result and of the best starting spacing. Rerun the same command to
    resume; run it in several processes on one storage to share the work."""
    job = run_search(
        family("autodiffusion"),
        objective,
        solver,
        nfe,
        out,
        settings=settings or AutoDiffusionSettings(),
        storage=storage,
        study_name=study_name,
        progress=progress,
        worker_name=worker_name,
        seed=seed,
        budget=budget,
    )
    result: AutoDiffusionResult = job.found.details
    return JobSummary(
        result,
        job.schedule_file,
        job.start if job.start is not None else Baseline("none", result.best, math.nan),
        job.baselines,
        job.held_out_values,
        job.files,
        job.seconds["total"],
    )
