"""``stepsearch demo``: ``stepsearch optimize`` on the bundled digits model at a small budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, usage_errors
from stepsearch.cli.optimize import print_forecast, print_summary
from stepsearch.search.optimize import DEMO_BUDGET_EVALS, demo_settings, optimize
from stepsearch.search.optimize.forecast import forecast

DEMO_NFES = [4, 5, 6]
DEMO_METHODS = ["dp", "olss", "autodiffusion", "s3"]


def demo_command(
    out: options.OutDir = Path("stepsearch-demo"),
    nfe: options.NFEs = None,
    budget_evals: options.BudgetEvals = DEMO_BUDGET_EVALS,
    budget_minutes: options.BudgetMinutes = 30.0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Discard the results already in --out.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print each stage's model evaluations and a time "
            "forecast (from one timed batch), then exit without writing anything.",
        ),
    ] = False,
    device: options.Device = "cpu",
) -> None:
    """The main job on the bundled digits model at a small work budget: DP, OLSS, AutoDiffusion
    and S³ searches against diffusers' and stepsearch's built-in samplers at NFE 4, 5 and 6, judged
    on noise the searches never saw. The work is fixed (the same table on a fast and a slow
    machine); --budget-minutes only bounds it. Rerun to reuse the results."""
    if dry_run:
        with usage_errors():
            planned = forecast(
                "digits", nfe or DEMO_NFES, DEMO_METHODS, budget_minutes,
                budget_evals=budget_evals, settings=demo_settings(), device=device,
            )  # fmt: skip
        print_forecast(planned)
        return
    console.print("stepsearch demo: optimizing samplers for the bundled digits DDPM "
                  f"({budget_evals:,} model evaluations for AutoDiffusion and S³, then judging on "
                  "unseen noise)")  # fmt: skip
    with usage_errors():
        result = optimize(
            "digits",
            nfe or DEMO_NFES,
            DEMO_METHODS,
            budget_minutes,
            out,
            budget_evals=budget_evals,
            overwrite=overwrite,
            settings=demo_settings(),
            device=device,
        )
    print_summary(result.report, result.files)
