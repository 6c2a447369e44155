"""The ``stepsearch`` command: one command, subcommands, sensible defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from stepsearch.noise import EDM, DiscreteVP, FlowMatching, NoiseSchedule
from stepsearch.schedule import SPACINGS, StepSchedule, make_schedule

app = typer.Typer(
    help="Optimized sampling schedules for diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)
schedule_app = typer.Typer(help="Make, inspect and convert step schedules.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")

console = Console()

NOISE_PRESETS: dict[str, NoiseSchedule] = {
    "ddpm-linear": DiscreteVP.from_diffusers_config({"beta_schedule": "linear"}),
    "stable-diffusion": DiscreteVP.stable_diffusion(),
    "edm": EDM(),
    "flow": FlowMatching(shift=3.0),
}


def _noise(preset: str) -> NoiseSchedule:
    try:
        return NOISE_PRESETS[preset]
    except KeyError:
        raise typer.BadParameter(f"choose one of {', '.join(NOISE_PRESETS)}") from None


def _print_schedule(schedule: StepSchedule, title: str) -> None:
    table = Table(title=title)
    for column in ("i", "t", "alpha", "sigma", "lambda", "k-diffusion sigma"):
        table.add_column(column, justify="right")
    discrete = isinstance(schedule.noise, DiscreteVP)
    if discrete:
        table.add_column("diffusers timestep", justify="right")
        timesteps = np.append(schedule.to_diffusers_timesteps(integer=False), np.nan)
    rows = zip(
        schedule.times,
        schedule.alphas,
        schedule.sigmas,
        schedule.lambdas,
        schedule.to_kdiffusion_sigmas(),
        strict=True,
    )
    for i, (t, alpha, sigma, lambda_, kd_sigma) in enumerate(rows):
        cells = [
            str(i),
            f"{t:.6g}",
            f"{alpha:.5g}",
            f"{sigma:.5g}",
            f"{lambda_:.4g}",
            f"{kd_sigma:.5g}",
        ]
        if discrete:
            cells.append("clean" if t == 0 else f"{timesteps[i]:.4g}")
        table.add_row(*cells)
    console.print(table)


@schedule_app.command("show")
def schedule_show(
    spacing: Annotated[str, typer.Option(help=f"One of: {', '.join(SPACINGS)}.")] = "karras",
    steps: Annotated[int, typer.Option(help="Number of steps.", min=1)] = 10,
    noise: Annotated[str, typer.Option(help=f"Noise schedule: {', '.join(NOISE_PRESETS)}.")] = (
        "stable-diffusion"
    ),
    file: Annotated[Path | None, typer.Option(help="Show a saved schedule JSON instead.")] = None,
) -> None:
    """Print a step schedule: times, alpha, sigma, lambda, k-diffusion sigmas, diffusers timesteps."""
    try:
        if file is not None:
            schedule = StepSchedule.load(file)
            title = str(file)
        else:
            schedule = make_schedule(_noise(noise), steps, spacing)
            title = f"{spacing}, {steps} steps, {noise}"
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    _print_schedule(schedule, title)


@schedule_app.command("save")
def schedule_save(
    out: Annotated[Path, typer.Argument(help="Where to write the schedule JSON.")],
    spacing: Annotated[str, typer.Option(help=f"One of: {', '.join(SPACINGS)}.")] = "karras",
    steps: Annotated[int, typer.Option(help="Number of steps.", min=1)] = 10,
    noise: Annotated[str, typer.Option(help=f"Noise schedule: {', '.join(NOISE_PRESETS)}.")] = (
        "stable-diffusion"
    ),
) -> None:
    """Write a named spacing as a schedule JSON file (atomically)."""
    try:
        schedule = make_schedule(_noise(noise), steps, spacing)
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    schedule.save(out)
    console.print(f"wrote {out}")


def _register_commands() -> None:
    from stepsearch.evaluate_cli import register

    register(app)


_register_commands()

LIST_OPTIONS = ("--schedules", "--solvers", "--baselines", "--nfe", "--metric")


def normalize_list_options(argv: list[str]) -> list[str]:
    """Let list options take several values after one flag (``--nfe 4 5 6``) as well as repeated
    flags (``--nfe 4 --nfe 5``) and commas (``--nfe 4,5,6``)."""
    normalized: list[str] = []
    current: str | None = None
    for token in argv:
        if token.startswith("-"):
            current = token if token in LIST_OPTIONS else None
            if current is None:
                normalized.append(token)
            continue
        if current is not None:
            normalized.extend(
                item for value in token.split(",") if value for item in (current, value)
            )
        else:
            normalized.append(token)
    return normalized


def main() -> None:
    import sys

    app(args=normalize_list_options(sys.argv[1:]), prog_name="stepsearch")


if __name__ == "__main__":
    main()
