"""Search families: one protocol, one registry, one job runner.

A *search family* (DP, AutoDiffusion, Align Your Steps, OLSS, ...) is one object implementing
:class:`SearchFamily`: a name and a label, a settings dataclass (with ``to_json_dict``), the
solvers it searches for by default, :meth:`~SearchFamily.applicable` (a reason to skip a source, or
``None``), :meth:`~SearchFamily.check` (refuse a solver / step count before any work) and
:meth:`~SearchFamily.search`, which gets a :class:`JobContext` and returns a :class:`Found`: a
:class:`~stepsearch.schedule.StepSchedule` *or* a :class:`~stepsearch.plan.SolverPlan`, the solver
that runs it, its search-seed score and what the family wants in the provenance and ``result.json``.

A family either evaluates its candidates through the shared
:class:`~stepsearch.eval.objective.Objective` as trials of the study store (``job.evaluate``: every
true evaluation a trial, lookups on a rerun, several workers on one storage), or is a *direct*
method (``uses_store = False``: AYS, the OLSS fit) that keeps its own checkpoint in ``job.out``.

:func:`run_search` is the one job runner; it owns, for every family:

1. the study store (``out/study.sqlite3`` or ``storage``), opened before any expensive work;
2. the starting points: the built-in spacings at the family's step count, scored on the search
   seed as trials (``job.baselines``; ``job.starts`` are the schedules);
3. the provenance (:class:`~stepsearch.schedule_file.Provenance`);
4. the result itself, written as soon as it exists: ``best_schedule.json`` and ``scheduler/``
   (:func:`~stepsearch.search.job.write_best_files`; held-out score ``null`` until step 5);
5. the held-out scores of the result and of the best starting point (the result's files are
   rewritten with its score), then ``result.json`` and ``progress.png``
   (:func:`~stepsearch.search.job.write_job_summary`).

The registry :data:`FAMILIES` maps names to families; :func:`register` adds one. A new family is a
module implementing the protocol plus one ``register(MyFamily())`` line; ``stepsearch optimize``
runs every registered family it is asked for (docs/search-families.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from stepsearch._io import run_relative
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective, Score
from stepsearch.models import load_model
from stepsearch.schedule import StepSchedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.job import (
    Baseline,
    SearchProgress,
    output_dir,
    resolve_storage,
    sortable,
    spacing_schedules,
    write_best_files,
    write_job_summary,
)
from stepsearch.search.store import StudyStore
from stepsearch.solvers import get_solver, solver_to_json
from stepsearch.solvers.base import Solver

__all__ = [
    "FAMILIES",
    "Found",
    "JobContext",
    "SearchFamily",
    "SearchJob",
    "family",
    "register",
    "run_job",
    "run_search",
]


# solver JSON (to be replaced by stepsearch.solvers' codec at merge) ------------------------------
# the protocol ------------------------------------------------------------------------------------
@dataclass
class JobContext:
    """What :meth:`SearchFamily.search` gets from :func:`run_search`."""

    objective: Objective
    solver: Solver
    nfe: int
    num_steps: int
    out: Path
    settings: Any
    store: StudyStore
    starts: dict[str, StepSchedule]
    """The built-in spacings at ``num_steps`` (the starting points), by name."""
    baselines: tuple[Baseline, ...]
    """``starts`` with their search-seed scores."""
    bar: SearchProgress
    progress: bool = True
    seed: int = 0
    budget: int | None = None
    """A trial budget (families that take one: AutoDiffusion)."""
    inputs: Any = None
    """Family-specific inputs (Align Your Steps' data on a pipeline)."""
    values: list[float] = field(default_factory=list)
    """Search-seed values of every trial scored through :meth:`evaluate` (the progress plot)."""

    def evaluate(
        self,
        candidates: Sequence[Any],
        attrs: Sequence[Mapping[str, Any]] | None = None,
        *,
        on_score: Callable[[int, Score], None] | None = None,
    ) -> list[Score]:
        """Search-seed scores of ``candidates`` (schedules or plans) as trials of the study store
        (a finished trial is looked up)."""

        def record(index: int, score: Score) -> None:
            self.values.append(score.value)
            self.bar.update(len(self.values), score.value)
            if on_score is not None:
                on_score(index, score)

        return self.store.evaluate_many(
            list(candidates),
            lambda candidate: self.objective(candidate, self.solver),
            solver=self.solver,
            attrs=attrs,
            on_score=record,
        )


@dataclass
class Found:
    """What a family's search returns (the runner writes the files)."""

    result: Any
    """A :class:`~stepsearch.schedule.StepSchedule` or a :class:`~stepsearch.plan.SolverPlan`."""
    score: Score
    """Its score on the search seed."""
    settings: dict[str, Any]
    """The provenance's ``search.settings``."""
    solver: Solver | None = None
    """The solver that runs ``result`` (default: the job's; OLSS: the fitted one)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Fields of ``result.json`` (``best`` is merged into its ``best``)."""
    values: list[float] | None = None
    """Trial values for ``progress.png`` (default: those scored through ``job.evaluate``)."""
    marks: dict[str, list[int]] = field(default_factory=dict)
    """Trials to mark in ``progress.png``, by label: positions in ``values`` (S³: the
    predictor's picks; the plot adds the best-so-far curve without them)."""
    held_out: Score | None = None
    """The held-out score when the family computed it already (else the runner does)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More provenance ``extra``."""
    seconds: dict[str, float] = field(default_factory=dict)
    details: Any = None
    """The family's own result object (candidates, history, checkpoint states)."""

    @property
    def schedule(self) -> StepSchedule:
        return getattr(self.result, "schedule", self.result)


@runtime_checkable
class SearchFamily(Protocol):
    """A search family (module docstring)."""

    name: str
    """Registry key, study / folder prefix, provenance ``search.family``."""
    label: str
    """Human name (progress bars, plot titles)."""
    settings_type: type
    """Its settings dataclass (has ``to_json_dict``)."""
    default_solvers: tuple[str, ...]
    """Solvers it searches for when none are given; ``()`` when it fits its own (OLSS)."""
    uses_store: bool
    """Its candidates are trials of the study store (else: a direct method with a checkpoint)."""
    expensive: bool
    """Scheduled last by ``optimize``, sharing the time left; it takes a trial budget."""

    def applicable(self, source: Any, inputs: Any = None) -> str | None:
        """Why ``source`` (with ``inputs``) cannot be searched by this family, or ``None``."""
        ...

    def check(self, solver: Solver, num_steps: int) -> None:
        """Raise ``ValueError`` for a solver / step count the family cannot search."""
        ...

    def search(self, job: JobContext) -> Found:
        """The search itself."""
        ...

    def stage_label(self, solver: str) -> str:
        """How ``optimize`` names this family's result for ``solver``."""
        ...

    def optimize_settings(self, options: Any) -> Any:
        """Its settings in an ``optimize`` run (``options``: an ``OptimizeSettings``)."""
        ...

    def optimize_solvers(self, options: Any) -> tuple[str, ...]:
        """The solvers it searches for in an ``optimize`` run."""
        ...


FAMILIES: dict[str, SearchFamily] = {}
"""Registered search families by name, in registration order (cheap ones first)."""


def register(search_family: SearchFamily) -> SearchFamily:
    """Add ``search_family`` to :data:`FAMILIES` (a later one of the same name replaces it)."""
    if not isinstance(search_family, SearchFamily):
        raise TypeError(f"{search_family!r} does not implement SearchFamily")
    FAMILIES[search_family.name] = search_family
    return search_family


def family(name: str) -> SearchFamily:
    """The registered family ``name`` (``ValueError`` naming the known ones)."""
    import stepsearch.search.families  # noqa: F401 - registers the built-in families

    if name not in FAMILIES:
        raise ValueError(f"unknown search family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


class FamilyBase:
    """Defaults for the protocol's optional parts (subclass and override)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    settings_type: ClassVar[type] = object
    default_solvers: ClassVar[tuple[str, ...]] = ()
    uses_store: ClassVar[bool] = True
    expensive: ClassVar[bool] = False
    fits_solver: ClassVar[bool] = False
    """The family fits its own solver (OLSS): the solver argument only names it."""

    def applicable(self, source: Any, inputs: Any = None) -> str | None:
        return None

    def check(self, solver: Solver, num_steps: int) -> None:
        return None

    def stage_label(self, solver: str) -> str:
        return self.name if self.fits_solver else f"{self.name} {solver}"

    def optimize_settings(self, options: Any) -> Any:
        """``options.families[name]``, else the field ``options.<name>``, else the defaults."""
        found = dict(getattr(options, "families", {}) or {}).get(self.name)
        if found is None:
            found = getattr(options, self.name, None)
        return found if found is not None else self.settings_type()

    def optimize_solvers(self, options: Any) -> tuple[str, ...]:
        """``options.family_solvers[name]``, else ``options.<name>_solvers``, else the defaults."""
        found = dict(getattr(options, "family_solvers", {}) or {}).get(self.name)
        if found is None:
            found = getattr(options, f"{self.name}_solvers", None)
        return tuple(found if found is not None else self.default_solvers)

    def planned_evaluations(
        self, settings: Any, solver: str, nfe: int, search_samples: int, trials: int | None
    ) -> dict[str, int] | None:
        """The model sample-evaluations (one sample through one model call) of the family's own
        work at ``nfe`` besides the runner's starting points and held-out scores, by part; a
        part named ``once:...`` (a cached teacher) is spent once per run. ``None``: not
        known before the search runs. Default: ``trials`` trials of ``search_samples x nfe``."""
        return None if trials is None else {"trials": int(trials) * search_samples * int(nfe)}

    def search(self, job: JobContext) -> Found:  # pragma: no cover - abstract
        raise NotImplementedError


# the runner --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchJob:
    """What :func:`run_search` found, scored and wrote."""

    family: str
    found: Found
    schedule_file: ScheduleFile
    held_out: Score
    baselines: tuple[Baseline, ...]
    start: Baseline | None
    """The best starting point on the search seed (``None`` without any)."""
    held_out_values: dict[str, float]
    files: dict[str, str]
    seconds: dict[str, float]
    trials: int


def run_search(
    search_family: SearchFamily | str,
    objective: Objective,
    solver: str | Solver,
    nfe: int,
    out: str | Path,
    *,
    settings: Any = None,
    storage: str | None = None,
    study_name: str | None = None,
    progress: bool = True,
    worker_name: str | None = None,
    seed: int = 0,
    budget: int | None = None,
    inputs: Any = None,
    spacings: Sequence[str] | None = None,
) -> SearchJob:
    """Run ``search_family`` for ``solver`` at ``nfe`` model evaluations on ``objective`` and
    write its files under ``out`` (module docstring). Rerun to resume: scored trials are looked
    up in the store, direct families resume their checkpoint in ``out``."""
    began = time.perf_counter()
    fam = family(search_family) if isinstance(search_family, str) else search_family
    settings = settings if settings is not None else fam.settings_type()
    make_solver = getattr(fam, "make_solver", get_solver)
    run_solver = make_solver(solver) if isinstance(solver, str) else solver
    noise = objective.source.noise
    num_steps = run_solver.num_steps_for_nfe(nfe)
    fam.check(run_solver, num_steps)  # refuse before any work
    reason = fam.applicable(objective.source, inputs)
    if reason is not None:
        raise ValueError(reason)
    out_path = output_dir(out)
    starts = spacing_schedules(noise, num_steps, *(() if spacings is None else (spacings,)))
    metadata = {
        "family": fam.name,
        "model": objective.source.identity.to_json_dict(),
        "solver": solver_to_json(run_solver),
        "nfe": int(nfe),
        # what the search sees (the held-out sample count only changes the report)
        "objective": {k: v for k, v in objective.describe().items() if k != "held_out_samples"},
        "settings": settings.to_json_dict(),
    }
    name = study_name or f"{fam.name}-{objective.source.identity.name}-{run_solver.name}-nfe{nfe}"
    bar = SearchProgress(
        len(starts) + (budget or 0), f"{fam.label} {run_solver.name} NFE {nfe}", enabled=progress
    )
    seconds: dict[str, float] = {}
    with (
        StudyStore.open(
            resolve_storage(storage, out_path), name, metadata=metadata, worker_name=worker_name
        ) as store,
        bar.running(),
    ):
        job = JobContext(
            objective, run_solver, int(nfe), num_steps, out_path, settings, store, starts, (),
            bar, progress, int(seed), budget, inputs,
        )  # fmt: skip
        begin = time.perf_counter()
        scored = job.evaluate(
            list(starts.values()), [{"origin": "baseline", "spacing": s} for s in starts]
        )
        job.baselines = tuple(
            Baseline(spacing, schedule, score.value)
            for (spacing, schedule), score in zip(starts.items(), scored, strict=True)
        )
        seconds["starts"] = time.perf_counter() - begin
        begin = time.perf_counter()
        found = fam.search(job)
        seconds["search"] = time.perf_counter() - begin
        store_url, trials = store.url, store.count()
    seconds.update(found.seconds)
    result_solver = found.solver or run_solver
    study = {
        "storage": run_relative(_redacted(store_url), out_path),
        "name": name,
        "trials": trials,
    }

    def result_file(held_out: Score | None) -> ScheduleFile:
        provenance = objective.provenance(
            result_solver, found.score, held_out, fam.name, found.settings,
            extra={**found.extra, "study": study},
        )  # fmt: skip
        return ScheduleFile(found.result, provenance)

    # the result first (a long held-out comparison must not keep it from the user), then scores
    files = write_best_files(out_path, result_file(found.held_out), solver=result_solver)
    begin = time.perf_counter()
    baselines = job.baselines
    start = min(baselines, key=lambda b: sortable(b.value)) if baselines else None
    held_out = found.held_out or objective.held_out(found.result, result_solver)
    held_out_values = {"search_result": held_out.value}
    if start is not None:
        held_out_values[f"start ({start.name})"] = objective.held_out(
            start.schedule, run_solver
        ).value
    seconds["held_out"] = time.perf_counter() - begin
    schedule_file = result_file(held_out)
    if found.held_out is None:  # now with its held-out score
        files = write_best_files(out_path, schedule_file, solver=result_solver)
    values = found.values if found.values is not None else job.values
    seconds["total"] = time.perf_counter() - began
    summary = {
        "family": fam.name,
        "solver": result_solver.name,
        "nfe": int(nfe),
        "metric": objective.metric,
        "trials_in_study": trials,
        **{k: v for k, v in found.summary.items() if k != "best"},
        "best": {
            **dict(found.summary.get("best", {})),
            "times": found.schedule.times.tolist(),
            "search": found.score.value,
            "held_out": held_out.value,
        },
        "start": None
        if start is None
        else {
            "spacing": start.name,
            "search": start.value,
            "held_out": held_out_values[f"start ({start.name})"],
        },
        "baselines": {b.name: b.value for b in baselines},
        "held_out": held_out_values,
        "values": list(values),
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
    }
    files = write_job_summary(
        out_path,
        schedule_file,
        summary,
        files=files,
        values=values,
        baselines=baselines,
        marks=found.marks,
        title=f"{fam.label}: {objective.source.identity.name}, {result_solver.name}, NFE {nfe}",
    )
    return SearchJob(
        fam.name, found, schedule_file, held_out, baselines, start, held_out_values, files,
        seconds, trials,
    )  # fmt: skip


def _redacted(url: str) -> str:
    """A database URL without its password (provenance is shared)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"


def run_job(
    search_family: SearchFamily | str,
    model: str | None,
    solver: str,
    nfe: int,
    out: str | Path,
    *,
    pipeline: str | Path | None = None,
    prompts: Sequence[str] | str | Path | None = None,
    metric: str = "fd",
    num_samples: int = 256,
    held_out_samples: int = 1000,
    cache: str | Path | None = None,
    device: str = "cpu",
    guidance_scale: float | None = None,
    dtype: str | None = None,
    progress: bool = True,
    seed: int = 0,
    **options: Any,
) -> SearchJob:
    """What ``stepsearch search <family>`` does: refuse an unsupported solver before the model
    loads, load ``model`` (a bundled model or a local UNet directory; or a text-to-image
    ``pipeline`` directory with ``prompts``, see :func:`~stepsearch.models.load_model`; its
    network in ``dtype``, default float32), build the objective
    (``metric`` on ``num_samples`` samples of noise seed ``seed`` / ``held_out_samples`` of
    ``seed + 1``, tensor cache ``cache``) and :func:`run_search` (``seed`` also seeds the
    search's own draws; ``options``: its other keyword arguments)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says enough
    fam = family(search_family) if isinstance(search_family, str) else search_family
    run_solver = getattr(fam, "make_solver", get_solver)(solver)
    try:
        steps = run_solver.num_steps_for_nfe(nfe)
    except ValueError:
        steps = int(nfe)  # run_search says which NFE are reachable
    fam.check(run_solver, steps)
    source = load_model(
        model, pipeline=pipeline, prompts=prompts, device=device, guidance_scale=guidance_scale,
        torch_dtype=dtype,
    )  # fmt: skip
    objective = Objective(
        source,
        metric,
        num_samples=num_samples,
        held_out_samples=held_out_samples,
        search_seed=int(seed),
        held_out_seed=int(seed) + 1,
        cache=TensorCache(cache) if cache is not None else None,
        progress=progress,
    )
    return run_search(fam, objective, run_solver, nfe, out, progress=progress, seed=seed, **options)
