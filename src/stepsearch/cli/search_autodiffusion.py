"""``stepsearch search autodiffusion``: argument parsing only; the job is
:func:`stepsearch.search.autodiffusion.run_autodiffusion_job`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli._common import console, usage_errors
from stepsearch.cli.search import search_command


@search_command("autodiffusion")
def autodiffusion_command(
    model: Annotated[
        str,
        typer.Option(help="`digits`, `digits-flow`, `digits-cond` or a local UNet2DModel folder."),
    ],
    solver: Annotated[str, typer.Option(help="The solver the schedule is searched for.")],
    nfe: Annotated[int, typer.Option(help="Model evaluations per sample.", min=1)],
    out: Annotated[Path, typer.Option(help="Output folder (result files; study by default).")],
    budget: Annotated[int, typer.Option(help="Trials (candidates evaluated) in all.", min=1)] = 500,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Study store: a SQLite file or a database URL (postgresql://...) shared by "
            "workers. Default: OUT/study.sqlite3."
        ),
    ] = None,
    metric: Annotated[str, typer.Option(help="Fitness: fd, kid or traj.")] = "fd",
    num_samples: Annotated[int, typer.Option(help="Samples per candidate (search seed).")] = 256,
    held_out_samples: Annotated[
        int, typer.Option(help="Samples for the held-out scores of the result.")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the evolutionary search.")] = 0,
    population: Annotated[int, typer.Option(help="Candidates per generation.")] = 50,
    mutations: Annotated[int, typer.Option(help="Of them, children by mutation.")] = 25,
    crossovers: Annotated[int, typer.Option(help="Of them, children by crossover.")] = 10,
    parents: Annotated[int, typer.Option(help="Best candidates children come from.")] = 10,
    mutation_probability: Annotated[float, typer.Option(help="Per-gene mutation rate.")] = 0.1,
    study_name: Annotated[str | None, typer.Option(help="Study name (default from settings).")] = (
        None
    ),
    worker_name: Annotated[str | None, typer.Option(help="Label of this worker's trials.")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache folder (default ~/.cache).")] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance (--model digits-cond; 1: the conditional branch "
            "alone). [default: 2]",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """AutoDiffusion's evolutionary search for the timesteps `--solver` runs best at `--nfe`.

    Every candidate is a trial in an Optuna study: kill the job and rerun the same command to
    resume it (the result is the one an uninterrupted run gives); start the same command on
    several machines with one `--storage postgresql://...` to share the work. Writes
    `best_schedule.json`, `scheduler/` (diffusers), `result.json` and `progress.png` to `--out`.
    """
    import optuna

    from stepsearch.cache import TensorCache
    from stepsearch.eval.objective import Objective
    from stepsearch.models import load_source
    from stepsearch.search.autodiffusion import AutoDiffusionSettings, run_autodiffusion_job

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with usage_errors():
        settings = AutoDiffusionSettings(
            population=population,
            mutations=mutations,
            crossovers=crossovers,
            parents=parents,
            mutation_probability=mutation_probability,
        )
        objective = Objective(
            load_source(model, device=device, guidance_scale=guidance_scale),
            metric,
            num_samples=num_samples,
            held_out_samples=held_out_samples,
            cache=TensorCache(cache) if cache is not None else None,
            progress=progress,
        )
        summary = run_autodiffusion_job(
            objective,
            solver,
            nfe=nfe,
            budget=budget,
            out=out,
            storage=storage,
            seed=seed,
            settings=settings,
            study_name=study_name,
            progress=progress,
            worker_name=worker_name,
        )
    best = summary.result.best
    console.print(f"best schedule ({solver}, NFE {nfe}): timesteps {_shown(best)}")
    for name, value in summary.held_out.items():
        console.print(f"  held-out {metric} {name}: {value:.4g}")
    for role, path in summary.files.items():
        console.print(f"  {role}: {path}")


def _shown(schedule) -> str:
    try:
        return str(schedule.to_diffusers_timesteps(integer=False).round(1).tolist())
    except ValueError:
        return str(schedule.times.round(4).tolist())
