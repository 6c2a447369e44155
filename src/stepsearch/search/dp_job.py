"""The ``stepsearch search dp`` job: GITS / OSS-style DP schedules for one model, solver and NFE.

1. Teacher on the fine grid from the objective's *search* seed (cached, :func:`record_teacher`).
2. One DP schedule per candidate setting (GITS cost coefficient x cost reduction; OSS per-sample
   paths optionally); candidates with the same path are evaluated once.
3. Every candidate is scored by the objective on the search seed and recorded as a trial of an
   Optuna study (``storage``: SQLite file or database URL; a rerun looks finished candidates up
   instead of scoring them again). The best on the search seed is the result.
4. The result and the baselines (the solver on the built-in spacings) are scored on the
   *held-out* seed for the report; the job writes ``schedule.json`` (a
   :class:`~stepsearch.schedule_file.ScheduleFile` with provenance), ``scheduler/`` (a diffusers
   scheduler directory replaying it), ``dp.png`` (candidate scores, the schedule against the
   baselines) and ``summary.json``.

The study store here is a few lines of Optuna ask-and-tell (the shared store module of issue 12 was
not on this branch when it was written); candidates are a fixed list, so resuming is a look-up.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stepsearch._io import atomic_write_json
from stepsearch.eval.objective import Objective, Score
from stepsearch.schedule import StepSchedule, make_schedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.dynamic import (
    GITS_COEFF,
    DynamicResult,
    dynamic_schedule,
    fine_grid,
    layer_rules,
    record_teacher,
)
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

__all__ = ["DEFAULT_COEFFS", "DPCandidate", "DPJobResult", "run_dp_search"]

DEFAULT_COEFFS = (1.0, GITS_COEFF, 1.3)
"""GITS cost coefficients tried by default (1.15 is GITS' own default)."""

BASELINE_SPACINGS = ("trailing", "leading", "time_uniform", "logsnr_uniform", "karras")
"""Built-in spacings the result is compared with (discrete models; others use the continuous ones)."""


@dataclass(frozen=True)
class DPCandidate:
    """One DP setting and the schedule it produced, with its search-seed score."""

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
    """What the job found and wrote (paths under ``out``)."""

    best: DPCandidate
    held_out: Score
    candidates: list[DPCandidate]
    baselines: dict[str, dict[str, Score]]
    files: dict[str, Path]
    seconds: dict[str, float] = field(default_factory=dict)


def _study(storage: str | None, name: str) -> Any | None:
    if storage is None:
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" not in storage:  # a plain path: an SQLite file
        storage = f"sqlite:///{Path(storage).resolve()}"
    return optuna.create_study(
        study_name=name, storage=storage, direction="minimize", load_if_exists=True
    )


def _candidate_key(schedule: StepSchedule) -> str:
    return json.dumps([round(float(t), 12) for t in schedule.times])


def _recorded(study: Any | None) -> dict[str, float]:
    """Finished trials of ``study`` by candidate key."""
    if study is None:
        return {}
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return {
        trial.user_attrs["key"]: float(trial.value) for trial in done if "key" in trial.user_attrs
    }


def _record(study: Any | None, candidate: DPCandidate, key: str) -> None:
    if study is None:
        return
    trial = study.ask()
    for name, value in {**candidate.settings, "key": key}.items():
        trial.set_user_attr(name, value)
    trial.set_user_attr("path", candidate.result.path)
    trial.set_user_attr("score", candidate.score.to_json_dict())
    study.tell(trial, candidate.score.value)


def baseline_schedules(noise: Any, num_steps: int) -> dict[str, StepSchedule]:
    """The built-in spacings at ``num_steps`` that exist for ``noise``."""
    out = {}
    for spacing in BASELINE_SPACINGS:
        try:
            out[spacing] = make_schedule(noise, num_steps, spacing)
        except ValueError:  # diffusers spacings need a discrete schedule
            continue
    return out


def run_dp_search(
    objective: Objective,
    solver: str | Solver,
    nfe: int,
    out: str | Path,
    *,
    storage: str | None = None,
    grid_points: int = 100,
    grid_spacing: str = "logsnr_uniform",
    teacher_samples: int = 256,
    teacher_solver: str = "dpm_solver_pp_3m",
    coeffs: Sequence[float] = DEFAULT_COEFFS,
    reductions: Sequence[str] = ("rms",),
    per_sample: bool = False,
    progress: bool = True,
) -> DPJobResult:
    """Run the DP search (module docstring) and write its files under ``out``."""
    from tqdm.auto import tqdm

    run_solver = get_solver(solver) if isinstance(solver, str) else solver
    layer_rules(run_solver, nfe)  # refuse unsupported solvers before any work
    source = objective.source
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    grid = fine_grid(source.noise, grid_points, grid_spacing)
    teacher = record_teacher(
        source,
        grid,
        num_samples=teacher_samples,
        seed=objective.seeds["search"],
        solver=teacher_solver,
        cache=objective.cache,
        progress=progress,
    )
    seconds["teacher"] = time.perf_counter() - start
    if not coeffs:
        raise ValueError("give at least one cost coefficient")
    settings = [(float(c), r) for c in coeffs for r in reductions]
    name = (
        f"dp-{source.identity.name}-{source.identity.digest[7:19]}-{run_solver.name}"
        f"-nfe{nfe}-{objective.metric}"
    )
    study = _study(storage, name)
    recorded = _recorded(study)
    bar = tqdm(total=len(settings), desc="DP candidates", disable=not progress)
    candidates: list[DPCandidate] = []
    scored: dict[str, Score] = {}
    start = time.perf_counter()
    for coeff, reduction in settings:
        result = dynamic_schedule(
            teacher,
            run_solver,
            nfe,
            coeff=coeff,
            reduction=reduction,
            per_sample=per_sample,
            cache=objective.cache,
            progress=(lambda text: bar.set_description(text, refresh=True)) if progress else None,
        )
        key = _candidate_key(result.schedule)
        if key not in scored:
            scored[key] = objective(result.schedule, run_solver)
        candidate = DPCandidate(coeff, reduction, per_sample, result, scored[key])
        if key not in recorded:
            _record(study, candidate, key)
            recorded[key] = candidate.score.value
        candidates.append(candidate)
        best_value = min(c.score.value for c in candidates)
        bar.set_description("DP candidates", refresh=False)
        bar.set_postfix(best=f"{best_value:.4g}")
        bar.update()
    bar.close()
    seconds["dp_and_scoring"] = time.perf_counter() - start
    best = min(candidates, key=lambda c: c.score.value)
    held_out = objective.held_out(best.result.schedule, run_solver)
    start = time.perf_counter()
    baselines = {
        spacing: {
            "search": objective(schedule, run_solver),
            "held_out": objective.held_out(schedule, run_solver),
        }
        for spacing, schedule in baseline_schedules(source.noise, nfe).items()
    }
    seconds["baselines"] = time.perf_counter() - start
    files = _write_outputs(out, objective, run_solver, best, held_out, candidates, baselines, study)
    return DPJobResult(best, held_out, candidates, baselines, files, seconds)


def _write_outputs(
    out: Path,
    objective: Objective,
    solver: Solver,
    best: DPCandidate,
    held_out: Score,
    candidates: list[DPCandidate],
    baselines: dict[str, dict[str, Score]],
    study: Any | None,
) -> dict[str, Path]:
    settings = {**best.result.settings, "candidates": [c.settings for c in candidates]}
    settings.pop("grid", None)
    settings["grid_times"] = best.result.settings["grid"]["times"]
    provenance = objective.provenance(
        solver,
        best.score,
        held_out,
        "dp",
        settings,
        extra={"study": study.study_name if study is not None else None},
    )
    files = {"schedule": out / "schedule.json", "scheduler": out / "scheduler"}
    ScheduleFile(best.result.schedule, provenance).save(files["schedule"])
    _save_scheduler(best.result.schedule, solver, objective, files["scheduler"])
    summary = {
        "best": {
            **best.settings,
            "path": best.result.path,
            "times": best.result.schedule.times.tolist(),
            "predicted_cost": best.result.cost,
            "search": best.score.to_json_dict(),
            "held_out": held_out.to_json_dict(),
        },
        "candidates": [
            {**c.settings, "path": c.result.path, "search": c.score.to_json_dict()}
            for c in candidates
        ],
        "baselines": {
            spacing: {split: score.to_json_dict() for split, score in scores.items()}
            for spacing, scores in baselines.items()
        },
    }
    files["summary"] = out / "summary.json"
    atomic_write_json(files["summary"], summary)
    files["plot"] = out / "dp.png"
    _plot(files["plot"], best, held_out, candidates, baselines, objective.metric)
    return files


def _save_scheduler(
    schedule: StepSchedule, solver: Solver, objective: Objective, path: Path
) -> None:
    """A diffusers scheduler directory that replays ``schedule`` with ``solver``."""
    from stepsearch.integrations.diffusers import StepsearchScheduler

    prediction_type = objective.source.describe().get("prediction_type") or "epsilon"
    scheduler = StepsearchScheduler.from_step_schedule(
        schedule, solver.name, solver_kwargs=solver.config(), prediction_type=prediction_type
    )
    scheduler.save_pretrained(str(path))


def _plot(
    path: Path,
    best: DPCandidate,
    held_out: Score,
    candidates: list[DPCandidate],
    baselines: dict[str, dict[str, Score]],
    metric: str,
) -> None:
    """Left: candidate scores (search seed) in trial order with the running best; right: the
    schedule (half log-SNR per step) against the baselines, held-out scores in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stepsearch._io import atomic_write_bytes

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    values = [c.score.value for c in candidates]
    left.plot(range(1, len(values) + 1), values, "o", label="candidate (search seed)")
    left.plot(range(1, len(values) + 1), np.minimum.accumulate(values), "-", label="best so far")
    left.set_xlabel("trial")
    left.set_ylabel(metric)
    left.legend()
    noise = best.result.schedule.noise
    for spacing, scores in baselines.items():
        schedule = make_schedule(noise, best.result.schedule.num_steps, spacing)
        lambdas = np.clip(schedule.lambdas, None, 12.0)
        right.plot(lambdas, ".--", alpha=0.6, label=f"{spacing}: {scores['held_out'].value:.4g}")
    lambdas = np.clip(best.result.schedule.lambdas, None, 12.0)
    right.plot(lambdas, "o-", color="black", label=f"DP: {held_out.value:.4g}")
    right.set_xlabel("step")
    right.set_ylabel("lambda = log(alpha / sigma) (clean end clipped)")
    right.set_title(f"held-out {metric}")
    right.legend(fontsize=8)
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
