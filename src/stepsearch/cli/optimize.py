"""``stepsearch optimize``: the best sampler for a model at each step budget (argument parsing
only; the work is :func:`stepsearch.search.optimize.optimize`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, print_loading_code, usage_errors
from stepsearch.search.optimize import METHODS, gains_in_words, optimize

DEFAULT_NFES = [4, 6, 8]


def optimize_command(
    model: options.OptionalModel = None,
    nfe: options.NFEs = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME...",
            help=f"Search families: {', '.join(METHODS)}. [default: all]",
            show_default=False,
        ),
    ] = None,
    budget_minutes: options.BudgetMinutes = 30.0,
    out: options.OutDir = Path("stepsearch-optimize"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue in a folder holding another run.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Discard the results already in --out.")
    ] = False,
    pipeline: options.Pipeline = None,
    prompts: options.Prompts = None,
    guidance_scale: options.GuidanceScale = None,
    data: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="(prompt, image) pairs for Align Your Steps with --pipeline: images and a "
            "metadata.jsonl of {file_name, text} lines (without it AYS is skipped).",
        ),
    ] = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
) -> None:
    """Search DP, AYS, OLSS and AutoDiffusion schedules and S³ solver plans at each NFE, pick the
    winner against diffusers' and stepsearch's built-in samplers on unseen noise, and write a
    ready scheduler directory per NFE plus one report (markdown, JSON, PNG).

    With --pipeline DIR --prompts FILE [--guidance-scale G]: the same inside a text-to-image
    pipeline (its guided UNet in latent space, image i with prompt i mod the number of prompts),
    judged by trajectory error of the decoded images; AYS runs only with --data pairs."""
    with usage_errors():
        result = optimize(
            model if model is not None or pipeline is not None else "digits",
            nfe or DEFAULT_NFES,
            methods or list(METHODS),
            budget_minutes,
            out,
            pipeline=pipeline,
            prompts=prompts,
            guidance_scale=guidance_scale,
            ays_data=data,
            resume=resume,
            overwrite=overwrite,
            device=device,
            dtype=dtype,
        )
    print_summary(result.report, result.files)


def print_summary(report: dict, files: dict[str, str]) -> None:
    """The gains in plain words, each NFE's with the line of Python that loads its winner's
    scheduler, then where the report is."""
    if report["partial"]:
        console.print("[yellow]partial result[/]: the budget ended before every stage finished:")
        for item in report["incomplete"]:
            console.print(f"  NFE {item['nfe']}, {item['stage']}: {item['reason']}")
    for line, entry in zip(gains_in_words(report), report["per_nfe"].values(), strict=True):
        console.print(line)
        print_loading_code(entry["files"].get("scheduler"))
    console.print(f"report: [bold]{files['markdown']}[/] (and {Path(files['png']).name}, "
                  f"{Path(files['json']).name})")  # fmt: skip
