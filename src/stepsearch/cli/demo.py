"""``stepsearch demo``: ``stepsearch optimize`` on the bundled digits model at a small budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, usage_errors
from stepsearch.cli.optimize import print_summary
from stepsearch.search.optimize import DEMO_BUDGET_EVALS, demo_settings, optimize

DEMO_NFES = [4, 6, 8]
DEMO_METHODS = ["dp", "olss", "autodiffusion", "s3"]


def demo_command(
    out: options.OutDir = Path("stepsearch-demo"),
    nfe: options.NFEs = None,
    budget_evals: options.BudgetEvals = DEMO_BUDGET_EVALS,
    budget_minutes: options.BudgetMinutes = 10.0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Discard the results already in --out.")
    ] = False,
    device: options.Device = "cpu",
) -> None:
    """The main job on the bundled digits model at a small work budget: DP, OLSS, AutoDiffusion
    and S³ searches against diffusers' and stepsearch's built-in samplers at NFE 4, 6 and 8, judged
    on noise the searches never saw. The work is fixed (the same table on a fast and a slow
    machine); --budget-minutes only bounds it. Rerun to reuse the results."""
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
