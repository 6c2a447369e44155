"""``stepsearch optimize``: the best sampler for a model at each step budget (argument parsing
only; the work is :func:`stepsearch.search.optimize.optimize`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, print_loading_code, usage_errors
from stepsearch.cli.checks import check_storage
from stepsearch.search.optimize import (
    METHODS,
    OptimizeSettings,
    gains_in_words,
    optimize,
    pipeline_settings,
)
from stepsearch.search.optimize.forecast import Forecast, forecast

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
    budget_evals: options.BudgetEvals = None,
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
    guidance_schedule: options.GuidanceScheduleChoice = None,
    data: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="(prompt, image) pairs for Align Your Steps with --pipeline: images and a "
            "metadata.jsonl of {file_name, text} lines (without it AYS is skipped).",
        ),
    ] = None,
    num_samples: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=2,
            show_default=False,
            help="Samples per search trial (search seed). [default: 256; 64 with --pipeline]",
        ),
    ] = None,
    select_samples: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=2,
            show_default=False,
            help="Samples per candidate on the selection seed. [default: 1000; 128 "
            "with --pipeline]",
        ),
    ] = None,
    held_out_samples: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=2,
            show_default=False,
            help="Samples per candidate on the report seed. [default: 1000; 128 with --pipeline]",
        ),
    ] = None,
    headline_samples: Annotated[
        int,
        typer.Option(
            metavar="N",
            min=0,
            callback=lambda n: n if n == 0 or n >= 8 else _too_few_headline_samples(n),
            help="Re-judge each NFE's winner and best built-in in diffusers' own loop on two "
            "fresh seeds against two independent converged solves at N samples (FD, FD at "
            "infinitely many samples and its ratio, trajectory error; headline.md). 0: off; "
            "5000 for a published headline.",
        ),
    ] = 0,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print each stage's model evaluations and a time "
            "forecast (from one timed batch), then exit without writing anything.",
        ),
    ] = False,
    storage: Annotated[
        str | None,
        typer.Option(
            metavar="FILE|URL",
            help="Share this run with other workers started with "
            "the same arguments: a SQLite file or a database URL (postgresql://...); "
            "each stage and judging runs once, all workers write the same report.",
            parser=check_storage,
        ),
    ] = None,
    worker_name: options.WorkerName = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
) -> None:
    """Search DP, AYS, OLSS and AutoDiffusion schedules and S³ solver plans at each NFE, pick the
    winner against diffusers' and stepsearch's built-in samplers on unseen noise, and write a
    ready scheduler directory per NFE plus one report (markdown, JSON, PNG).

    With --budget-evals N the result is the same on any machine (--budget-minutes only bounds the
    run). With --pipeline DIR --prompts FILE [--guidance-scale G]: the same inside a text-to-image
    pipeline (its guided UNet in latent space, image i with prompt i mod the number of prompts),
    judged by trajectory error of the decoded images; AYS runs only with --data pairs. With
    --guidance-schedule search (--model digits-cond): a guidance weight per noise level searched
    first and used by every sampler of the run; the report says what it bought."""
    base = pipeline_settings() if pipeline is not None else OptimizeSettings()
    counts = {"search_samples": num_samples, "select_samples": select_samples,
              "held_out_samples": held_out_samples,
              "headline_samples": headline_samples or None}  # fmt: skip
    settings = replace(base, **{k: v for k, v in counts.items() if v is not None})
    arguments = {
        "model": model if model is not None or pipeline is not None else "digits",
        "nfes": nfe or DEFAULT_NFES,
        "methods": methods or list(METHODS),
        "budget_minutes": budget_minutes,
        "budget_evals": budget_evals,
        "pipeline": pipeline,
        "prompts": prompts,
        "guidance_scale": guidance_scale,
        "guidance_schedule": guidance_schedule,
        "ays_data": data,
        "settings": settings,
        "device": device,
        "dtype": dtype,
    }
    if dry_run:
        with usage_errors():
            planned = forecast(**arguments)
        print_forecast(planned)
        return
    with usage_errors():
        result = optimize(
            **arguments, out=out, resume=resume, overwrite=overwrite, storage=storage,
            worker_name=worker_name,
        )  # fmt: skip
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


def print_forecast(planned: Forecast) -> None:
    """The dry run's table: per stage its model evaluations and forecast time, then the totals."""
    from rich.table import Table

    table = Table(title="optimize --dry-run: model evaluations (one sample through one model call)")
    for column in ("phase", "stage", "NFE", "trials", "evaluations", "forecast"):
        table.add_column(column, justify="left" if column in ("phase", "stage") else "right")
    for stage in planned.stages:
        seconds = planned.seconds_of(stage)
        table.add_row(
            stage.phase, stage.label, "" if stage.nfe is None else str(stage.nfe),
            "" if stage.trials is None else str(stage.trials),
            "not forecast" if stage.evaluations is None else f"{stage.evaluations:,}",
            "" if seconds is None else _duration(seconds),
        )  # fmt: skip
    console.print(table)
    unknown = [s.label for s in planned.stages if s.evaluations is None]
    console.print(
        f"total: {planned.evaluations:,} model evaluations, about "
        f"{_duration(planned.seconds)} at {1e6 * planned.seconds_per_evaluation:.3g} µs per "
        "evaluation (measured on one batch; cached teachers cost nothing, work besides model "
        "calls is not counted"
        + (f"; not forecast: {', '.join(sorted(set(unknown)))}" if unknown else "")
        + ")."
    )
    bound = 60.0 * planned.budget_minutes
    if planned.seconds > bound:
        console.print(
            f"[yellow]the forecast exceeds --budget-minutes {planned.budget_minutes:g}[/]"
        )
    if planned.budget_evals is None:
        console.print("trials of AutoDiffusion / S³ are at most the numbers shown: without "
                      "--budget-evals they are sized from the time left")  # fmt: skip


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _too_few_headline_samples(count: int) -> int:
    raise typer.BadParameter(f"0 (off) or at least 8, got {count}", param_hint="--headline-samples")
