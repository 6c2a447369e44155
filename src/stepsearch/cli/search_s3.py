"""``stepsearch search s3``: argument parsing only; the job is
:func:`stepsearch.search.family.run_job` with the S³ family
(:mod:`stepsearch.search.families.s3`)."""

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
    model_or_default,
    objective_metric,
    search_command,
)


@search_command("s3")
def s3_command(
    model: options.OptionalModel = None,
    pipeline: options.Pipeline = None,
    prompts: options.Prompts = None,
    guidance_scale: options.GuidanceScale = None,
    nfe: options.NFE = DEFAULT_NFE,
    out: options.OutDir = Path("stepsearch-s3"),
    storage: options.Storage = None,
    study_name: options.StudyName = None,
    worker_name: options.WorkerName = None,
    metric: options.OptionalMetric = None,
    num_samples: options.NumSamples = DEFAULT_NUM_SAMPLES,
    held_out_samples: options.HeldOutSamples = DEFAULT_HELD_OUT_SAMPLES,
    seed: options.Seed = 0,
    budget: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="True evaluations (trials) after the starting points, in each evolution.",
            min=1,
        ),
    ] = 200,
    restarts: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Independent evolutions (the r-th drawn with SEED + r); the selection seed "
            "picks among each one's best.",
            min=1,
        ),
    ] = 2,
    proposals: Annotated[
        int, typer.Option(metavar="N", help="Plans the predictor picks per stage.", min=1)
    ] = 12,
    explore: Annotated[
        int, typer.Option(metavar="N", help="Random variants per stage.", min=0)
    ] = 4,
    predictor: Annotated[
        bool,
        typer.Option(help="Rank candidates with the learned predictor (off: plain evolution)."),
    ] = True,
    pick: Annotated[
        str,
        typer.Option(
            metavar="RULE",
            help="How the predictor picks a stage's plans: `screen` (drawn at random from the "
            "half it ranks better), `best` (its best-ranked ones) or `siblings` (the best it "
            "ranks of 8 children of each parent the plain evolution draws).",
        ),
    ] = "screen",
    proxy: Annotated[
        bool,
        typer.Option(
            help="Give the predictor each plan's trajectory error on a Gaussian mixture fitted "
            "to the model's reference data (where it has small data in its own space, e.g. the "
            "digits models; ignored otherwise).",
        ),
    ] = True,
    free_start: Annotated[
        bool,
        typer.Option(
            "--free-start/--fixed-start",
            help="Search the first time too (a truncated start, as AutoDiffusion's results "
            "have); fixed: every plan starts at the noise schedule's largest time.",
        ),
    ] = True,
    select_plans: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="The best plans on the search seed re-scored on a selection seed, the lowest "
            "there picked (0: the search seed's best).",
            min=0,
        ),
    ] = 8,
    select_samples: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Samples per plan on the selection seed. Default: 16 x NUM_SAMPLES.",
            min=2,
            show_default=False,
        ),
    ] = None,
    cache: options.Cache = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    progress: options.Progress = True,
) -> None:
    """S³: search the solver rule of every step at `--nfe`, guided by a learned predictor.

    A rule is the step's time, noise/data prediction, Taylor order, estimation points,
    relaxation, corrector, or an analytical first step. `--restarts` (2) independent evolutions
    of `--budget` evaluations each; the N best plans of each (`--select-plans`, 8) are re-scored on
    a selection seed with 16x the samples and the lowest there is the result (`--select-plans 0`:
    the search seed's best). Every evaluated plan
    is a trial in an Optuna study: kill the job and rerun the same command to resume it; start it
    on several machines with one `--storage postgresql://...` to share the work. Writes
    `best_schedule.json` (the plan and its provenance), `scheduler/` (a diffusers scheduler
    replaying the plan), `result.json` and `progress.png` to `--out`."""
    from stepsearch.search.family import run_job
    from stepsearch.search.s3 import S3Settings

    with usage_errors():
        settings = S3Settings(
            proposals=proposals,
            explore=explore,
            use_predictor=predictor,
            pick=pick,
            proxy=proxy,
            free_start=free_start,
            select_plans=select_plans,
            select_samples=select_samples,
            restarts=restarts,
        )
        job = run_job(
            "s3", model_or_default(model, pipeline), "plan", nfe, out, pipeline=pipeline,
            prompts=prompts, metric=objective_metric(metric, pipeline), num_samples=num_samples,
            held_out_samples=held_out_samples, cache=cache, device=device,
            dtype=dtype, guidance_scale=guidance_scale, progress=progress, settings=settings, storage=storage,
            study_name=study_name, worker_name=worker_name, seed=seed, budget=budget,
        )  # fmt: skip
    console.print(f"best plan at NFE {nfe} ({job.found.summary.get('best_origin', '?')}):")
    console.print(job.found.result.describe())
    for name, value in job.held_out_values.items():
        console.print(f"  held-out {job.schedule_file.provenance.objective['metric']} {name}: "
                      f"{value:.4g}")  # fmt: skip
    for role, path in job.files.items():
        console.print(f"  {role}: {path}")
    print_loading_code(job.files.get("scheduler"))
