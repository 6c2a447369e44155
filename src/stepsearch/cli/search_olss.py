"""``stepsearch search olss``: argument parsing only (the job is
:func:`stepsearch.olss.search.run_olss_job`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, print_loading_code, usage_errors
from stepsearch.cli.checks import check_out_dir
from stepsearch.cli.search import search_command

__all__ = ["olss_command"]


@search_command("olss")
def olss_command(
    out: Annotated[
        Path,
        typer.Option(
            metavar="DIR",
            help="Directory for the scheduler, schedule file and report.",
            parser=check_out_dir,
        ),
    ],
    nfe: options.NFE = 10,
    model: options.Model = "digits",
    samples: Annotated[int, typer.Option(help="Teacher trajectories to fit on.", min=2)] = 64,
    held_out_samples: options.HeldOutSamples = 1000,
    search: Annotated[
        str, typer.Option(help="Path: greedy (paper), uniform, dp, best (of 3).")
    ] = "best",
    refit: Annotated[
        str, typer.Option(help="teacher (paper) or rollout (own points).")
    ] = "rollout",
    teacher_steps: Annotated[
        int, typer.Option(help="Teacher steps (DPM-Solver++(3M), logSNR).", min=2)
    ] = 100,
    pipeline: options.Pipeline = None,
    prompts: options.Prompts = None,
    guidance_scale: options.GuidanceScale = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the teacher noise (held-out: seed + 1).")] = 0,
) -> None:
    """Fit OLSS (optimal linear-subspace solver) for a model and write a drop-in scheduler."""
    from stepsearch.olss.search import run_olss_job

    with usage_errors():
        result = run_olss_job(
            out, nfe, model=model, pipeline=pipeline, prompts=prompts,
            guidance_scale=guidance_scale, samples=samples, held_out_samples=held_out_samples,
            search=search, refit=refit, teacher_steps=teacher_steps, seed=seed, device=device,
            dtype=dtype,
        )  # fmt: skip
    for row in result.report["held_out"]:
        values = ", ".join(
            f"{metric} {row[metric]['value']:.4g}" for metric in ("traj", "fd") if metric in row
        )
        console.print(f"{row['method']:>18} ({row['spacing']}): {values}")
    console.print(f"wrote {out}")
    print_loading_code(result.files.get("scheduler"))
