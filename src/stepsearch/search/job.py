"""What every search job shares: its output folder, its starting points, progress, result files.

A job (``stepsearch search <family> ... --out DIR``) writes into ``DIR``:

- ``study.sqlite3``: the study store (unless ``--storage`` names another file or a database URL);
- ``best_schedule.json``: the result as a :class:`~stepsearch.schedule_file.ScheduleFile` whose
  provenance carries the search-seed and held-out scores (written as soon as the result exists,
  with ``scores.held_out`` ``null``, and again once the held-out comparison is done);
- ``scheduler/``: a diffusers scheduler directory replaying it
  (``StepsearchXScheduler.from_pretrained(DIR / "scheduler")``; for a solver plan a
  :class:`~stepsearch.integrations.plan_scheduler.StepsearchPlanScheduler`);
- ``result.json``: a summary (best, starting point, baselines, held-out scores, trials, timings),
  written last: its presence means the job is complete;
- ``progress.png``: best score vs trials, and the schedule against the baselines.

Searches call these helpers; the CLI modules only parse arguments.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepsearch._io import atomic_write_bytes, atomic_write_json, run_relative
from stepsearch._progress import PlainProgress, interactive
from stepsearch.integrations.load import write_scheduler_dir
from stepsearch.integrations.plan_scheduler import write_plan_scheduler_dir
from stepsearch.noise import DiscreteVP, FlowMatching, NoiseSchedule
from stepsearch.schedule import StepSchedule, make_schedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.store import DEFAULT_STORAGE_NAME
from stepsearch.solvers.base import Solver

__all__ = [
    "DEFAULT_SPACINGS",
    "Baseline",
    "SearchProgress",
    "output_dir",
    "plot_search",
    "resolve_storage",
    "sortable",
    "spacing_schedules",
    "write_best_files",
    "write_job_result",
    "write_job_summary",
    "write_scheduler_dir",
]

DEFAULT_SPACINGS = ("time_uniform", "logsnr_uniform", "karras", "leading", "linspace", "trailing")
"""The built-in spacings a search starts from and is compared with (those that apply to the
model's noise schedule: diffusers' leading / linspace / trailing need a DiscreteVP)."""


def output_dir(out: str | os.PathLike[str]) -> Path:
    """``out`` as a folder (created); an existing file there raises ``ValueError``."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_storage(storage: str | None, out: Path) -> str:
    """The study store of a job: ``storage`` as given (a path or a database URL), else
    ``out / study.sqlite3``."""
    return str(out / DEFAULT_STORAGE_NAME) if storage in (None, "") else str(storage)


def sortable(value: float) -> float:
    """A score as a sort key: NaN (a failed or diverged candidate) ranks last, as ``+inf``."""
    return math.inf if math.isnan(value) else value


def spacing_schedules(
    noise: NoiseSchedule, num_steps: int, spacings: Sequence[str] = DEFAULT_SPACINGS
) -> dict[str, StepSchedule]:
    """``num_steps``-step schedules of the ``spacings`` that apply to ``noise`` (others skipped)."""
    schedules = {}
    for name in spacings:
        if name in ("leading", "linspace", "trailing") and not isinstance(noise, DiscreteVP):
            continue
        if name == "flow_shifted" and not isinstance(noise, FlowMatching):
            continue
        schedules[name] = make_schedule(noise, num_steps, name)
    return schedules


@dataclass(frozen=True)
class Baseline:
    """A built-in spacing's schedule and its score on the search seed (for plots and reports)."""

    name: str
    schedule: StepSchedule
    value: float


class SearchProgress:
    """A progress bar of a search: trials done out of the budget, best score so far. A rich bar
    when stderr is a terminal; else a plain line at most every 10 s and one at the end
    (:class:`~stepsearch._progress.PlainProgress`: a log shows progress while it goes)."""

    def __init__(self, budget: int, description: str, *, enabled: bool = True):
        self._budget = int(budget)
        self.description = description
        self.enabled = enabled
        self.best = math.inf
        self._progress: Any = None
        self._task: Any = None
        self._plain: PlainProgress | None = None

    @property
    def budget(self) -> int:
        """The bar's total; a family that learns its real count late (DP) sets it."""
        return self._budget

    @budget.setter
    def budget(self, value: int) -> None:
        self._budget = int(value)
        if self._progress is not None:
            self._progress.update(self._task, total=self._budget)
        if self._plain is not None:
            self._plain.total = self._budget

    @contextmanager
    def running(self) -> Iterator[SearchProgress]:
        if not self.enabled:
            yield self
            return
        if not interactive():
            self._plain = PlainProgress(total=self.budget, desc=self.description)
            try:
                yield self
            finally:
                self._plain.close()
                self._plain = None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, transient=False) as progress:
            self._progress = progress
            self._task = progress.add_task(self.description, total=self.budget, best="-")
            try:
                yield self
            finally:
                self._progress = None

    def update(self, done: int, best: float) -> None:
        """``done`` trials finished (looked up or evaluated); ``best`` the best value so far."""
        self.best = min(self.best, best)
        if self._progress is not None:
            self._progress.update(self._task, completed=done, best=f"{self.best:.5g}")
        if self._plain is not None:
            self._plain.set_completed(done, f"best {self.best:.5g}")


def plot_search(
    path: str | os.PathLike[str],
    values: Sequence[float],
    best: StepSchedule,
    baselines: Sequence[Baseline],
    *,
    metric: str,
    title: str,
    marks: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """A PNG: the best search-seed score vs trials (every trial faint, baselines as lines), and
    the best schedule's noise levels (k-diffusion sigma, log scale) against the baselines'.
    ``marks`` (label -> trial positions in ``values``) are drawn as coloured points, with the
    best-so-far curve of the trials without them beside the full one."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    values_array = np.asarray(values, dtype=np.float64)
    finite = np.where(np.isfinite(values_array), values_array, np.nan)
    best_so_far = np.fmin.accumulate(np.where(np.isnan(finite), np.inf, finite))
    trials = np.arange(1, values_array.size + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.scatter(trials, finite, s=6, alpha=0.25, color="tab:gray", label="trial")
    left.plot(trials, best_so_far, color="tab:red", lw=2, label="best so far")
    for index, (label, positions) in enumerate((marks or {}).items()):
        chosen = np.zeros(values_array.size, dtype=bool)
        chosen[[p for p in positions if 0 <= p < values_array.size]] = True
        color = ("tab:blue", "tab:green", "tab:purple")[index % 3]
        left.scatter(trials[chosen], finite[chosen], s=14, color=color, label=label, zorder=3)
        others = np.where(chosen | np.isnan(finite), np.inf, finite)
        left.plot(trials, np.minimum.accumulate(others), color=color, lw=1.5, ls=":",
                  label=f"best so far without the {label}")  # fmt: skip
    for index, baseline in enumerate(baselines):
        left.axhline(baseline.value, lw=1, ls="--", color=f"C{index % 10}", label=baseline.name)
    if np.nanmin(finite, initial=np.inf) > 0:
        left.set_yscale("log")
    left.set_xlabel("trials")
    left.set_ylabel(f"{metric} (search seed)")
    left.legend(fontsize=7)
    for index, baseline in enumerate(baselines):
        _plot_schedule(right, baseline.schedule, baseline.name, f"C{index % 10}", lw=1, ls="--")
    _plot_schedule(right, best, "search result", "tab:red", lw=2.5, ls="-")
    right.set_xlabel("step i")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel("k-diffusion sigma (log)")
    right.set_yscale("log")
    right.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def _plot_schedule(axes: Any, schedule: StepSchedule, label: str, color: str, **style: Any) -> None:
    sigmas = schedule.to_kdiffusion_sigmas()
    noisy = sigmas > 0
    axes.plot(np.arange(sigmas.size)[noisy], sigmas[noisy], marker="o", ms=3, label=label,
              color=color, **style)  # fmt: skip


def write_best_files(out: Path, schedule_file: ScheduleFile, *, solver: Solver) -> dict[str, str]:
    """Write a job's result itself into ``out``: ``best_schedule.json`` and ``scheduler/`` (when
    the noise schedule has a diffusers form; ``solver`` runs the result). Called as soon as the
    result exists, before the held-out comparison (which can take far longer than the search);
    returns the paths by role (``schedule``, ``scheduler``)."""
    schedule_path = out / "best_schedule.json"
    schedule_file.save(schedule_path)
    paths = {"schedule": str(schedule_path)}
    config = {}
    if schedule_file.provenance.prediction_type is not None:
        config["prediction_type"] = schedule_file.provenance.prediction_type
    if schedule_file.is_plan:  # its own scheduler class, replaying the plan bit for bit
        scheduler_dir = write_plan_scheduler_dir(
            out / "scheduler",
            schedule_file.candidate,
            solver,
            provenance=schedule_file.provenance.to_json_dict(),
            **config,
        )
    else:
        scheduler_dir = write_scheduler_dir(
            out / "scheduler", schedule_file.schedule, solver, **config
        )
    if scheduler_dir is not None:
        paths["scheduler"] = str(scheduler_dir)
    return paths


def write_job_summary(
    out: Path,
    schedule_file: ScheduleFile,
    summary: Mapping[str, Any],
    *,
    files: Mapping[str, str],
    values: Sequence[float],
    baselines: Sequence[Baseline],
    title: str,
    marks: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, str]:
    """Write ``progress.png`` and ``result.json`` (``summary`` plus the run-relative ``files``
    and these two) into ``out``; returns every path by role."""
    paths = dict(files)
    paths["plot"] = str(
        plot_search(
            out / "progress.png",
            values,
            schedule_file.schedule,
            baselines,
            metric=str(schedule_file.provenance.objective.get("metric", "score")),
            title=title,
            marks=marks,
        )
    )
    paths["summary"] = str(out / "result.json")
    relative = {role: run_relative(path, out) for role, path in paths.items()}
    atomic_write_json(out / "result.json", {**summary, "files": relative})
    return paths


def write_job_result(
    out: Path,
    schedule_file: ScheduleFile,
    summary: Mapping[str, Any],
    *,
    solver: Solver,
    values: Sequence[float],
    baselines: Sequence[Baseline],
    title: str,
    marks: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, str]:
    """Write all of a job's result files into ``out`` (module docstring; ``solver`` runs the
    result): :func:`write_best_files` then :func:`write_job_summary`; returns their paths by
    role."""
    files = write_best_files(out, schedule_file, solver=solver)
    return write_job_summary(
        out, schedule_file, summary, files=files, values=values, baselines=baselines,
        title=title, marks=marks,
    )  # fmt: skip
