"""``stepsearch search olss``: argument parsing only (the job is :mod:`stepsearch.olss.search`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli._common import console, usage_errors
from stepsearch.cli.search import search_command

__all__ = ["olss_command"]


@search_command("olss")
def olss_command(
    out: Annotated[
        Path, typer.Option(help="Directory for the scheduler, schedule file and report.")
    ],
    nfe: Annotated[
        int, typer.Option(help="Model evaluations (steps) of the fitted sampler.", min=1)
    ] = 10,
    model: Annotated[
        str,
        typer.Option(help="`digits`, `digits-flow`, `digits-cond` or a local UNet2DModel dir."),
    ] = "digits",
    samples: Annotated[int, typer.Option(help="Teacher trajectories to fit on.", min=2)] = 64,
    held_out_samples: Annotated[
        int, typer.Option(help="Held-out samples for the report.", min=2)
    ] = 1000,
    search: Annotated[
        str, typer.Option(help="Path: greedy (paper), uniform, dp, best (of 3).")
    ] = "best",
    refit: Annotated[
        str, typer.Option(help="teacher (paper) or rollout (own points).")
    ] = "rollout",
    teacher_steps: Annotated[
        int, typer.Option(help="Teacher steps (DPM-Solver++(3M), logSNR).", min=2)
    ] = 100,
    pipeline: Annotated[
        Path | None, typer.Option(help="A local text-to-image pipeline directory.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts file (one per line) for --pipeline.")
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance (--pipeline, --model digits-cond). "
            "[default: 7.5; 2 for digits-cond]",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the teacher noise (held-out: seed + 1).")] = 0,
) -> None:
    """Fit OLSS (optimal linear-subspace solver) for a model and write a drop-in scheduler."""
    from stepsearch.eval.objective import TeacherSpec
    from stepsearch.olss.search import search_olss, search_olss_pipeline

    teacher = TeacherSpec("dpm_solver_pp_3m", "logsnr_uniform", teacher_steps)
    with usage_errors():
        if pipeline is not None:
            if prompts is None:
                raise ValueError("--pipeline needs --prompts")
            from stepsearch.models.text_to_image import (
                TextToImageModel,
                load_pipeline,
                read_prompts,
            )

            text_model = TextToImageModel(
                load_pipeline(pipeline, device=device),
                read_prompts(prompts),
                guidance_scale=7.5 if guidance_scale is None else guidance_scale,
                name=pipeline.name,
            )
            result = search_olss_pipeline(
                text_model, nfe, num_samples=samples, held_out_samples=held_out_samples,
                out=out, search=search, refit=refit, teacher=teacher, seed=seed,
                held_out_seed=seed + 1, progress=True,
            )  # fmt: skip
        else:
            from stepsearch.models import load_source

            result = search_olss(
                load_source(model, device=device, guidance_scale=guidance_scale), nfe,
                num_samples=samples,
                held_out_samples=held_out_samples, out=out, search=search, refit=refit,
                teacher=teacher, seed=seed, held_out_seed=seed + 1, progress=True,
            )  # fmt: skip
    for row in result.report["held_out"]:
        values = ", ".join(
            f"{metric} {row[metric]['value']:.4g}" for metric in ("traj", "fd") if metric in row
        )
        console.print(f"{row['method']:>18} ({row['spacing']}): {values}")
    console.print(f"wrote {out}")
