"""``stepsearch search autodiffusion``: argument parsing only; the job is
:func:`stepsearch.search.family.run_job` with the AutoDiffusion family
(:mod:`stepsearch.search.families.autodiffusion`)."""

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


@search_command("autodiffusion")
def autodiffusion_command(
    model: options.OptionalModel = None,
    pipeline: options.Pipeline = None,
    prompts: options.Prompts = None,
    guidance_scale: options.GuidanceScale = None,
    solver: options.Solver = "unipc_bh2",  # optimize's AutoDiffusion solver
    nfe: options.NFE = DEFAULT_NFE,
    out: options.OutDir = Path("stepsearch-autodiffusion"),
    storage: options.Storage = None,
    study_name: options.StudyName = None,
    worker_name: options.WorkerName = None,
    metric: options.OptionalMetric = None,
    num_samples: options.NumSamples = DEFAULT_NUM_SAMPLES,
    held_out_samples: options.HeldOutSamples = DEFAULT_HELD_OUT_SAMPLES,
    seed: options.Seed = 0,
    budget: options.Budget = 500,
    population: Annotated[int, typer.Option(metavar="N", help="Candidates per generation.")] = 50,
    mutations: Annotated[
        int, typer.Option(metavar="N", help="Of them, children by mutation.")
    ] = 25,
    crossovers: Annotated[
        int, typer.Option(metavar="N", help="Of them, children by crossover.")
    ] = 10,
    parents: Annotated[
        int, typer.Option(metavar="N", help="Best candidates children come from.")
    ] = 10,
    mutation_probability: Annotated[
        float, typer.Option(metavar="P", help="Per-gene mutation rate.")
    ] = 0.1,
    cache: options.Cache = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    progress: options.Progress = True,
) -> None:
    """AutoDiffusion's evolutionary search for the timesteps `--solver` runs best at `--nfe`.

    Every candidate is a trial in an Optuna study: kill the job and rerun the same command to
    resume it (the result is the one an uninterrupted run gives); start the same command on
    several machines with one `--storage postgresql://...` to share the work. Writes
    `best_schedule.json`, `scheduler/` (diffusers), `result.json` and `progress.png` to `--out`.
    """
    from stepsearch.search.autodiffusion import AutoDiffusionSettings
    from stepsearch.search.family import run_job

    with usage_errors():
        settings = AutoDiffusionSettings(
            population=population,
            mutations=mutations,
            crossovers=crossovers,
            parents=parents,
            mutation_probability=mutation_probability,
        )
        metric = objective_metric(metric, pipeline)
        job = run_job(
            "autodiffusion", model_or_default(model, pipeline), solver, nfe, out,
            pipeline=pipeline, prompts=prompts, metric=metric, num_samples=num_samples,
            held_out_samples=held_out_samples, cache=cache, device=device, dtype=dtype,
            guidance_scale=guidance_scale, progress=progress, settings=settings, storage=storage,
            study_name=study_name, worker_name=worker_name, seed=seed, budget=budget,
        )  # fmt: skip
    best = job.found.schedule
    console.print(f"best schedule ({solver}, NFE {nfe}): timesteps {_shown(best)}")
    for name, value in job.held_out_values.items():
        console.print(f"  held-out {metric} {name}: {value:.4g}")
    for role, path in job.files.items():
        console.print(f"  {role}: {path}")
    print_loading_code(job.files.get("scheduler"))


def _shown(schedule) -> str:
    try:
        return str(schedule.to_diffusers_timesteps(integer=False).round(1).tolist())
    except ValueError:
        return str(schedule.times.round(4).tolist())
