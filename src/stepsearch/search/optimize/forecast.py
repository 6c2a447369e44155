"""The dry run of an optimize run (``stepsearch optimize --dry-run``): per stage, the number of
model sample-evaluations it will spend and a time forecast from one measured calibration batch,
before anything is spent or written.

A *model sample-evaluation* is one sample through one model call
(:mod:`~stepsearch.search.optimize.budget`). The counts come from the settings alone:

- **teachers**: the converged solves of the search, selection and report seeds (each
  ``samples x`` the teacher's evaluations per sample; a cached teacher costs nothing when the run
  comes, so the forecast is an upper bound there);
- **searches**: per stage, the runner's starting spacings (``len(starts) x search_samples x
  NFE``), the family's own work (``planned_evaluations`` of the family: DP's grid teacher and
  candidates, OLSS' teacher and rollout fits, the trials of AutoDiffusion and S³; a family without
  it, such as AYS whose KLUB evaluations depend on its early stopping, is listed as not
  forecast), and the held-out scores of the result and of the best start;
- **judging**: per NFE, every candidate (built-ins and search results) on the selection and report
  seeds, and the report's two sample grids;
- **guidance** (``guidance_schedule="search"``): the guidance search's trials on the search seed,
  the constant curve and its best trials on the selection seed, the constant curve and the pick on
  the report seed, each sample at the constant curve's steps (a guided step is one batched model
  call; an interval schedule's unguided steps make it an upper bound).

The forecast multiplies the counts by the seconds per model sample-evaluation measured on one
batch of ``min(chunk_size, select_samples)`` samples (after a warm-up batch). AutoDiffusion's
count is an upper bound (a candidate it proposes twice is looked up, not evaluated again). Work that is not a model call (DP's
solver coefficient table, S³'s predictor, feature extraction for FD) is not in it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepsearch.guidance import GuidanceSchedule
from stepsearch.models import ImageModel, PipelineModel
from stepsearch.models.source import SampleSource, generate_from_source
from stepsearch.models.trajectories import TeacherSpec
from stepsearch.schedule import make_schedule
from stepsearch.search.family import family
from stepsearch.search.job import spacing_schedules
from stepsearch.search.optimize.budget import StageKey, WorkShare, stage_steps
from stepsearch.search.optimize.candidates import baseline_candidates
from stepsearch.search.optimize.guidance import RunGuidance, resolve_guidance
from stepsearch.search.optimize.run import _setup
from stepsearch.search.optimize.settings import METHODS, OptimizeSettings
from stepsearch.solvers import get_solver

__all__ = ["Forecast", "PlannedStage", "forecast", "plan_stages", "teacher_evaluations"]


@dataclass(frozen=True)
class PlannedStage:
    """One line of the forecast."""

    phase: str
    """``guidance``, ``teacher``, ``search`` or ``judging``."""
    label: str
    nfe: int | None
    evaluations: int | None
    """Model sample-evaluations (``None``: not forecast)."""
    trials: int | None = None
    """An expensive family's trial budget (an upper bound under a time budget)."""


@dataclass(frozen=True)
class Forecast:
    """The planned stages, the measured cost of one model sample-evaluation, and the totals."""

    stages: list[PlannedStage]
    seconds_per_evaluation: float
    budget_minutes: float
    budget_evals: int | None

    @property
    def evaluations(self) -> int:
        return sum(stage.evaluations or 0 for stage in self.stages)

    @property
    def seconds(self) -> float:
        return self.evaluations * self.seconds_per_evaluation

    def seconds_of(self, stage: PlannedStage) -> float | None:
        return (
            None if stage.evaluations is None else stage.evaluations * self.seconds_per_evaluation
        )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "stages": [
                {"phase": s.phase, "label": s.label, "nfe": s.nfe, "trials": s.trials,
                 "evaluations": s.evaluations, "seconds": self.seconds_of(s)}
                for s in self.stages
            ],
            "seconds_per_evaluation": self.seconds_per_evaluation,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "budget_minutes": self.budget_minutes,
            "budget_evals": self.budget_evals,
        }  # fmt: skip


def teacher_evaluations(spec: TeacherSpec, source: SampleSource) -> int:
    """Model evaluations per sample of the converged solve ``spec``."""
    schedule = make_schedule(source.noise, spec.num_steps, spec.spacing)
    return int(get_solver(spec.solver).evaluation_times(schedule).size)


def plan_stages(
    source: SampleSource,
    nfes: Sequence[int],
    methods: Sequence[str],
    settings: OptimizeSettings,
    shares: dict[StageKey, WorkShare] | None,
) -> list[PlannedStage]:
    """Every stage of a run with its model sample-evaluations (module docstring)."""
    per_teacher = teacher_evaluations(TeacherSpec(), source)
    s, sel, rep = settings.search_samples, settings.select_samples, settings.held_out_samples
    stages = [
        PlannedStage("teacher", f"converged solve, seed {seed} ({count} samples)", None,
                     count * per_teacher)
        for seed, count in ((0, s), (1, sel), (2, rep))
    ]  # fmt: skip
    found = {int(nfe): 0 for nfe in nfes}
    shared: set[tuple[str, str]] = set()
    cheap = [m for m in methods if not family(m).expensive]
    expensive = [m for m in methods if family(m).expensive]
    for method in cheap + expensive:
        search_family = family(method)
        for nfe in nfes:
            for solver in settings.solvers(method):
                trials = _trials(settings, shares, (method, int(nfe), solver))
                parts = _family_parts(method, settings, solver, int(nfe), trials)
                steps = stage_steps(method, solver, int(nfe))
                starts = len(spacing_schedules(source.noise, steps))
                total: int | None = None
                if parts is not None:
                    total = (starts * s + 2 * sel) * int(nfe)
                    for part, count in parts.items():
                        if part.startswith("once:"):
                            if (method, part) in shared:
                                continue
                            shared.add((method, part))
                        total += int(count)
                label = search_family.stage_label(solver)
                stages.append(PlannedStage("search", label, int(nfe), total, trials))
                found[int(nfe)] += 1
    # the report's sample grids (winner and best built-in) are made for models with a UNet
    replays = isinstance(source, (ImageModel, PipelineModel))
    grid = settings.grid_rows * settings.grid_cols if replays else 0
    for nfe in nfes:
        count = len(baseline_candidates(source, settings, int(nfe))) + found[int(nfe)]
        evaluations = count * (sel + rep) * int(nfe) + 2 * grid * int(nfe)
        stages.append(
            PlannedStage("judging", f"{count} candidates on seeds 1 and 2", int(nfe), evaluations)
        )
    return stages


def _trials(
    settings: OptimizeSettings, shares: dict[StageKey, WorkShare] | None, key: StageKey
) -> int | None:
    if not family(key[0]).expensive:
        return None
    if shares is not None:
        return shares[key].trials
    return settings.max_trials(key[0])  # a time budget gives at most this many


def _family_parts(
    name: str, settings: OptimizeSettings, solver: str, nfe: int, trials: int | None
) -> dict[str, int] | None:
    planned = getattr(family(name), "planned_evaluations", None)
    if planned is None:
        return None
    return planned(settings.settings_of(name), solver, nfe, settings.search_samples, trials)


def guidance_stage(guidance: RunGuidance, settings: OptimizeSettings) -> PlannedStage:
    """The guidance search's line (module docstring)."""
    assert guidance.settings is not None and guidance.passes is not None
    search = guidance.settings
    constants = len(search.constant_weights)
    samples = (
        search.trials * settings.search_samples
        + (constants + search.select_trials) * settings.select_samples
        + (constants + 1) * settings.held_out_samples
    )
    label = f"guidance search ({guidance.passes} network passes)"
    return PlannedStage("guidance", label, None, samples * (guidance.passes // 2), search.trials)


def calibrate(source: SampleSource, chunk_size: int) -> float:
    """Seconds per model sample-evaluation: one warm-up batch, then one timed batch of
    ``chunk_size`` samples through two steps of DDIM (so two model calls each)."""
    solver = get_solver("ddim")
    schedule = make_schedule(source.noise, 2, "logsnr_uniform")
    count = max(2, int(chunk_size))
    generate_from_source(source, solver, schedule, 2, seed=0, chunk_size=2, decode=False)
    begin = time.perf_counter()
    generate_from_source(source, solver, schedule, count, seed=0, chunk_size=count, decode=False)
    return (time.perf_counter() - begin) / (2 * count)


def forecast(
    model: Any,
    nfes: Sequence[int],
    methods: Sequence[str] = METHODS,
    budget_minutes: float = 30.0,
    *,
    budget_evals: int | None = None,
    pipeline: str | os.PathLike[str] | Any | None = None,
    prompts: Sequence[str] | os.PathLike[str] | str | None = None,
    guidance_scale: float | None = None,
    ays_data: str | os.PathLike[str] | Path | None = None,
    settings: OptimizeSettings | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    guidance_schedule: str | os.PathLike[str] | GuidanceSchedule | None = None,
) -> Forecast:
    """What :func:`~stepsearch.search.optimize.optimize` with the same arguments would spend
    (module docstring): the inputs are checked and the model loaded as there, one calibration
    batch is timed, nothing is written."""
    setup = _setup(
        model, nfes, methods, budget_minutes, budget_evals, pipeline, prompts, guidance_scale,
        ays_data, settings, device, dtype,
    )  # fmt: skip
    source = setup.source
    stages = plan_stages(source, setup.nfes, setup.methods, setup.settings, setup.shares)
    if guidance_schedule is not None:
        guidance = resolve_guidance(source, guidance_schedule, setup.nfes)
        if guidance.schedule is not None:
            source = guidance.apply(source, guidance.schedule)
        else:
            stages.insert(0, guidance_stage(guidance, setup.settings))
    settings = setup.settings  # judging and teachers, most of the work, run in these batches
    per_evaluation = calibrate(source, min(settings.chunk_size, settings.select_samples))
    return Forecast(stages, per_evaluation, float(budget_minutes), budget_evals)
