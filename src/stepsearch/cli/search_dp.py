"""``stepsearch search dp``: GITS / OSS-style DP schedules (argument parsing only).

The work is :func:`stepsearch.search.dp_job.run_dp_search`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli._common import console, usage_errors
from stepsearch.cli.search import search_command
from stepsearch.search.dp_job import DEFAULT_COEFFS, DPSettings


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@search_command("dp")
def dp_command(
    model: Annotated[
        str,
        typer.Option(help="`digits`, `digits-flow`, `digits-cond` or a local UNet2DModel dir."),
    ] = "digits",
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance (--model digits-cond; 1: the conditional branch "
            "alone). [default: 2]",
            show_default=False,
        ),
    ] = None,
    solver: Annotated[str, typer.Option(help="Solver that will run the schedule.")] = (
        "unipc_bh2"  # the best DP solver on the digits search seed at NFE 4-10 (searches_dp.md)
    ),
    nfe: Annotated[int, typer.Option(help="Model evaluations (= steps).", min=1)] = 5,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Study store: a SQLite file or a database URL (default OUT/study.sqlite3)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("stepsearch-dp"),
    metric: Annotated[str, typer.Option(help="Objective: traj, fd or kid.")] = "fd",
    num_samples: Annotated[int, typer.Option(help="Samples per candidate (search seed).")] = 512,
    held_out_samples: Annotated[int, typer.Option(help="Samples on the held-out seed.")] = 1000,
    grid_points: Annotated[int, typer.Option(help="Points of the DP grid.")] = 100,
    grid_spacing: Annotated[str, typer.Option(help="Spacing of the DP grid.")] = "logsnr_uniform",
    teacher_samples: Annotated[int, typer.Option(help="Teacher trajectories.")] = 256,
    coeffs: Annotated[
        str, typer.Option(help="GITS cost coefficients, comma-separated.")
    ] = ",".join(str(c) for c in DEFAULT_COEFFS),
    reduction: Annotated[str, typer.Option(help="Cost reduction over samples: rms or median.")] = (
        "rms"
    ),
    per_sample: Annotated[
        bool, typer.Option(help="OSS: one DP per trajectory, median indices.")
    ] = False,
    cache: Annotated[Path | None, typer.Option(help="Tensor cache directory.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Dynamic-programming schedule (GITS / OSS style) for one solver and NFE; writes
    `best_schedule.json`, `scheduler/`, `result.json`, `progress.png` and the study store
    (`study.sqlite3` unless `--storage`) under `--out`."""
    from stepsearch.cache import TensorCache
    from stepsearch.eval.objective import Objective
    from stepsearch.models import load_source
    from stepsearch.search.dp_job import run_dp_search
    from stepsearch.search.dynamic import layer_rules
    from stepsearch.solvers import get_solver

    with usage_errors():
        layer_rules(get_solver(solver), nfe)  # an unsupported solver fails before the model loads
        source = load_source(model, guidance_scale=guidance_scale)
        objective = Objective(
            source,
            metric,
            num_samples=num_samples,
            held_out_samples=held_out_samples,
            cache=TensorCache(cache) if cache is not None else None,
            progress=progress,
        )
        settings = DPSettings(
            grid_points=grid_points,
            grid_spacing=grid_spacing,
            teacher_samples=teacher_samples,
            coeffs=tuple(_floats(coeffs)),
            reductions=(reduction,),
            per_sample=per_sample,
        )
        result = run_dp_search(
            objective, solver, nfe, out, storage=storage, settings=settings, progress=progress
        )
    console.print(
        f"DP schedule {result.best.result.path} (coeff {result.best.coeff}): {metric} "
        f"{result.best.score.value:.4g} search, {result.held_out.value:.4g} held-out; best start "
        f"{result.start.name}: {result.start.value:.4g} search, "
        f"{result.held_out_values[f'start ({result.start.name})']:.4g} held-out"
    )
    console.print(f"wrote {', '.join(result.files.values())}")
