"""``stepsearch schedule show`` / ``save``: make, inspect and write step schedules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from stepsearch.cli._common import HelpGroup, ListOptionsCommand, console, usage_errors
from stepsearch.cli.checks import check_model, check_out_file
from stepsearch.integrations.export import drop_in_metadata
from stepsearch.models import model_noise, model_scheduler_config
from stepsearch.noise import EDM, DiscreteVP, FlowMatching, NoiseSchedule
from stepsearch.schedule import SPACINGS, StepSchedule, make_schedule
from stepsearch.schedule_file import read_plan_file, read_schedule_or_file

schedule_app = typer.Typer(
    help="Make, inspect and write step schedules.", no_args_is_help=True, cls=HelpGroup
)

NOISE_PRESETS: dict[str, Callable[[], NoiseSchedule]] = {
    "digits": lambda: model_noise("digits"),
    "ddpm-linear": lambda: DiscreteVP.from_diffusers_config({"beta_schedule": "linear"}),
    "stable-diffusion": DiscreteVP.stable_diffusion,
    "edm": EDM,
    "flow": lambda: FlowMatching(shift=3.0),
}
"""Named noise schedules for ``--noise`` (``digits``: the bundled model's, same as
``--model digits``)."""

DEFAULT_NOISE = "stable-diffusion"


def noise_for(noise: str | None, model: str | None) -> tuple[NoiseSchedule, str]:
    """The noise schedule of ``--model`` (its scheduler config) or of the ``--noise`` preset
    (default: Stable Diffusion's), and how to name it."""
    if noise is not None and model is not None:
        raise ValueError("pass --model or --noise, not both")
    if model is not None:
        return model_noise(model), f"model {model}"
    noise = noise or DEFAULT_NOISE
    if noise not in NOISE_PRESETS:
        raise ValueError(f"--noise: choose one of {', '.join(NOISE_PRESETS)}, got {noise!r}")
    return NOISE_PRESETS[noise](), noise


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


Spacing = Annotated[str, typer.Option(metavar="NAME", help=f"One of: {', '.join(SPACINGS)}.")]
Steps = Annotated[int, typer.Option(metavar="N", help="Number of steps.", min=1)]
Noise = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help=f"Noise schedule: {', '.join(NOISE_PRESETS)}. [default: {DEFAULT_NOISE}]",
        show_default=False,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        metavar="NAME|DIR",
        help="Use this model's noise schedule: 'digits' (bundled) or a local diffusers model "
        "directory (instead of --noise).",
        parser=check_model,
    ),
]


@schedule_app.command("show", cls=ListOptionsCommand)
def schedule_show(
    spacing: Spacing = "karras",
    steps: Steps = 10,
    noise: Noise = None,
    model: Model = None,
    file: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            exists=True,
            dir_okay=False,
            help="Show a saved schedule or solver plan JSON (or a search's best_schedule.json) "
            "instead.",
        ),
    ] = None,
) -> None:
    """Print a step schedule: times, alpha, sigma, lambda, k-diffusion sigmas, diffusers
    timesteps; for a solver plan file (or a search's best_schedule.json of a plan) also the plan,
    one row per step."""
    plan = None
    with usage_errors():
        if file is not None:
            found = read_plan_file(file)
            plan = found[0] if found is not None else None
            if plan is not None:
                schedule = plan.schedule
            else:
                loaded = read_schedule_or_file(file)
                schedule = loaded if isinstance(loaded, StepSchedule) else loaded.schedule
            title = str(file)
        else:
            noise_schedule, name = noise_for(noise, model)
            schedule = make_schedule(noise_schedule, steps, spacing)
            title = f"{spacing}, {steps} steps, {name}"
    _print_schedule(schedule, title)
    if plan is not None:
        typer.echo(plan.describe())


@schedule_app.command("save", cls=ListOptionsCommand)
def schedule_save(
    out: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="Where to write the schedule JSON.", parser=check_out_file
        ),
    ],
    spacing: Spacing = "karras",
    steps: Steps = 10,
    noise: Noise = None,
    model: Model = None,
) -> None:
    """Write a named spacing as a schedule JSON file (atomically). A schedule is tied to its
    noise schedule: for `stepsearch eval --model digits` write it with `--model digits`, which
    also records what a drop-in scheduler for the model needs (its prediction type and
    diffusers scheduler config) for `stepsearch export --to diffusers`."""
    with usage_errors():
        noise_schedule, name = noise_for(noise, model)
        schedule = make_schedule(noise_schedule, steps, spacing)
        if model is not None:
            schedule = schedule.with_metadata(
                model=Path(model).name,
                **drop_in_metadata(model_scheduler_config(model)),
            )
        schedule.save(out)
    console.print(f"wrote {out} ({spacing}, {steps} steps, {name})")
