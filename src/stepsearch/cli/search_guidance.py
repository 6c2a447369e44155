"""``stepsearch search guidance``: argument parsing only; the job is
:func:`stepsearch.search.guidance.search_guidance`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, print_loading_code, usage_errors
from stepsearch.cli.search import (
    DEFAULT_HELD_OUT_SAMPLES,
    DEFAULT_NFE,
    DEFAULT_NUM_SAMPLES,
    search_command,
)


@search_command("guidance", deprecated={"--trials": "--budget"})
def guidance_command(
    nfe: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Network (UNet) passes per sample: a guided step costs 2, a step at weight 1 "
            "costs 1.",
            min=1,
            max=options.MAX_NFE,
        ),
    ] = 2 * DEFAULT_NFE,
    out: options.OutDir = Path("stepsearch-guidance"),
    model: options.Model = "digits-cond",
    solver: options.Solver = "dpm_solver_pp_2m",
    budget: Annotated[
        int,
        typer.Option(
            metavar="N", help="Trials in all (the constant-guidance curve included).", min=2
        ),
    ] = 60,
    shapes: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SHAPE...",
            help="Guidance shapes to search (constant, linear_increasing, cosine_increasing, "
            "clamp_linear, power_cosine, interval). [default: all]",
            show_default=False,
        ),
    ] = None,
    max_weight: Annotated[
        float, typer.Option(metavar="W", help="Largest (mean) guidance weight.")
    ] = 5.0,
    constant_weights: Annotated[
        list[float] | None,
        typer.Option(
            metavar="W...",
            help="The constant-guidance curve. [default: 1 1.5 2 3 4]",
            show_default=False,
        ),
    ] = None,
    storage: options.Storage = None,
    num_samples: options.NumSamples = DEFAULT_NUM_SAMPLES,
    select_samples: options.SelectSamples = 1000,
    held_out_samples: options.HeldOutSamples = DEFAULT_HELD_OUT_SAMPLES,
    seed: options.Seed = 0,
    study_name: options.StudyName = None,
    guidance_scale: options.GuidanceScale = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    progress: options.Progress = True,
) -> None:
    """Search a guidance schedule jointly with the step spacing at `--nfe` network passes.

    For a class-conditional model (`digits-cond`), judged by FD and by the classifier's accuracy
    on the requested digit; the guidance weight is a schedule on the noise level. Every candidate
    is a trial in an Optuna study (rerun the same command to resume). Scores the constant curve and
    the best non-dominated trials again on a selection seed (seed + 2, `--select-samples`), picks
    there the lowest FD at accuracy >= constant guidance at the model's default weight
    (`--guidance-scale`), scores it and the constant curve on held-out noise (seed + 1), and writes
    `guidance.json`, `best_schedule.json`, `scheduler/` and
    `result.json` (Pareto front, every trial) to `--out`."""
    from stepsearch.models import load_model
    from stepsearch.search.guidance import (
        SEARCH_SHAPES,
        GuidanceSearchSettings,
        search_guidance,
    )

    with usage_errors():
        defaults = GuidanceSearchSettings()
        settings = GuidanceSearchSettings(
            trials=budget,
            shapes=tuple(shapes) if shapes else SEARCH_SHAPES,
            weight_range=(1.0, max_weight),
            constant_weights=(
                tuple(constant_weights) if constant_weights else defaults.constant_weights
            ),
        )
        source = load_model(model, device=device, guidance_scale=guidance_scale, torch_dtype=dtype)
        result = search_guidance(
            source, solver, nfe, out, settings=settings, num_samples=num_samples,
            held_out_samples=held_out_samples, select_samples=select_samples, search_seed=seed,
            held_out_seed=seed + 1, select_seed=seed + 2, seed=seed, storage=storage,
            study_name=study_name, progress=progress,
        )  # fmt: skip
    pick = result.pick
    console.print(
        f"picked {pick.candidate.guidance.describe()}, rho {pick.candidate.rho:.3g}: "
        f"{pick.score.num_steps} steps, {pick.score.passes} passes"
    )
    for name, score in result.held_out.items():
        console.print(
            f"  held-out {name}: FD {score.fd:.4g}, accuracy {score.accuracy:.3f} "
            f"({score.num_steps} steps, {score.passes} passes)"
        )
    for role, path in result.files.items():
        console.print(f"  {role}: {path}")
    print_loading_code(result.files.get("scheduler"))
