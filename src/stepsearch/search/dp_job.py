"""The ``stepsearch search dp`` job: GITS / OSS-style DP schedules for one model, solver and NFE.

1. Teacher on the fine grid from the objective's *search* seed (cached, :func:`record_teacher`).
2. One DP schedule per candidate setting (GITS cost coefficient x cost reduction; OSS per-sample
   paths optionally).
3. The built-in spacings (the starting points) and every DP candidate are scored by the objective
   on the search seed as trials of the study store (:class:`~stepsearch.search.store.StudyStore`:
   ``out/study.sqlite3`` or ``--storage``): a rerun, or a second worker on the same storage, looks
   finished candidates up instead of scoring them again, and candidates with one path are one
   trial. The best DP candidate on the search seed is the result.
4. The result and the best starting point are scored on the *held-out* seed for the report; the
   files are those of :func:`~stepsearch.search.job.write_job_result` (``best_schedule.json``,
   ``scheduler/``, ``result.json``, ``progress.png``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepsearch.eval.objective import Objective, Score
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.dynamic import (
    GITS_COEFF,
    REDUCTIONS,
    DynamicResult,
    dynamic_schedule,
    fine_grid,
    layer_rules,
    record_teacher,
)
from stepsearch.search.job import (
    Baseline,
    SearchProgress,
    num_steps_for_nfe,
    output_dir,
    resolve_storage,
    sortable,
    spacing_schedules,
    write_job_result,
)
from stepsearch.search.store import StudyStore
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

__all__ = ["DEFAULT_COEFFS", "DPCandidate", "DPJobResult", "DPSettings", "run_dp_search"]

DEFAULT_COEFFS = (0.8, 0.9, 1.0, GITS_COEFF, 1.3, 1.5)
"""GITS cost coefficients tried by default: the range of GITS' published Stable Diffusion 1.5
tables (0.80-1.50; 1.15 is GITS' own default). Which one is best depends on the metric and the
NFE: on the bundled digits model (``benchmarks/results/searches_dp.md``, search seed) FD-digits
preferred 1.0 at NFE 4-6 and 0.9 at NFE 8-10, trajectory error 1.15-1.3. Each costs one DP (under a
second once the solver's coefficients are cached) and one scoring on the search seed."""


@dataclass(frozen=True)
class DPSettings:
    """What a DP job computes its candidates from (recorded in the study's metadata)."""

    grid_points: int = 100
    grid_spacing: str = "logsnr_uniform"
    teacher_samples: int = 256
    teacher_solver: str = "dpm_solver_pp_3m"
    coeffs: tuple[float, ...] = DEFAULT_COEFFS
    reductions: tuple[str, ...] = ("rms",)
    per_sample: bool = False

    def __post_init__(self) -> None:
        if not self.coeffs or not all(float(c) > 0 for c in self.coeffs):
            raise ValueError(f"give at least one positive cost coefficient, got {self.coeffs!r}")
        bad = [r for r in self.reductions if r not in REDUCTIONS]
        if not self.reductions or bad:
            raise ValueError(f"reductions must be among {REDUCTIONS}, got {self.reductions!r}")
        object.__setattr__(self, "coeffs", tuple(float(c) for c in self.coeffs))
        object.__setattr__(self, "reductions", tuple(self.reductions))

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "grid_points": int(self.grid_points),
            "grid_spacing": self.grid_spacing,
            "teacher_samples": int(self.teacher_samples),
            "teacher_solver": self.teacher_solver,
            "coeffs": list(self.coeffs),
            "reductions": list(self.reductions),
            "per_sample": bool(self.per_sample),
        }


@dataclass(frozen=True)
class DPCandidate:
    """One DP setting, the schedule it produced and its search-seed score."""

    coeff: float
    reduction: str
    per_sample: bool
    result: DynamicResult
    score: Score

    @property
    def settings(self) -> dict[str, Any]:
        return {"coeff": self.coeff, "reduction": self.reduction, "per_sample": self.per_sample}


@dataclass(frozen=True)
class DPJobResult:
    """The best candidate, its held-out score, every candidate, the scored starting points (the
    best one is ``start``), held-out values by role, the files written and timings."""

    best: DPCandidate
    held_out: Score
    candidates: list[DPCandidate]
    baselines: tuple[Baseline, ...]
    start: Baseline
    held_out_values: dict[str, float]
    files: dict[str, str]
    seconds: dict[str, float]


def run_dp_search(
    objective: Objective,
    solver: str | Solver,
    nfe: int,
    out: str | Path,
    *,
    storage: str | None = None,
    settings: DPSettings | None = None,
    study_name: str | None = None,
    progress: bool = True,
    worker_name: str | None = None,
) -> DPJobResult:
    """Run the DP job (module docstring) and write its files under ``out``."""
    settings = settings or DPSettings()
    run_solver = get_solver(solver) if isinstance(solver, str) else solver
    noise = objective.source.noise
    steps = num_steps_for_nfe(run_solver, noise, nfe)
    layer_rules(run_solver, steps)  # refuse unsupported solvers before any work
    out_path = output_dir(out)
    seconds: dict[str, float] = {}

    begin = time.perf_counter()
    grid = fine_grid(noise, settings.grid_points, settings.grid_spacing)
    teacher = record_teacher(
        objective.source,
        grid,
        num_samples=settings.teacher_samples,
        seed=objective.seeds["search"],
        solver=settings.teacher_solver,
        cache=objective.cache,
        progress=progress,
    )
    seconds["teacher"] = time.perf_counter() - begin
    begin = time.perf_counter()
    results = _dp_candidates(teacher, run_solver, steps, settings, objective, progress)
    seconds["dp"] = time.perf_counter() - begin

    starts = spacing_schedules(noise, steps)
    metadata = {
        "family": "dp",
        "model": objective.source.identity.to_json_dict(),
        "solver": {"name": run_solver.name, "config": run_solver.config()},
        "nfe": int(nfe),
        "objective": objective.describe(),
        "settings": settings.to_json_dict(),
    }
    name = study_name or f"dp-{objective.source.identity.name}-{run_solver.name}-nfe{nfe}"
    bar = SearchProgress(
        len(starts) + len(results), f"DP {run_solver.name} NFE {nfe}", enabled=progress
    )
    values: list[float] = []

    def record(index: int, score: Score) -> None:
        values.append(score.value)
        bar.update(len(values), score.value)

    begin = time.perf_counter()
    with (
        StudyStore.open(
            resolve_storage(storage, out_path), name, metadata=metadata, worker_name=worker_name
        ) as store,
        bar.running(),
    ):
        scored_starts = store.evaluate_many(
            list(starts.values()),
            lambda candidate: objective(candidate, run_solver),
            solver=run_solver,
            attrs=[{"origin": "baseline", "spacing": spacing} for spacing in starts],
            on_score=record,
        )
        scored = store.evaluate_many(
            [result.schedule for _, _, result in results],
            lambda candidate: objective(candidate, run_solver),
            solver=run_solver,
            attrs=[
                {
                    "origin": "dp",
                    "coeff": coeff,
                    "reduction": reduction,
                    "per_sample": settings.per_sample,
                    "path": result.path,
                }
                for coeff, reduction, result in results
            ],
            on_score=record,
        )
        trials = store.count()
    seconds["scoring"] = time.perf_counter() - begin
    baselines = tuple(
        Baseline(spacing, schedule, score.value)
        for (spacing, schedule), score in zip(starts.items(), scored_starts, strict=True)
    )
    candidates = [
        DPCandidate(coeff, reduction, settings.per_sample, result, score)
        for (coeff, reduction, result), score in zip(results, scored, strict=True)
    ]
    best = min(candidates, key=lambda c: sortable(c.score.value))
    start = min(baselines, key=lambda b: sortable(b.value))
    held_out = objective.held_out(best.result.schedule, run_solver)
    held_out_values = {
        "search_result": held_out.value,
        f"start ({start.name})": objective.held_out(start.schedule, run_solver).value,
    }
    provenance = objective.provenance(
        run_solver,
        best.score,
        held_out,
        "dp",
        {**settings.to_json_dict(), **best.settings, "path": best.result.path,
         "grid_times": grid.times.tolist()},
        extra={"study": {"name": name, "trials": trials}},
    )  # fmt: skip
    summary = {
        "family": "dp",
        "solver": run_solver.name,
        "nfe": int(nfe),
        "metric": objective.metric,
        "trials_in_study": trials,
        "best": {
            **best.settings,
            "path": best.result.path,
            "times": best.result.schedule.times.tolist(),
            "predicted_cost": best.result.cost,
            "search": best.score.value,
            "held_out": held_out.value,
        },
        "start": {
            "spacing": start.name,
            "search": start.value,
            "held_out": held_out_values[f"start ({start.name})"],
        },
        "candidates": [
            {**c.settings, "path": c.result.path, "search": c.score.value} for c in candidates
        ],
        "baselines": {b.name: b.value for b in baselines},
        "held_out": held_out_values,
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
    }
    files = write_job_result(
        out_path,
        ScheduleFile(best.result.schedule, provenance),
        summary,
        values=values,
        baselines=baselines,
        title=f"DP (GITS / OSS): {objective.source.identity.name}, {run_solver.name}, NFE {nfe}",
    )
    return DPJobResult(
        best, held_out, candidates, baselines, start, held_out_values, files, seconds
    )


def _dp_candidates(
    teacher: Any,
    solver: Solver,
    steps: int,
    settings: DPSettings,
    objective: Objective,
    progress: bool,
) -> list[tuple[float, str, DynamicResult]]:
    """One DP schedule per (coefficient, reduction); the first call also computes (and caches) the
    solver's step coefficients on the grid, which takes the longest."""
    from tqdm.auto import tqdm

    combos = [(c, r) for c in settings.coeffs for r in settings.reductions]
    bar = tqdm(total=len(combos), desc="DP schedules", disable=not progress)
    out = []
    for coeff, reduction in combos:
        result = dynamic_schedule(
            teacher,
            solver,
            steps,
            coeff=coeff,
            reduction=reduction,
            per_sample=settings.per_sample,
            cache=objective.cache,
            progress=(lambda text: bar.set_description(text, refresh=True)) if progress else None,
        )
        out.append((coeff, reduction, result))
        bar.set_description("DP schedules")
        bar.update()
    bar.close()
    return out
