"""The DP family (GITS / OSS-style dynamic programming, :mod:`stepsearch.search.dynamic`).

1. Teacher on the fine grid from the objective's *search* seed (cached,
   :func:`~stepsearch.search.dynamic.record_grid_teacher`).
2. One DP schedule per candidate setting (GITS cost coefficient x cost reduction; OSS per-sample
   paths optionally).
3. Every DP candidate is scored by the objective on the search seed as a trial of the study store
   (candidates with one path are one trial); the best one is the result. The runner
   (:func:`~stepsearch.search.family.run_search`) scores the starting points, the held-out seed and
   writes the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from stepsearch.eval.objective import Objective, Score
from stepsearch.search.dynamic import (
    GITS_COEFF,
    REDUCTIONS,
    DynamicResult,
    dynamic_schedule,
    fine_grid,
    layer_rules,
    record_grid_teacher,
)
from stepsearch.search.family import FamilyBase, Found, JobContext
from stepsearch.search.job import sortable
from stepsearch.solvers.base import Solver

__all__ = ["DEFAULT_COEFFS", "DPCandidate", "DPFamily", "DPSettings"]

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


class DPFamily(FamilyBase):
    """GITS / OSS dynamic programming over a fine grid (module docstring)."""

    name = "dp"
    label = "DP (GITS / OSS)"
    settings_type = DPSettings
    default_solvers = ("dpm_solver_pp_2m", "unipc_bh2")

    def check(self, solver: Solver, num_steps: int) -> None:
        layer_rules(solver, num_steps)

    def planned_evaluations(
        self, settings: DPSettings, solver: str, nfe: int, search_samples: int, trials: int | None
    ) -> dict[str, int]:
        """The grid teacher (one evaluation per grid step, cached for every NFE and solver) and
        one search-seed scoring per DP candidate."""
        candidates = len(settings.coeffs) * len(settings.reductions)
        return {
            "once:teacher": settings.teacher_samples * (settings.grid_points - 1),
            "candidates": candidates * search_samples * int(nfe),
        }

    def search(self, job: JobContext) -> Found:
        settings: DPSettings = job.settings
        seconds: dict[str, float] = {}
        begin = time.perf_counter()
        grid = fine_grid(job.objective.source.noise, settings.grid_points, settings.grid_spacing)
        teacher = record_grid_teacher(
            job.objective.source,
            grid,
            num_samples=settings.teacher_samples,
            seed=job.objective.seeds["search"],
            solver=settings.teacher_solver,
            cache=job.objective.cache,
            progress=job.progress,
        )
        seconds["teacher"] = time.perf_counter() - begin
        begin = time.perf_counter()
        results = _dp_candidates(
            teacher, job.solver, job.num_steps, settings, job.objective, job.progress
        )
        seconds["dp"] = time.perf_counter() - begin
        job.bar.budget = len(job.starts) + len(results)
        begin = time.perf_counter()
        scored = job.evaluate(
            [result.schedule for _, _, result in results],
            [
                {"origin": "dp", "coeff": coeff, "reduction": reduction,
                 "per_sample": settings.per_sample, "path": result.path}
                for coeff, reduction, result in results
            ],
        )  # fmt: skip
        seconds["scoring"] = time.perf_counter() - begin
        candidates = [
            DPCandidate(coeff, reduction, settings.per_sample, result, score)
            for (coeff, reduction, result), score in zip(results, scored, strict=True)
        ]
        best = min(candidates, key=lambda c: sortable(c.score.value))
        return Found(
            best.result.schedule,
            best.score,
            {**settings.to_json_dict(), **best.settings, "path": best.result.path,
             "grid_times": grid.times.tolist()},
            summary={
                "best": {**best.settings, "path": best.result.path,
                         "predicted_cost": best.result.cost},
                "candidates": [
                    {**c.settings, "path": c.result.path, "search": c.score.value}
                    for c in candidates
                ],
            },
            seconds=seconds,
            details=(best, candidates),
        )  # fmt: skip


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
    from stepsearch._progress import progress_bar

    combos = [(c, r) for c in settings.coeffs for r in settings.reductions]
    bar = progress_bar(total=len(combos), desc="DP schedules", disable=not progress)
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
