"""``stepsearch export``: a schedule JSON to a diffusers scheduler directory, k-diffusion sigmas,
ComfyUI SIGMAS or diffusers timesteps; a solver plan (a plan file or a search's
``best_schedule.json`` of a plan) to its :class:`StepsearchPlanScheduler` directory."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli._common import console, usage_errors
from stepsearch.cli.checks import check_model, check_out_dir, check_out_file
from stepsearch.integrations.export import (
    DEFAULT_SOLVER,
    export_schedule,
    prediction_type_of,
    schedule_for_export,
)
from stepsearch.integrations.plan_scheduler import export_plan
from stepsearch.models import model_scheduler_config
from stepsearch.plan import SolverPlan
from stepsearch.schedule_file import Provenance, read_plan_file, read_schedule_or_file


class Target(str, Enum):
    diffusers = "diffusers"
    kdiffusion = "kdiffusion"
    comfyui = "comfyui"
    timesteps = "timesteps"


def export_command(
    schedule_file: Annotated[
        Path,
        typer.Argument(
            metavar="SCHEDULE",
            exists=True,
            dir_okay=False,
            help="A schedule JSON file (`stepsearch schedule save`), a solver plan file or a "
            "search's best_schedule.json.",
        ),
    ],
    to: Annotated[
        Target,
        typer.Option("--to", metavar="TARGET", help="diffusers, kdiffusion, comfyui or timesteps."),
    ],
    destination: Annotated[
        Path | None,
        typer.Argument(
            metavar="DEST",
            help="diffusers: the scheduler directory to save_pretrained into (required). "
            "Others: a JSON file to write [default: print to stdout].",
            show_default=False,
        ),
    ] = None,
    solver: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="diffusers: the drop-in scheduler's solver (a name from `stepsearch eval "
            "--help`). [default: the solver the schedule was fitted for, else "
            f"{DEFAULT_SOLVER}]",
            show_default=False,
        ),
    ] = None,
    prediction_type: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="diffusers: the model's prediction type (epsilon, v_prediction, sample, "
            "flow_prediction). [default: the one the schedule records or --model's; refused "
            "when neither says]",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            metavar="NAME|DIR",
            help="diffusers: build the drop-in from this model's scheduler config and prediction "
            "type (a bundled model or a local diffusers model directory). [default: what the "
            "schedule records]",
            show_default=False,
            parser=check_model,
        ),
    ] = None,
) -> None:
    """Export a schedule: `--to diffusers DIR` (a drop-in scheduler directory for
    `from_pretrained`), `--to kdiffusion` (sigmas), `--to comfyui` (SIGMAS) or `--to timesteps`
    (diffusers timesteps for `pipe(timesteps=...)`). A solver plan (a plan file, or a search's
    best_schedule.json of one) exports to a StepsearchPlanScheduler directory that replays it."""
    if destination is not None:  # before any work: a folder for diffusers, a file otherwise
        check = check_out_dir if to is Target.diffusers else check_out_file
        try:
            check(str(destination))
        except typer.BadParameter as error:
            raise typer.BadParameter(str(error), param_hint="'DEST'") from None
    with usage_errors():
        scheduler_config = None
        if model is not None:
            if to is not Target.diffusers:
                raise ValueError(f"--model applies to the diffusers export, not {to.value}")
            scheduler_config = model_scheduler_config(model)
            prediction_type = prediction_type or prediction_type_of(scheduler_config)
        found = read_plan_file(schedule_file)  # a solver plan: its own drop-in scheduler
        if found is not None and to is Target.diffusers:
            _export_plan(found, destination, solver, prediction_type)
            return
        if found is not None:
            schedule = found[0].schedule
        else:
            schedule = schedule_for_export(read_schedule_or_file(schedule_file))
        result = export_schedule(
            schedule,
            to.value,
            destination,
            solver=solver,
            prediction_type=prediction_type,
            scheduler_config=scheduler_config,
        )
    if to is Target.diffusers:
        console.print(
            f"wrote [bold]{destination}[/]: {type(result).__name__} "
            f"({result.config.solver}, {schedule.num_steps} steps); load it with "
            f"{type(result).__name__}.from_pretrained('{destination}')"
        )
    elif destination is not None:
        console.print(f"wrote [bold]{destination}[/]: {len(result)} {to.value} values")
    else:
        typer.echo(json.dumps(result))


def _export_plan(
    found: tuple[SolverPlan, Provenance | None],
    destination: Path | None,
    solver: str | None,
    prediction_type: str | None,
) -> None:
    if destination is None:
        raise ValueError("a diffusers export needs a directory to save_pretrained into")
    plan, provenance = found
    result = export_plan(
        plan, destination, provenance=provenance, solver=solver, prediction_type=prediction_type
    )
    name = type(result).__name__
    console.print(
        f"wrote [bold]{destination}[/]: {name} (solver plan, {plan.num_steps} steps, NFE "
        f"{plan.nfe}); load it with `from stepsearch.integrations.plan_scheduler import {name}`, "
        f"{name}.from_pretrained('{destination}'), and run num_inference_steps={plan.num_steps}"
    )
