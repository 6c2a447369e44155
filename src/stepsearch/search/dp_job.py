"""The ``stepsearch search dp`` job: the DP family (:mod:`stepsearch.search.families.dp`) through
the one job runner (:func:`~stepsearch.search.family.run_search`), which writes
``best_schedule.json``, ``scheduler/``, ``result.json`` and ``progress.png`` under ``out`` and
records every scored candidate in the study store (``out/study.sqlite3`` or ``storage``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stepsearch.eval.objective import Objective, Score
from stepsearch.search.families.dp import DEFAULT_COEFFS, DPCandidate, DPFamily, DPSettings
from stepsearch.search.family import FAMILIES, run_search
from stepsearch.search.job import Baseline
from stepsearch.solvers.base import Solver

__all__ = ["DEFAULT_COEFFS", "DPCandidate", "DPJobResult", "DPSettings", "run_dp_search"]


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
    job = run_search(
        FAMILIES.get("dp") or DPFamily(),
        objective,
        solver,
        nfe,
        out,
        settings=settings or DPSettings(),
        storage=storage,
        study_name=study_name,
        progress=progress,
        worker_name=worker_name,
    )
    best, candidates = job.found.details
    assert job.start is not None
    return DPJobResult(
        best, job.held_out, candidates, job.baselines, job.start, job.held_out_values, job.files,
        job.seconds,
    )  # fmt: skip
