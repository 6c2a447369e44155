"""``stepsearch search guidance``: argument parsing only; the job is
:func:`stepsearch.search.guidance.search_guidance`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, print_loading_code, usage_errors
from stepsearch.cli.search import (
    DEFAULT_HELD_OUT_SAMPLES,
    DEFAULT_NFE,
    DEFAULT_NUM_SAMPLES,
    search_command,
)

PIPELINE_CHUNK_SIZE = 16
"""Samples per batch with --pipeline (as ``stepsearch eval`` and ``optimize`` batch them)."""


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
    pipeline: options.Pipeline = None,
    prompts: options.Prompts = None,
    clip_model: options.ClipModel = None,
    inception_weights: options.InceptionWeights = None,
    reference_stats: options.ReferenceStats = None,
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
        float | None,
        typer.Option(
            metavar="W",
            help="Largest (mean) guidance weight. [default: 5; 12 with --pipeline]",
            show_default=False,
        ),
    ] = None,
    constant_weights: Annotated[
        list[float] | None,
        typer.Option(
            metavar="W...",
            help="The constant-guidance curve (it must hold the default weight, "
            "--guidance-scale). [default: 1 1.5 2 3 4; 1 3 5 7.5 10 with --pipeline]",
            show_default=False,
        ),
    ] = None,
    pick_rule: Annotated[
        str,
        typer.Option(
            metavar="RULE",
            help="How the pick is made on the selection seed: `default` (lowest FD at accuracy / "
            "CLIP score >= constant guidance at --guidance-scale) or `margin` (furthest below the "
            "constant curve at its own accuracy / CLIP score).",
        ),
    ] = "default",
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

    For a class-conditional model (`digits-cond`): judged by FD and by the classifier's accuracy
    on the requested digit. For a text-to-image pipeline (`--pipeline DIR --prompts FILE
    --clip-model DIR --reference-stats PATH [--inception-weights FILE]`, image i with prompt i mod
    the number of prompts): judged by FID (Inception features against the reference, as
    `stepsearch eval` scores fid) and by the CLIP score of image and prompt. The guidance weight is
    a schedule on the noise level. Every candidate is a trial in an Optuna study (rerun the same
    command to resume). Scores the constant curve and the best non-dominated trials again on a
    selection seed (seed + 2, `--select-samples`), picks there the lowest FD at accuracy (CLIP
    score) >= constant guidance at the default weight (`--guidance-scale`; or, with `--pick-rule
    margin`, the trial furthest below the constant curve at its own accuracy), scores it and the
    constant curve on held-out noise (seed + 1), and writes `guidance.json`, `best_schedule.json`,
    `scheduler/` and `result.json` (Pareto front, every trial) to `--out`."""
    from stepsearch.models import load_model
    from stepsearch.search.guidance import (
        CONDITION_JUDGES,
        PIPELINE_SETTINGS,
        SEARCH_SHAPES,
        GuidanceSearchSettings,
        pipeline_judges,
        search_guidance,
    )

    with usage_errors():
        _check_inputs(model, pipeline, prompts, clip_model, inception_weights, reference_stats)
        defaults = PIPELINE_SETTINGS if pipeline is not None else GuidanceSearchSettings()
        settings = GuidanceSearchSettings(
            trials=budget,
            shapes=tuple(shapes) if shapes else SEARCH_SHAPES,
            weight_range=(1.0, defaults.weight_range[1] if max_weight is None else max_weight),
            constant_weights=(
                tuple(constant_weights) if constant_weights else defaults.constant_weights
            ),
            pick_rule=pick_rule,
        )
        judges: dict[str, Any] = {}
        if pipeline is None:
            source = load_model(
                model, device=device, guidance_scale=guidance_scale, torch_dtype=dtype
            )
        else:
            clip_scorer, fd_reference = pipeline_judges(
                clip_model, reference_stats, inception_weights, device=device, progress=progress
            )
            judges = {"clip_scorer": clip_scorer, "fd_reference": fd_reference,
                      "chunk_size": PIPELINE_CHUNK_SIZE}  # fmt: skip
            source = load_model(
                pipeline=pipeline, prompts=prompts, guidance_scale=guidance_scale,
                device=device, torch_dtype=dtype,
            )  # fmt: skip
        result = search_guidance(
            source, solver, nfe, out, settings=settings, num_samples=num_samples,
            held_out_samples=held_out_samples, select_samples=select_samples, search_seed=seed,
            held_out_seed=seed + 1, select_seed=seed + 2, seed=seed, storage=storage,
            study_name=study_name, progress=progress, **judges,
        )  # fmt: skip
    pick = result.pick
    judge = CONDITION_JUDGES[result.condition_judge]
    console.print(
        f"picked {pick.candidate.guidance.describe()}, rho {pick.candidate.rho:.3g}: "
        f"{pick.score.num_steps} steps, {pick.score.passes} passes"
    )
    for name, score in result.held_out.items():
        console.print(
            f"  held-out {name}: FD {score.fd:.4g}, {judge} {score.condition:.3f} "
            f"({score.num_steps} steps, {score.passes} passes)"
        )
    for role, path in result.files.items():
        console.print(f"  {role}: {path}")
    print_loading_code(result.files.get("scheduler"))


def _check_inputs(
    model: str,
    pipeline: Path | None,
    prompts: Path | None,
    clip_model: Path | None,
    inception_weights: Path | None,
    reference_stats: Path | None,
) -> None:
    """Refuse a model and a pipeline together, a pipeline without prompts, and a pipeline's
    judges given to a model (judged by its own FD and classifier)."""
    if pipeline is None:
        given = {
            "--prompts": prompts,
            "--clip-model": clip_model,
            "--inception-weights": inception_weights,
            "--reference-stats": reference_stats,
        }
        extra = [flag for flag, value in given.items() if value is not None]
        if extra:
            raise ValueError(
                f"{', '.join(extra)}: for a text-to-image search (--pipeline DIR); --model "
                f"{model} is judged by its own FD and classifier"
            )
        return
    if model != "digits-cond":
        raise ValueError("pass either --model or --pipeline, not both")
    if prompts is None:
        raise ValueError("--pipeline needs --prompts FILE (one prompt per line)")
