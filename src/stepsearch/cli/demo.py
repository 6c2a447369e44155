"""``stepsearch demo``: ``stepsearch optimize`` on the bundled digits model at a small budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, usage_errors
from stepsearch.cli.optimize import print_summary
from stepsearch.search.optimize import demo_settings, optimize

DEMO_NFES = [4, 6, 8]
DEMO_METHODS = ["dp", "olss", "autodiffusion", "s3"]


def demo_command(
    out: options.OutDir = Path("stepsearch-demo"),
    nfe: options.NFEs = None,
    budget_minutes: options.BudgetMinutes = 1.5,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Discard the results already in --out.")
    ] = False,
    device: options.Device = "cpu",
) -> None:
    """The main job on the bundled digits model at a small budget: DP, OLSS, AutoDiffusion and S³
    searches against diffusers' and stepsearch's built-in samplers at NFE 4, 6 and 8, judged on
    noise the searches never saw (about 5 minutes on 2 CPU cores). Rerun to reuse the results."""
    console.print("stepsearch demo: optimizing samplers for the bundled digits DDPM "
                  f"(searches for {budget_minutes:g} min, then judging on unseen noise)")  # fmt: skip
    with usage_errors():
        result = optimize(
            "digits",
            nfe or DEMO_NFES,
            DEMO_METHODS,
            budget_minutes,
            out,
            overwrite=overwrite,
            settings=demo_settings(),
            device=device,
        )
    print_summary(result.report, result.files)
