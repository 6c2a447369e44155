"""``stepsearch search olss``: argument parsing only (the job is
:func:`stepsearch.olss.search.run_olss_job`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, print_loading_code, usage_errors
from stepsearch.cli.checks import check_out_dir
from stepsearch.cli.search import (
    DEFAULT_HELD_OUT_SAMPLES,
    DEFAULT_NFE,
    model_or_default,
    search_command,
)

__all__ = ["olss_command"]


@search_command("olss", deprecated={"--samples": "--teacher-samples"})
def olss_command(
    model: options.OptionalModel = None,
    pipeline: options.Pipeline = None,
    prompts: options.Prompts = None,
    guidance_scale: options.GuidanceScale = None,
    nfe: options.NFE = DEFAULT_NFE,
    out: Annotated[
        Path,
        typer.Option(
            metavar="DIR",
            help="Directory for the scheduler, schedule file and report.",
            parser=check_out_dir,
        ),
    ] = Path("stepsearch-olss"),
    teacher_samples: options.TeacherSamples = 64,
    held_out_samples: options.HeldOutSamples = DEFAULT_HELD_OUT_SAMPLES,
    seed: options.Seed = 0,
    search: Annotated[
        str, typer.Option(metavar="NAME", help="Path: greedy (paper), uniform, dp, best (of 3).")
    ] = "best",
    refit: Annotated[
        str, typer.Option(metavar="NAME", help="teacher (paper) or rollout (own points).")
    ] = "rollout",
    teacher_steps: Annotated[
        int, typer.Option(metavar="N", help="Teacher steps (DPM-Solver++(3M), logSNR).", min=2)
    ] = 100,
    cache: options.Cache = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    progress: options.Progress = True,
) -> None:
    """OLSS: fit an optimal linear-subspace solver for a model and write a drop-in scheduler.

    Fits on `--teacher-samples` converged solves, then compares the result with the built-in
    solvers on held-out noise; `scheduler/` and `olss_schedule.json` are written as soon as the
    fit exists, `report.json` / `report.md` after the comparison."""
    from stepsearch.olss.search import run_olss_job

    with usage_errors():
        result = run_olss_job(
            out, nfe, model=model_or_default(model, pipeline), pipeline=pipeline,
            prompts=prompts, guidance_scale=guidance_scale, samples=teacher_samples,
            held_out_samples=held_out_samples, search=search, refit=refit,
            teacher_steps=teacher_steps, seed=seed, device=device, dtype=dtype, cache=cache,
            progress=progress,
        )  # fmt: skip
    for row in result.report["held_out"]:
        values = ", ".join(
            f"{metric} {row[metric]['value']:.4g}" for metric in ("traj", "fd") if metric in row
        )
        console.print(f"{row['method']:>18} ({row['spacing']}): {values}")
    console.print(f"wrote {out}")
    print_loading_code(result.files.get("scheduler"))
