"""The run: :func:`optimize` checks its inputs, prepares ``out``, runs every requested family's
stages (cheap ones first, then the expensive ones sharing the time left), then judges and
reports."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from stepsearch._io import atomic_write_json, atomic_write_text, run_relative
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.guidance import GuidanceSchedule
from stepsearch.models import PipelineModel, load_model
from stepsearch.models.source import SampleSource
from stepsearch.search.family import FAMILIES, family
from stepsearch.search.guidance import GuidanceSearchSettings
from stepsearch.search.optimize.budget import StageKey, WorkShare, expensive_stages, work_shares
from stepsearch.search.optimize.candidates import Candidate, _baselines
from stepsearch.search.optimize.guidance import (
    file_entry,
    resolve_guidance,
    run_guidance_search,
)
from stepsearch.search.optimize.headline import HeadlineSettings, write_run_headline
from stepsearch.search.optimize.judging import (
    _grid_samples,
    _judge,
    _judges,
    _reference,
    _value,
    _write_winner,
)
from stepsearch.search.optimize.models import _is_conditional, _resolve_model
from stepsearch.search.optimize.report import _markdown, _nfe_entry, _plot
from stepsearch.search.optimize.settings import (
    METHODS,
    REPORT_SEED,
    RUN_FORMAT,
    SELECT_SEED,
    Model,
    OptimizeResult,
    OptimizeSettings,
    _Run,
    pipeline_settings,
)
from stepsearch.search.optimize.stages import _stage
from stepsearch.search.optimize.workers import run_shared, share_work
from stepsearch.solvers import get_solver


def _check_methods(methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in FAMILIES]
    if unknown or not methods:
        raise ValueError(
            f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
            f"{', '.join(FAMILIES)}"
        )


def _check_inputs(
    source: SampleSource, nfes: Sequence[int], methods: Sequence[str], settings: OptimizeSettings
) -> None:
    _check_methods(methods)
    if not nfes:
        raise ValueError("give at least one NFE (--nfe 4 6 8)")
    for nfe in nfes:
        if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 2:
            raise ValueError(f"NFE must be an integer of at least 2, got {nfe!r}")
        for method in methods:
            search_family = family(method)
            if getattr(search_family, "fits_solver", False):
                continue
            for name in settings.solvers(method):
                solver = get_solver(name)
                try:
                    steps = solver.num_steps_for_nfe(int(nfe))
                except ValueError as error:
                    raise ValueError(f"NFE {nfe} is unreachable for {method}: {error}") from None
                search_family.check(solver, steps)
        for name in settings.baseline_solvers:
            get_solver(name).num_steps_for_nfe(int(nfe))


def _fingerprint(
    source: SampleSource,
    nfes: Sequence[int],
    methods: Sequence[str],
    settings: OptimizeSettings,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fingerprint = {
        "model": source.identity.to_json_dict(),
        "noise": source.noise.to_config(),
        "nfes": [int(n) for n in nfes],
        "methods": list(methods),
        "settings": settings.to_json_dict(),
    }
    if _is_conditional(source):  # prompts or labels, guidance, size (the weights are above)
        fingerprint["conditioning"] = source.describe()
    for name, given in (inputs or {}).items():  # e.g. "ays_data": AYS' (prompt, image) pairs
        fingerprint[f"{name}_data"] = family(name).inputs_digest(given)
    return fingerprint


def _prepare_out(out: Path, fingerprint: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Create ``out`` or check it holds this run (module docstring)."""
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    run_file = out / "run.json"
    if out.is_dir() and any(out.iterdir()):
        recorded = json.loads(run_file.read_text()) if run_file.is_file() else None
        same = recorded is not None and recorded.get("fingerprint") == fingerprint
        if overwrite:
            for entry in out.iterdir():
                if entry.name == "run.json" or entry.name.startswith(("nfe-", "report")):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        elif not same and not resume:
            what = "another optimize run's results" if recorded else "files of something else"
            raise ValueError(
                f"--out {out} holds {what}; pass --resume to continue there (finished stages whose "
                "settings match are kept) or --overwrite to start over, or choose another folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, {"format": RUN_FORMAT, "fingerprint": fingerprint})


@dataclass
class _Setup:
    """A run's checked inputs (:func:`_setup`)."""

    source: SampleSource
    nfes: list[int]
    methods: list[str]
    settings: OptimizeSettings
    skipped: list[dict[str, str]]
    shares: dict[StageKey, WorkShare] | None


def _setup(
    model: str | Path | Model | SampleSource | None,
    nfes: Sequence[int],
    methods: Sequence[str],
    budget_minutes: float,
    budget_evals: int | None,
    pipeline: str | os.PathLike[str] | Any | None,
    prompts: Sequence[str] | os.PathLike[str] | str | None,
    guidance_scale: float | None,
    ays_data: str | os.PathLike[str] | None,
    settings: OptimizeSettings | None,
    device: str,
    dtype: str | None = None,
) -> _Setup:
    """Check the inputs of :func:`optimize` and load its model (nothing is written); ``ValueError``
    for bad input."""
    methods = list(dict.fromkeys(methods))
    nfes = sorted({int(n) for n in nfes}) if all(isinstance(n, int) for n in nfes) else list(nfes)
    if budget_minutes is None or not budget_minutes > 0:
        raise ValueError(f"--budget-minutes must be positive, got {budget_minutes!r}")
    _check_methods(methods)
    if ays_data is not None and pipeline is None and not isinstance(model, PipelineModel):
        raise ValueError(
            "--data goes with --pipeline (ays_data: AYS on the bundled model uses its data)"
        )
    if pipeline is not None:
        if model is not None:
            raise ValueError("give a model (--model) or a pipeline (--pipeline), not both")
        model = load_model(
            pipeline=pipeline, prompts=prompts, guidance_scale=guidance_scale, device=device,
            torch_dtype=dtype,
        )  # fmt: skip
        guidance_scale = dtype = None  # the pipeline's, in its model
    elif prompts is not None:
        raise ValueError("--prompts goes with --pipeline DIR")
    if model is None:
        raise ValueError("give a model (--model digits|DIR) or a pipeline (--pipeline DIR)")
    source = _resolve_model(model, device, guidance_scale, dtype)
    pipeline_run = isinstance(source, PipelineModel)
    settings = settings or (pipeline_settings() if pipeline_run else OptimizeSettings())
    skipped: list[dict[str, str]] = []
    for method in list(methods):
        reason = family(method).applicable(source, ays_data)
        if reason is not None:
            methods.remove(method)
            skipped.append({"method": method, "reason": reason})
            if not methods:
                raise ValueError(reason.replace("skipped", "cannot run"))
    _check_inputs(source, nfes, methods, settings)
    shares = (
        None
        if budget_evals is None
        else work_shares(source.noise, settings, methods, nfes, budget_evals)
    )
    return _Setup(source, list(nfes), methods, settings, skipped, shares)


def optimize(
    model: str | Path | Model | SampleSource | None,
    nfes: Sequence[int],
    methods: Sequence[str] = METHODS,
    budget_minutes: float = 30.0,
    out: str | Path = "stepsearch-optimize",
    *,
    budget_evals: int | None = None,
    storage: str | os.PathLike[str] | None = None,
    worker_name: str | None = None,
    pipeline: str | os.PathLike[str] | Any | None = None,
    prompts: Sequence[str] | os.PathLike[str] | str | None = None,
    guidance_scale: float | None = None,
    ays_data: str | os.PathLike[str] | None = None,
    guidance_schedule: str | os.PathLike[str] | GuidanceSchedule | None = None,
    guidance_settings: GuidanceSearchSettings | None = None,
    resume: bool = False,
    overwrite: bool = False,
    settings: OptimizeSettings | None = None,
    cache: TensorCache | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = True,
) -> OptimizeResult:
    """Run the searches ``methods`` at every NFE of ``nfes`` on ``model`` (``"digits"``, a local
    diffusers ``UNet2DModel`` directory, an :class:`ImageModel`, a
    :class:`~stepsearch.models.pipeline.PipelineModel` or any sample source) within
    ``budget_minutes`` of search time, select and report on unseen noise, write everything under
    ``out`` (module docstring).

    ``budget_evals``: a work budget in model sample-evaluations for the trial-budgeted families
    (AutoDiffusion, S³), split evenly over their stages
    (:func:`~stepsearch.search.optimize.budget.work_shares`): every family then runs at every NFE
    and the result is the same on any machine, ``budget_minutes`` only bounds the run (a stage is
    not started once it is spent; the report says by how much the run overran it). Without it,
    those families share the time the cheap searches leave, so their trial counts depend on the
    machine's speed.

    ``storage``: a study store (SQLite file or database URL) shared by several workers started
    with the same arguments (each with its own ``out``, or the same): every stage, the reference
    and each NFE's judging run once across them, a dead worker's task is run again, and every
    worker writes the same report (:mod:`~stepsearch.search.optimize.workers`; use a work
    budget). ``worker_name`` labels this worker's tasks.

    A text-to-image pipeline is ``model=None, pipeline=DIR, prompts=[...] or FILE,
    guidance_scale=G`` (:func:`~stepsearch.models.loading.load_model`); its default settings are
    :func:`pipeline_settings`. ``ays_data``: (prompt, image) pairs for Align Your Steps on a
    pipeline (without them AYS is skipped there, and the report says so). ``dtype``: what a
    model loaded here runs in (``float32``, ``float16``, ``bfloat16``; samples stay float32).

    ``guidance_schedule``: ``"search"`` (a class-conditional model with a classifier: a guidance
    schedule searched first, in ``out/guidance/``, and used by every sampler of the run), a
    guidance file or a :class:`~stepsearch.guidance.GuidanceSchedule`
    (:mod:`~stepsearch.search.optimize.guidance`); the report's ``guidance`` says what it bought.
    ``guidance_settings``: what that search explores (default
    :class:`~stepsearch.search.guidance.GuidanceSearchSettings`).

    Raises:
        ValueError: bad input (module docstring), found before anything is written.
    """
    began = time.perf_counter()
    setup = _setup(
        model, nfes, methods, budget_minutes, budget_evals, pipeline, prompts, guidance_scale,
        ays_data, settings, device, dtype,
    )  # fmt: skip
    source, nfes, methods, settings = setup.source, setup.nfes, setup.methods, setup.settings
    skipped, shares = setup.skipped, setup.shares
    if storage is not None and shares is None:
        raise ValueError(
            "--storage (many workers) needs --budget-evals: a time budget sizes the searches "
            "from each worker's own clock, so the workers would not agree"
        )
    guidance = None
    guidance_entry: dict[str, Any] | None = None
    if guidance_schedule is not None:
        guidance = resolve_guidance(source, guidance_schedule, nfes, guidance_settings)
        if guidance.schedule is not None:  # a file: the run samples with it from the start
            source = guidance.apply(source, guidance.schedule)
            guidance_entry = file_entry(guidance)
    inputs = {
        method: family(method).prepare_inputs(source, ays_data, progress)
        for method in methods
        if ays_data is not None and hasattr(family(method), "prepare_inputs")
    }
    out_path = Path(out).expanduser()
    fingerprint = _fingerprint(source, nfes, methods, settings, inputs)
    if budget_evals is not None:
        fingerprint["budget_evals"] = int(budget_evals)
    if guidance is not None:
        fingerprint["guidance_schedule"] = guidance.fingerprint
    _prepare_out(out_path, fingerprint, resume, overwrite)
    if guidance is not None and guidance.origin == "search":
        counts = {
            "num_samples": settings.search_samples,
            "select_samples": settings.select_samples,
            "held_out_samples": settings.held_out_samples,
        }
        seeds = {"search": 0, "select": SELECT_SEED, "held_out": REPORT_SEED}

        def shared(key: str, work: Any) -> None:
            run_shared(str(storage), fingerprint, worker_name, out_path, key, work)

        schedule, guidance_entry = run_guidance_search(
            source, guidance, out_path, counts, seeds, progress,
            shared=None if storage is None else shared,
        )  # fmt: skip
        source = guidance.apply(source, schedule)
    cache = cache if cache is not None else TensorCache.default()
    search = Objective(
        source,
        "traj",
        num_samples=settings.search_samples,
        search_seed=0,
        held_out_seed=SELECT_SEED,
        held_out_samples=settings.select_samples,
        cache=cache,
        chunk_size=settings.chunk_size,
        progress=progress,
    )
    run = _Run(
        source, settings, out_path, cache, progress,
        began + 60.0 * float(budget_minutes), search, budget_evals, inputs=inputs,
        guidance=guidance_entry,
    )  # fmt: skip
    for item in skipped:
        run.say(f"[yellow]{item['reason']}[/]")
    if storage is not None:
        share_work(run, nfes, methods, shares, str(storage), fingerprint, worker_name)
    found: dict[int, list[Candidate]] = {nfe: [] for nfe in nfes}
    for method in [m for m in methods if not family(m).expensive]:
        for nfe in nfes:
            for name in settings.solvers(method):
                candidate = _stage(run, method, name, nfe)
                if candidate is not None:
                    found[nfe].append(candidate)
    # the expensive families last: their work budget's trials, else sharing the time left
    pending = expensive_stages(settings, methods, nfes)
    for position, (method, nfe, name) in enumerate(pending):
        earlier = tuple(found[nfe])
        if shares is not None:
            trials = shares[(method, nfe, name)].trials
            candidate = _stage(run, method, name, nfe, trials=trials, earlier=earlier)
        else:
            seconds = run.seconds_left() / (len(pending) - position)
            candidate = _stage(run, method, name, nfe, seconds=seconds, earlier=earlier)
        if candidate is not None:
            found[nfe].append(candidate)
    run.timing["searches"] = time.perf_counter() - began
    return _judge_and_report(run, nfes, methods, found, began, skipped, budget_minutes)


def _judge_and_report(
    run: _Run,
    nfes: Sequence[int],
    methods: Sequence[str],
    found: dict[int, list[Candidate]],
    began: float,
    skipped: Sequence[dict[str, str]] = (),
    budget_minutes: float | None = None,
) -> OptimizeResult:
    judging_began = time.perf_counter()
    judges = _judges(run)
    selection = next(iter(judges))
    reference = _reference(run, judges)
    per_nfe: dict[int, dict[str, Any]] = {}
    scheduler_dirs: dict[int, str] = {}
    grids: dict[int, dict[str, Tensor]] = {}
    winners: dict[int, Candidate] = {}
    for nfe in nfes:
        baselines = _baselines(run, nfe)
        candidates = baselines + found[nfe]
        scores = _judge(run, nfe, candidates, judges)

        def chosen(pool: list[Candidate], scores: dict = scores) -> Candidate:
            return min(pool, key=lambda c: _value(scores[c.label]["select"][selection]))

        winner = winners[nfe] = chosen(candidates)
        best_baseline = chosen(baselines)
        folder = run.out / f"nfe-{nfe}"
        files, steps = _write_winner(run, winner, scores[winner.label], folder, selection)
        if "scheduler" in files:
            scheduler_dirs[nfe] = files["scheduler"]
        grid = _grid_samples(run, winner, best_baseline, folder, files)
        if grid is not None:
            grids[nfe] = grid
        per_nfe[nfe] = _nfe_entry(
            nfe, candidates, scores, winner, best_baseline, selection, files, steps, reference
        )
    report = {
        "model": run.source.identity.to_json_dict(),
        "methods": list(methods),
        "nfes": [int(n) for n in nfes],
        "selection": {"metric": selection, "seed": SELECT_SEED,
                      "samples": run.settings.select_samples},
        "report": {"seed": REPORT_SEED, "samples": run.settings.held_out_samples,
                   "metrics": list(judges)},
        "search": {"metric": "traj", "seed": 0, "samples": run.settings.search_samples},
        "conditioning": run.source.describe() if _is_conditional(run.source) else None,
        "guidance": run.guidance,
        "reference": {k: v for k, v in reference.items() if k != "key"},
        "partial": bool(run.incomplete),
        "incomplete": run.incomplete,
        "skipped": list(skipped),
        "per_nfe": {str(n): entry for n, entry in per_nfe.items()},
        "seconds": round(time.perf_counter() - began, 1),
        "budget": _budget_entry(run, budget_minutes, time.perf_counter() - judging_began),
        "settings": run.settings.to_json_dict(),
    }  # fmt: skip
    on_disk = _run_relative(report, run.out)  # the files it names, relative to the run folder
    files = {
        "json": str(atomic_write_json(run.out / "report.json", on_disk)),
        "markdown": str(atomic_write_text(run.out / "report.md", _markdown(on_disk))),
        "png": str(_plot(run, report, grids, winners)),
    }
    if run.settings.headline_samples and run.model is not None:
        headline = HeadlineSettings(
            run.settings.headline_samples, chunk_size=run.settings.chunk_size
        )
        write_run_headline(run.out, run.model, headline, cache=run.cache, progress=run.progress)
        report["headline"] = json.loads((run.out / "report.json").read_text())["headline"]
        files["headline"] = str(run.out / "headline.json")
    return OptimizeResult(report, files, scheduler_dirs, bool(run.incomplete))


def _budget_entry(run: _Run, budget_minutes: float | None, judging: float) -> dict[str, Any]:
    """The report's ``budget``: the work budget and the trials of the expensive stages
    (machine-independent), the time bound, and under ``seconds`` the time each phase took, by how
    much the run overran the bound (``overran``) and why: the bound stops new search stages; a
    stage started within it runs to its end, and the judging and report that follow always run."""
    searches = float(run.timing.get("searches", 0.0))
    total = searches + judging
    minutes = None if budget_minutes is None else float(budget_minutes)
    seconds: dict[str, Any] = {
        "searches": round(searches, 1),
        "judging": round(judging, 1),
        "total": round(total, 1),
        "overran": None,
        "why": None,
    }
    if minutes is not None and total > 60.0 * minutes:
        seconds["overran"] = round(total - 60.0 * minutes, 1)
        seconds["why"] = (
            f"the searches took {searches:.0f} s; judging every candidate on the selection and "
            f"report seeds and writing the winners took {judging:.0f} s after them"
            if searches <= 60.0 * minutes
            else f"the search stages took {searches:.0f} s (a stage started within the bound "
            f"runs to its end), then judging {judging:.0f} s"
        )
    return {"evals": run.budget_evals, "stages": run.trials, "minutes": minutes, "seconds": seconds}


def _run_relative(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """``report`` with every NFE's result files named relative to the run folder ``out``."""
    per_nfe = {}
    for n, entry in report["per_nfe"].items():
        files = entry.get("files")
        if isinstance(files, dict):
            entry = {**entry, "files": {role: run_relative(p, out) for role, p in files.items()}}
        per_nfe[n] = entry
    return {**report, "per_nfe": per_nfe}
