"""``stepsearch search ays``: Align Your Steps on a model (argument parsing only).

The work is :func:`stepsearch.ays.search.run_ays_job`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.ays.optimize import SearchState
from stepsearch.ays.search import STRATEGIES, AYSConfig, run_ays_job
from stepsearch.cli import options
from stepsearch.cli._common import console, errors, print_loading_code, usage_errors
from stepsearch.cli.checks import check_out_dir, check_out_file
from stepsearch.cli.search import (
    DEFAULT_HELD_OUT_SAMPLES,
    DEFAULT_NFE,
    DEFAULT_NUM_SAMPLES,
    search_command,
)


def _progress(strategy: str, stage: int, state: SearchState) -> None:
    entry = state.history[-1]
    proxy = "" if entry["proxy"] is None else f", proxy {entry['proxy']:.4g}"
    console.print(
        f"[{strategy} stage {stage}] sweep {entry['sweep']}: KLUB {entry['klub']:.5g}, "
        f"accepted {entry['accepted']}, radius {entry['radius']:.3g}{proxy}"
        + (f" -> done ({state.reason})" if state.done else "")
    )


def _check_out(value: str) -> Path:
    """A folder (``--out DIR``); the deprecated ``--out FILE.json`` still writes that file."""
    if value.endswith(".json"):
        errors.print(
            "[yellow]warning:[/yellow] --out FILE.json is deprecated; give a folder (it gets "
            "best_schedule.json, scheduler/, progress.png and the checkpoint)"
        )
        return check_out_file(value)
    return check_out_dir(value)


@search_command(
    "ays", deprecated={"--samples": "--klub-samples", "--proxy-samples": "--num-samples"}
)
def ays_command(
    model: options.OptionalModel = None,
    pipeline: options.Pipeline = None,
    data: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR|FILE",
            help="Image folder or .safetensors file of images (default: the model's data); "
            "with --pipeline, a folder of (prompt, image) pairs with a metadata.jsonl "
            '(lines {"file_name": ..., "text": ...}).',
        ),
    ] = None,
    guidance_scale: options.GuidanceScale = None,
    solver: options.Solver = "dpm_solver_pp_2m",
    nfe: options.NFE = DEFAULT_NFE,
    out: Annotated[
        Path, typer.Option(metavar="DIR", help="Output directory.", parser=_check_out)
    ] = Path("stepsearch-ays"),
    metric: Annotated[
        str, typer.Option(metavar="NAME", help="Early-stopping proxy: traj or fd.")
    ] = "traj",
    num_samples: Annotated[
        int,
        typer.Option(metavar="N", help="Samples of the early-stopping proxy (search seed).", min=2),
    ] = DEFAULT_NUM_SAMPLES,
    held_out_samples: options.HeldOutSamples = DEFAULT_HELD_OUT_SAMPLES,
    seed: options.Seed = 0,
    strategy: Annotated[
        str, typer.Option(metavar="NAME", help=f"One of: {', '.join(STRATEGIES)}.")
    ] = "hierarchical",
    klub_samples: Annotated[
        int, typer.Option(metavar="N", help="KLUB Monte Carlo samples per interval.", min=2)
    ] = 64,
    teacher_steps: Annotated[
        int,
        typer.Option(metavar="N", help="Steps of the converged solve traj compares with.", min=2),
    ] = 100,
    order: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="KLUB order: 1 (paper, stochastic DDIM), 2 (multistep), 0 (by solver).",
        ),
    ] = 1,
    max_sweeps: Annotated[
        int, typer.Option(metavar="N", help="Sweeps per stage at most.", min=0)
    ] = 12,
    checkpoint: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Checkpoint to resume [default: OUT/ays.ckpt.json]."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="PNG to write [default: OUT/progress.png]."),
    ] = None,
    cache: options.Cache = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    progress: options.Progress = True,
) -> None:
    """Align Your Steps: optimise a step schedule on a KL upper bound (coordinate search).

    Writes `best_schedule.json`, `scheduler/` (diffusers), `progress.png` and the checkpoint
    `ays.ckpt.json` (rerun the same command to resume) to `--out`."""
    with usage_errors():
        config = AYSConfig(
            strategy=strategy,
            num_samples=klub_samples,
            seed=seed,
            order=order or None,
            max_sweeps=max_sweeps,
        )
        result = run_ays_job(
            model,
            nfe,
            out,
            data=data,
            pipeline=pipeline,
            guidance_scale=guidance_scale,
            solver=solver,
            config=config,
            metric=metric,
            proxy_samples=num_samples,
            held_out_samples=held_out_samples,
            teacher_steps=teacher_steps,
            checkpoint=checkpoint,
            plot=plot,
            device=device,
            dtype=dtype,
            cache_dir=cache,
            on_progress=_progress if progress else None,
        )
    sigmas = ", ".join(f"{s:.4g}" for s in result.schedule.to_kdiffusion_sigmas())
    console.print(f"chose {result.chosen}; sigmas [{sigmas}]")
    search = result.runs[result.chosen].score
    held_out = result.held_out
    assert held_out is not None
    console.print(
        f"{search.metric}: search {search.value:.4g}, held-out {held_out.value:.4g}; "
        f"{result.seconds:.1f} s"
    )
    for role in ("schedule", "scheduler", "plot"):
        if role in result.extra:
            console.print(f"  {role}: {result.extra[role]}")
    print_loading_code(result.extra.get("scheduler"))
