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
from stepsearch.cli.search import search_command
from stepsearch.search.families.dp import DEFAULT_COEFFS, DPSettings


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@search_command("dp")
def dp_command(
    model: options.Model = "digits",
    guidance_scale: options.GuidanceScale = None,
    solver: options.Solver = "unipc_bh2",  # the best DP solver on digits at NFE 4-10
    nfe: options.NFE = 5,
    storage: options.Storage = None,
    out: options.OutDir = Path("stepsearch-dp"),
    metric: options.Metric = "fd",
    num_samples: options.NumSamples = 512,
    held_out_samples: options.HeldOutSamples = 1000,
    grid_points: Annotated[int, typer.Option(help="Points of the DP grid.")] = 100,
    grid_spacing: Annotated[str, typer.Option(help="Spacing of the DP grid.")] = "logsnr_uniform",
    teacher_samples: Annotated[int, typer.Option(help="Teacher trajectories.")] = 256,
    coeffs: Annotated[
        str, typer.Option(help="GITS cost coefficients, comma-separated.")
    ] = ",".join(str(c) for c in DEFAULT_COEFFS),
    reduction: Annotated[str, typer.Option(help="Cost reduction over samples: rms or median.")] = (
        "rms"
    ),
    per_sample: Annotated[
        bool, typer.Option(help="OSS: one DP per trajectory, median indices.")
    ] = False,
    cache: options.Cache = None,
    dtype: options.Dtype = "float32",
    progress: options.Progress = True,
) -> None:
    """Dynamic-programming schedule (GITS / OSS style) for one solver and NFE; writes
    `best_schedule.json`, `scheduler/`, `result.json`, `progress.png` and the study store
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
        job = run_job(
            "dp", model, solver, nfe, out, metric=metric, num_samples=num_samples,
            held_out_samples=held_out_samples, cache=cache, guidance_scale=guidance_scale,
            dtype=dtype, progress=progress, settings=settings, storage=storage,
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
