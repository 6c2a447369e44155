"""The whole OLSS job: record a teacher, fit, score against the built-in solvers, write the files.

:func:`search_olss` (an unconditional :class:`~stepsearch.models.source.SampleSource`) and
:func:`search_olss_pipeline` (a text-to-image pipeline with classifier-free guidance) return an
:class:`OLSSResult` and, with ``out``, write into that directory:

- ``scheduler/``: the :class:`~stepsearch.integrations.olss.StepsearchOLSSScheduler`
  (``save_pretrained``; ``from_pretrained`` reproduces it exactly);
- ``olss_schedule.json``: the fitted schedule as a :class:`~stepsearch.schedule_file.ScheduleFile`
  whose provenance carries the coefficients (the solver config) and names the scheduler file;
- ``report.json`` / ``report.md``: the fit error per step, and the held-out trajectory error (and
  FD where the model has a feature network) of OLSS next to DDIM, DPM-Solver++(2M) and UniPC-bh2,
  each on its best built-in spacing at the same NFE (best on the held-out noise itself, which can
  only favour the baselines), and the converged reference.

The fit only ever sees the search seed's noise; every reported error is on the held-out seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stepsearch._io import atomic_write_dir, atomic_write_json, atomic_write_text
from stepsearch._progress import progress_bar
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective, Score
from stepsearch.eval.trajectory import trajectory_error
from stepsearch.integrations.olss import RolloutFitScheduler, StepsearchOLSSScheduler
from stepsearch.models import DEFAULT_TEACHER, Method, TeacherSpec, load_model, load_source
from stepsearch.models.pipeline import generate_images
from stepsearch.models.source import SampleSource, digest_text, module_digest
from stepsearch.olss.fit import PATH_SEARCHES, REFITS, OLSSFit, RolloutFitter, best_of, fit_olss
from stepsearch.olss.trajectories import record_pipeline_teacher, record_teacher
from stepsearch.schedule import make_schedule
from stepsearch.schedule_file import Provenance, ScheduleFile
from stepsearch.solvers import solver_to_json
from stepsearch.solvers.olss import OLSSCoefficients, OLSSSolver

__all__ = [
    "BASELINES",
    "BASELINE_SPACINGS",
    "OLSSResult",
    "run_olss_job",
    "search_olss",
    "search_olss_pipeline",
]

BASELINES = ("ddim", "dpm_solver_pp_2m", "unipc_bh2")
"""Built-in solvers OLSS is compared with."""

BASELINE_SPACINGS = ("time_uniform", "logsnr_uniform", "karras", "leading", "linspace", "trailing")
"""Built-in spacings each baseline is tried on (its best one is reported)."""

SCHEDULER_DIR = "scheduler"
SCHEDULE_FILE = "olss_schedule.json"


@dataclass
class OLSSResult:
    """What a search produced: the fit, the report (JSON-ready) and the files written."""

    fit: OLSSFit
    report: dict[str, Any]
    provenance: Provenance
    files: dict[str, str] = field(default_factory=dict)
    search_score: Score | None = None
    held_out_score: Score | None = None

    @property
    def solver(self) -> OLSSSolver:
        return OLSSSolver(self.fit.coefficients)


def _indexed_denoiser(
    source: SampleSource, num_samples: int, chunk_size: int
) -> Callable[[Tensor, float], Tensor]:
    """``(x, t) -> denoised`` for the rows of samples ``0 .. num_samples - 1`` in order, evaluated
    in chunks of ``chunk_size``, each by the source's denoiser of its own indices (so a
    conditional source's labels or prompts follow the sample index in every chunk)."""
    chunks = [
        range(start, min(start + chunk_size, num_samples))
        for start in range(0, num_samples, chunk_size)
    ]
    denoisers = [source.denoiser(chunk) for chunk in chunks]

    def denoise(x: Tensor, t: float) -> Tensor:
        if x.shape[0] != num_samples:
            raise ValueError(f"expected the {num_samples} recorded samples, got {x.shape[0]}")
        return torch.cat(
            [d(x[c.start : c.stop], t) for d, c in zip(denoisers, chunks, strict=True)]
        )

    return denoise


def _bar(progress: bool, total: int) -> Any:
    return progress_bar(total=total, desc="OLSS", disable=not progress, leave=False)


def search_olss(
    source: SampleSource,
    nfe: int,
    *,
    num_samples: int = 64,
    held_out_samples: int = 256,
    out: str | Path | None = None,
    search: str = "best",
    refit: str = "rollout",
    basis: str = "eps",
    teacher: TeacherSpec = DEFAULT_TEACHER,
    seed: int = 0,
    held_out_seed: int = 1,
    fd: bool | None = None,
    baselines: Sequence[str] = BASELINES,
    spacings: Sequence[str] = BASELINE_SPACINGS,
    cache: TensorCache | None = None,
    chunk_size: int = 256,
    progress: bool = False,
    objective: Objective | None = None,
    held_out: bool = True,
) -> OLSSResult:
    """Fit an ``nfe``-step OLSS sampler on ``num_samples`` teacher trajectories of ``source``
    (module docstring); ``fd`` (default: when the source has features) adds the held-out FD.
    ``held_out=False`` skips every held-out score (the result's, the baselines', the FD rows):
    the search job runner writes the fit first and scores it after.
    ``objective``: the trajectory-error objective that scores the result (default: one on
    ``num_samples`` / ``held_out_samples`` samples of ``seed`` / ``held_out_seed`` against
    ``teacher``; the OLSS search family passes the job's)."""
    _check_options(search, refit)
    cache = cache if cache is not None else TensorCache.default()
    fd = (source.features is not None and source.reference_data is not None) if fd is None else fd
    bar = _bar(progress, 3 + len(baselines) * len(spacings))
    bar.set_postfix_str("teacher")
    recording = record_teacher(
        source, num_samples, seed=seed, teacher=teacher, cache=cache, chunk_size=chunk_size
    )
    bar.update()
    bar.set_postfix_str("fit")
    fit = fit_olss(
        recording,
        nfe,
        search=search,
        refit=refit,
        basis=basis,
        denoise=_indexed_denoiser(source, num_samples, chunk_size),
        chunk_size=num_samples,  # _indexed_denoiser chunks, each chunk with its conditioning
    )
    bar.update()
    objectives = {
        "traj": objective
        or _objective(
            source,
            "traj",
            num_samples,
            held_out_samples,
            seed,
            held_out_seed,
            teacher,
            cache,
            chunk_size,
        )
    }
    if fd:
        objectives["fd"] = _objective(
            source,
            "fd",
            num_samples,
            held_out_samples,
            seed,
            held_out_seed,
            teacher,
            cache,
            chunk_size,
        )
    solver = OLSSSolver(fit.coefficients)
    bar.set_postfix_str("scoring OLSS")
    search_score = objectives["traj"](fit.schedule, solver)
    source_config = {"prediction_type": source.describe().get("prediction_type", "epsilon")}

    def fit_provenance(held_out_score: Score | None) -> Provenance:
        return objectives["traj"].provenance(
            solver,
            search_score,
            held_out_score,
            "olss",
            {
                "search": search,
                "refit": refit,
                "basis": basis,
                "num_samples": num_samples,
                "teacher": teacher.to_json_dict(),
            },
            extra={
                "fit": fit.describe(),
                "noise": source.noise.to_config(),
                "scheduler": f"{SCHEDULER_DIR}/scheduler_config.json",
            },
        )

    if out is not None:  # the fit at once: the held-out comparison below can take far longer
        _write_fit(Path(out), fit, fit_provenance(None), source_config)
    if not held_out:
        objectives = {"traj": objectives["traj"]}
        baselines = ()
    olss_scores = {
        name: objective.held_out(fit.schedule, solver)
        for name, objective in objectives.items()
        if held_out
    }
    bar.update()
    rows = [_row("OLSS", f"{fit.search} path, {fit.refit} fit", olss_scores)] if held_out else []
    for name in baselines:
        best = None
        for spacing in spacings:
            bar.set_postfix_str(f"{name} / {spacing}")
            schedule = make_schedule(source.noise, nfe, spacing)
            score = objectives["traj"].held_out(schedule, name)
            if best is None or score.value < best[1].value:
                best = (spacing, score, schedule)
            bar.update()
        assert best is not None
        spacing, traj_score, schedule = best
        scores = {"traj": traj_score}
        if "fd" in objectives:
            scores["fd"] = objectives["fd"].held_out(schedule, name)
        rows.append(_row(name, spacing, scores))
    if "fd" in objectives and held_out:
        reference = objectives["fd"]
        spec = teacher
        ref_schedule = make_schedule(source.noise, spec.num_steps, spec.spacing)
        rows.append(
            _row(
                "reference",
                f"{spec.solver}, {spec.num_steps} {spec.spacing} steps",
                {"fd": reference.held_out(ref_schedule, spec.solver)},
            )
        )
    bar.close()
    provenance = fit_provenance(olss_scores.get("traj"))
    report = _report(fit, rows, provenance, source.identity.to_json_dict(), nfe)
    result = OLSSResult(fit, report, provenance, {}, search_score, olss_scores.get("traj"))
    if out is not None:
        result.files = _write(Path(out), result, source_config=source_config)
    return result


def _check_options(search: str, refit: str) -> None:
    """Fail before the (slow) teacher is recorded."""
    if search not in (*PATH_SEARCHES, "best"):
        raise ValueError(f"search must be one of {(*PATH_SEARCHES, 'best')}, got {search!r}")
    if refit not in REFITS:
        raise ValueError(f"refit must be one of {REFITS}, got {refit!r}")


def _objective(
    source: SampleSource,
    metric: str,
    num_samples: int,
    held_out_samples: int,
    seed: int,
    held_out_seed: int,
    teacher: TeacherSpec,
    cache: TensorCache,
    chunk_size: int,
) -> Objective:
    return Objective(
        source,
        metric,
        num_samples=num_samples,
        search_seed=seed,
        held_out_seed=held_out_seed,
        held_out_samples=held_out_samples,
        teacher=teacher,
        cache=cache,
        chunk_size=chunk_size,
        bootstrap=20,
    )


def _row(method: str, spacing: str, scores: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": method,
        "spacing": spacing,
        **{k: v.to_json_dict() for k, v in scores.items()},
    }


def _report(
    fit: OLSSFit,
    rows: list[dict[str, Any]],
    provenance: Provenance,
    model: dict[str, Any],
    nfe: int,
) -> dict[str, Any]:
    return {
        "family": "olss",
        "model": model,
        "nfe": int(nfe),
        "fit": fit.describe(),
        "timesteps": [float(t) for t in fit.schedule.times],
        "held_out": rows,
        "provenance": provenance.to_json_dict(),
    }


def _markdown(report: dict[str, Any]) -> str:
    fit = report["fit"]
    lines = [
        f"# OLSS, NFE {report['nfe']}: {report['model']['name']}",
        "",
        f"Path ({fit['search']} search, {fit['refit']} fit, basis {fit['basis']}): teacher indices "
        f"{fit['path']}; fit {fit['seconds']:.2f} s.",
        "",
        "| step | teacher index | fit error (MSE) |",
        "| ---: | ---: | ---: |",
    ]
    for i, error in enumerate(fit["step_errors"]):
        lines.append(f"| {i} | {fit['path'][i + 1]} | {error:.3e} |")
    if fit["candidates"]:
        lines += [
            "",
            "Path searches compared (teacher-forced path, then the same refit; the lowest endpoint "
            "error is kept):",
            "",
            "| search | path | endpoint error | total error | max error |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for name, candidate in fit["candidates"].items():
            lines.append(
                f"| {name} | {candidate['path']} | {candidate['endpoint_error']:.3e} | "
                f"{candidate['total_error']:.3e} | {candidate['max_error']:.3e} |"
            )
    metrics = [m for m in ("traj", "fd") if any(m in row for row in report["held_out"])]
    lines += [
        "",
        "Held-out noise (never seen by the fit); baselines on their best built-in spacing.",
        "",
        "| method | spacing | " + " | ".join(f"held-out {m}" for m in metrics) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in metrics) + " |",
    ]
    for row in report["held_out"]:
        cells = []
        for m in metrics:
            value = row.get(m, {}).get("value")
            cells.append("" if value is None else f"{value:.4g}")
        lines.append(f"| {row['method']} | {row['spacing']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_fit(
    out: Path, fit: OLSSFit, provenance: Provenance, source_config: dict[str, Any]
) -> None:
    """The fit's scheduler directory and schedule file (``provenance``'s held-out score may still
    be ``None``: they are written as soon as the fit exists, and again with the report)."""
    out.mkdir(parents=True, exist_ok=True)
    scheduler = StepsearchOLSSScheduler.from_fit(
        fit, source_config, provenance=provenance.to_json_dict()
    )
    atomic_write_dir(out / SCHEDULER_DIR, scheduler.save_pretrained)  # the folder at once
    ScheduleFile(fit.schedule, provenance).save(out / SCHEDULE_FILE)


def _write(out: Path, result: OLSSResult, source_config: dict[str, Any]) -> dict[str, str]:
    _write_fit(out, result.fit, result.provenance, source_config)
    atomic_write_json(out / "report.json", result.report)
    atomic_write_text(out / "report.md", _markdown(result.report))
    return {
        "scheduler": str(out / SCHEDULER_DIR),
        "schedule_file": str(out / SCHEDULE_FILE),
        "report_json": str(out / "report.json"),
        "report_md": str(out / "report.md"),
    }


# ------------------------------------------------------------------------------------------------
# text-to-image pipelines
# ------------------------------------------------------------------------------------------------


def search_olss_pipeline(
    model: Any,
    nfe: int,
    *,
    num_samples: int = 16,
    held_out_samples: int = 16,
    out: str | Path | None = None,
    search: str = "best",
    refit: str = "rollout",
    basis: str = "eps",
    teacher: TeacherSpec = DEFAULT_TEACHER,
    seed: int = 0,
    held_out_seed: int = 1,
    baselines: Sequence[str] = ("dpm_solver_pp_2m",),
    spacings: Sequence[str] = BASELINE_SPACINGS,
    cache: TensorCache | None = None,
    chunk_size: int = 16,
    progress: bool = False,
) -> OLSSResult:
    """OLSS for a :class:`~stepsearch.models.pipeline.PipelineModel` (its prompts and
    guidance scale): the teacher is recorded in latent space through a recording scheduler (the
    guided output); the path is searched teacher-forced and refitted by a rollout inside one
    pipeline call over all ``num_samples`` (:class:`~stepsearch.integrations.olss.RolloutFitScheduler`;
    ``refit="teacher"`` keeps the paper's fit); the report compares decoded images with the
    pipeline's many-step reference (the teacher's solver and steps) on held-out noise."""
    _check_options(search, refit)
    cache = cache if cache is not None else TensorCache.default()
    bar = _bar(progress, 3 + len(baselines) * len(spacings))
    bar.set_postfix_str("teacher")
    recording = record_pipeline_teacher(
        model, num_samples, seed=seed, teacher=teacher, cache=cache, chunk_size=chunk_size
    )
    bar.update()
    bar.set_postfix_str("fit")
    names = PATH_SEARCHES if search == "best" else (search,)
    summary = recording.summary(basis)
    fits = [
        fit_olss(recording, nfe, search=name, refit="teacher", basis=basis, summary=summary)
        for name in names
    ]
    if refit == "rollout":
        fits = [_pipeline_rollout(model, recording, fit, seed) for fit in fits]
    fit = best_of(fits) if search == "best" else fits[0]
    bar.update()
    identity = {"name": model.name, "digest": module_digest(model.pipeline.unet)}

    def fit_provenance(olss_score: dict[str, Any] | None) -> Provenance:
        return Provenance(
            model=identity,
            solver=solver_to_json(OLSSSolver(fit.coefficients)),
            nfe=nfe,
            objective={
                "metric": "traj",
                "teacher": teacher.to_json_dict(),
                "prompts": digest_text("\n".join(model.prompts)),
            },
            scores={"held_out": olss_score},
            seeds={"search": seed, "held_out": held_out_seed},
            search={
                "family": "olss",
                "settings": {
                    "search": search,
                    "refit": refit,
                    "basis": basis,
                    "num_samples": num_samples,
                },
            },
            prediction_type=model.scheduler_config.get("prediction_type", "epsilon"),
            guidance_scale=float(model.guidance_scale),
            resolution=model.image_size,
            extra={
                "fit": fit.describe(),
                "noise": model.noise.to_config(),
                "scheduler": f"{SCHEDULER_DIR}/scheduler_config.json",
                "scheduler_config": json.loads(
                    json.dumps(dict(model.scheduler_config), default=list)
                ),
            },
        )

    if out is not None:  # the fit at once: the held-out comparison below can take far longer
        _write_fit(Path(out), fit, fit_provenance(None), dict(model.scheduler_config))
    scheduler = StepsearchOLSSScheduler.from_fit(fit, model.scheduler_config)

    def images(method: Any, schedule: Any) -> Any:
        return model.sample_schedule(
            method, schedule, held_out_samples, held_out_seed, None, chunk_size, progress=False
        )

    teacher_schedule = make_schedule(model.noise, teacher.num_steps, teacher.spacing)
    reference = images(Method.stepsearch(teacher.solver, teacher.spacing), teacher_schedule)

    def held_out(images: Any) -> dict[str, Any]:
        return {
            "traj": {
                "metric": "traj",
                "split": "held_out",
                "value": trajectory_error(images, reference),
                "num_samples": held_out_samples,
                "nfe": nfe,
            }
        }

    olss_images = generate_images(
        model,
        scheduler,
        held_out_samples,
        num_inference_steps=fit.schedule.num_steps,
        seed=held_out_seed,
        chunk_size=chunk_size,
        progress=False,
    )
    rows = [
        {
            "method": "OLSS",
            "spacing": f"{fit.search} path, {fit.refit} fit",
            **held_out(olss_images),
        }
    ]
    bar.update()
    for name in baselines:
        best = None
        for spacing in spacings:
            schedule = make_schedule(model.noise, nfe, spacing)  # one evaluation per step
            found = images(Method.stepsearch(name, spacing), schedule)
            bar.update()
            row = {"method": name, "spacing": spacing, **held_out(found)}
            if best is None or row["traj"]["value"] < best["traj"]["value"]:
                best = row
        if best is not None:
            rows.append(best)
    bar.close()
    provenance = fit_provenance(rows[0]["traj"])
    report = _report(fit, rows, provenance, identity, nfe)
    result = OLSSResult(fit, report, provenance)
    if out is not None:
        result.files = _write(Path(out), result, source_config=dict(model.scheduler_config))
    return result


def _pipeline_rollout(model: Any, recording: Any, fit: OLSSFit, seed: int) -> OLSSFit:
    """Refit ``fit``'s path along the pipeline's own points (one call over all teacher samples)."""
    start = time.perf_counter()
    scheduler = RolloutFitScheduler.from_config(model.scheduler_config, solver="ddim")
    scheduler.fitter = RolloutFitter(
        recording.points(fit.path[1:]), fit.schedule, fit.coefficients.basis
    )
    generate_images(
        model,
        scheduler,
        recording.num_samples,
        sigmas=fit.schedule.to_kdiffusion_sigmas().tolist(),
        seed=seed,
        chunk_size=recording.num_samples,
        progress=False,
    )
    fitter = scheduler.fitter
    if not fitter.done:
        raise RuntimeError("the pipeline did not run every fitted step")
    metadata = {**fit.coefficients.metadata, "refit": "rollout"}
    coefficients = OLSSCoefficients(
        fit.schedule, tuple(fitter.rows), fit.coefficients.basis, metadata
    )
    return OLSSFit(
        fit.path, coefficients, tuple(fitter.errors), fit.search, "rollout", fit.bound,
        fit.seconds + time.perf_counter() - start, fit.step_errors,
    )  # fmt: skip


def run_olss_job(
    out: str | Path,
    nfe: int = 10,
    *,
    model: str | None = "digits",
    pipeline: str | Path | None = None,
    prompts: str | Path | None = None,
    guidance_scale: float | None = None,
    samples: int = 64,
    held_out_samples: int = 1000,
    search: str = "best",
    refit: str = "rollout",
    teacher_steps: int = 100,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = True,
    cache: str | Path | None = None,
) -> OLSSResult:
    """What ``stepsearch search olss`` does: fit on ``model`` (a bundled model or a local UNet
    directory) or, with ``pipeline``, on a local text-to-image pipeline with its ``prompts`` file
    (guidance default :data:`~stepsearch.models.pipeline.DEFAULT_GUIDANCE_SCALE`); the teacher is DPM-Solver++(3M) on ``teacher_steps`` logSNR steps, the
    held-out seed ``seed + 1``; the files go to ``out``; teachers are cached in ``cache``
    (default :meth:`~stepsearch.cache.TensorCache.default`)."""
    teacher = TeacherSpec("dpm_solver_pp_3m", "logsnr_uniform", teacher_steps)
    common = dict(
        num_samples=samples, held_out_samples=held_out_samples, out=out, search=search,
        refit=refit, teacher=teacher, seed=seed, held_out_seed=seed + 1, progress=progress,
        cache=TensorCache(cache) if cache is not None else None,
    )  # fmt: skip
    if pipeline is not None:
        if prompts is None:
            raise ValueError("--pipeline needs --prompts")
        text_model = load_model(
            pipeline=pipeline, prompts=prompts, guidance_scale=guidance_scale, device=device,
            torch_dtype=dtype,
        )  # fmt: skip
        return search_olss_pipeline(text_model, nfe, **common)  # type: ignore[arg-type]
    source = load_source(
        model or "digits", device=device, guidance_scale=guidance_scale, dtype=dtype
    )
    return search_olss(source, nfe, **common)  # type: ignore[arg-type]
