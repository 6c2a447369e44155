"""``stepsearch search dp``: GITS / OSS-style DP schedules (argument parsing only).

The work is :func:`stepsearch.search.family.run_job` with the DP family
(:mod:`stepsearch.search.families.dp`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, print_loading_code, usage_errors
from stepsearch.cli.search import (
    DEFAULT_HELD_OUT_SAMPLES,
    DEFAULT_NFE,
    DEFAULT_NUM_SAMPLES,
    model_or_default,
    objective_metric,
    search_command,
)
from stepsearch.search.families.dp import DEFAULT_COEFFS, DPSettings


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@search_command("dp")
def dp_command(
    model: options.OptionalModel = None,
    pipeline: options.Pipeline = None,
    prompts: options.Prompts = None,
    guidance_scale: options.GuidanceScale = None,
    solver: options.Solver = "unipc_bh2",  # the best DP solver on digits at NFE 4-10
    nfe: options.NFE = DEFAULT_NFE,
    out: options.OutDir = Path("stepsearch-dp"),
    storage: options.Storage = None,
    study_name: options.StudyName = None,
    worker_name: options.WorkerName = None,
    metric: options.OptionalMetric = None,
    num_samples: options.NumSamples = DEFAULT_NUM_SAMPLES,
    held_out_samples: options.HeldOutSamples = DEFAULT_HELD_OUT_SAMPLES,
    seed: options.Seed = 0,
    grid_points: Annotated[int, typer.Option(metavar="N", help="Points of the DP grid.")] = 100,
    grid_spacing: Annotated[
        str, typer.Option(metavar="NAME", help="Spacing of the DP grid.")
    ] = "logsnr_uniform",
    teacher_samples: options.TeacherSamples = 256,
    coeffs: Annotated[
        str, typer.Option(metavar="C,...", help="GITS cost coefficients, comma-separated.")
    ] = ",".join(str(c) for c in DEFAULT_COEFFS),
    reduction: Annotated[
        str, typer.Option(metavar="NAME", help="Cost reduction over samples: rms or median.")
    ] = "rms",
    per_sample: Annotated[
        bool, typer.Option(help="OSS: one DP per trajectory, median indices.")
    ] = False,
    cache: options.Cache = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    progress: options.Progress = True,
) -> None:
    """Dynamic-programming schedule (GITS / OSS style) for one solver and NFE.

    Writes `best_schedule.json`, `scheduler/`, `result.json`, `progress.png` and the study store
    (`study.sqlite3` unless `--storage`) under `--out`."""
    from stepsearch.search.family import run_job

    with usage_errors():
        settings = DPSettings(
            grid_points=grid_points,
            grid_spacing=grid_spacing,
            teacher_samples=teacher_samples,
            coeffs=tuple(_floats(coeffs)),
            reductions=(reduction,),
            per_sample=per_sample,
        )
        metric = objective_metric(metric, pipeline)
        job = run_job(
            "dp", model_or_default(model, pipeline), solver, nfe, out, pipeline=pipeline,
            prompts=prompts, metric=metric, num_samples=num_samples,
            held_out_samples=held_out_samples, cache=cache, device=device,
            guidance_scale=guidance_scale, dtype=dtype, progress=progress, settings=settings,
            storage=storage, study_name=study_name, worker_name=worker_name, seed=seed,
        )  # fmt: skip
    best, _ = job.found.details
    assert job.start is not None
    console.print(
        f"DP schedule {best.result.path} (coeff {best.coeff}): {metric} "
        f"{best.score.value:.4g} search, {job.held_out.value:.4g} held-out; best start "
        f"{job.start.name}: {job.start.value:.4g} search, "
        f"{job.held_out_values[f'start ({job.start.name})']:.4g} held-out"
    )
    console.print(f"wrote {', '.join(job.files.values())}")
    print_loading_code(job.files.get("scheduler"))
