"""``stepsearch optimize``: the best sampler for a model at each step budget (argument parsing
only; the work is :func:`stepsearch.search.optimize.optimize`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli._common import console, usage_errors
from stepsearch.search.optimize import METHODS, gains_in_words, optimize

DEFAULT_NFES = [4, 6, 8]


def optimize_command(
    model: Annotated[
        str,
        typer.Option(
            metavar="digits|DIR",
            help="'digits' (bundled) or a local diffusers UNet2DModel directory with its "
            "scheduler config.",
        ),
    ] = "digits",
    nfe: Annotated[
        list[int] | None,
        typer.Option(
            metavar="N...", help="Model-evaluation budgets. [default: 4 6 8]", show_default=False
        ),
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME...",
            help=f"Search families: {', '.join(METHODS)}. [default: all]",
            show_default=False,
        ),
    ] = None,
    budget_minutes: Annotated[
        float,
        typer.Option(metavar="M", help="Wall-clock minutes for the searches (AutoDiffusion gets "
                     "what the cheap searches leave)."),
    ] = 30.0,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output directory.")] = Path(
        "stepsearch-optimize"
    ),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue in a folder holding another run.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Discard the results already in --out.")
    ] = False,
    pipeline: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="A text-to-image pipeline directory (not yet)."),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Prompts for --pipeline (not yet).")
    ] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(metavar="G", help="Guidance scale for --pipeline (not yet).")
    ] = None,
    device: Annotated[str, typer.Option(metavar="NAME", help="torch device.")] = "cpu",
) -> None:
    """Search DP, AYS, OLSS and AutoDiffusion schedules for the model at each NFE, pick the
    winner against diffusers' and stepsearch's built-in samplers on unseen noise, and write a
    ready scheduler directory per NFE plus one report (markdown, JSON, PNG)."""
    with usage_errors():
        if pipeline is not None or prompts is not None or guidance_scale is not None:
            raise ValueError(
                "stepsearch optimize does not take --pipeline / --prompts / --guidance-scale yet: "
                "only OLSS searches inside text-to-image pipelines so far; run `stepsearch search "
                "olss --pipeline DIR --prompts FILE` for that"
            )
        result = optimize(
            model,
            nfe or DEFAULT_NFES,
            methods or list(METHODS),
            budget_minutes,
            out,
            resume=resume,
            overwrite=overwrite,
            device=device,
        )
    print_summary(result.report, result.files)


def print_summary(report: dict, files: dict[str, str]) -> None:
    """The gains in plain words, then where the report is."""
    if report["partial"]:
        console.print("[yellow]partial result[/]: the budget ended before every stage finished:")
        for item in report["incomplete"]:
            console.print(f"  NFE {item['nfe']}, {item['stage']}: {item['reason']}")
    for line in gains_in_words(report):
        console.print(line)
    console.print(f"report: [bold]{files['markdown']}[/] (and {Path(files['png']).name}, "
                  f"{Path(files['json']).name})")  # fmt: skip
