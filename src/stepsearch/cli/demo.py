"""``stepsearch demo``: the main job on the bundled digits model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli._common import usage_errors
from stepsearch.cli.eval import DEFAULT_NFES, report
from stepsearch.eval.evaluate import evaluate
from stepsearch.eval.experiment import default_methods


def demo_command(
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output directory.")] = Path(
        "stepsearch-demo"
    ),
    num_samples: Annotated[int, typer.Option(metavar="N", help="Samples per cell.", min=2)] = 500,
    nfe: Annotated[
        list[int] | None,
        typer.Option(
            metavar="N...",
            help="Model-evaluation budgets. [default: 4 5 6 8 10]",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the per-sample noise.")] = 0,
    device: Annotated[str, typer.Option(metavar="NAME", help="torch device.")] = "cpu",
) -> None:
    """The main job on the bundled digits model: diffusers' DDIM, DPM-Solver++, UniPC and Euler
    with their spacings vs stepsearch solvers and schedules, FD-digits and trajectory error at
    NFE 4-10 (a few minutes on 2 CPU cores)."""
    with usage_errors():
        result = evaluate(
            "digits",
            default_methods(),
            nfe or DEFAULT_NFES,
            ["fd", "traj"],
            num_samples,
            seed,
            device=device,
            chunk_size=250,
        )
        report(result, out, "stepsearch demo: bundled digits DDPM")
