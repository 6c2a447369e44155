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
from stepsearch.cli._common import console, usage_errors
from stepsearch.cli.checks import check_out_file
from stepsearch.cli.search import search_command


def _progress(strategy: str, stage: int, state: SearchState) -> None:
    entry = state.history[-1]
    proxy = "" if entry["proxy"] is None else f", proxy {entry['proxy']:.4g}"
    console.print(
        f"[{strategy} stage {stage}] sweep {entry['sweep']}: KLUB {entry['klub']:.5g}, "
        f"accepted {entry['accepted']}, radius {entry['radius']:.3g}{proxy}"
        + (f" -> done ({state.reason})" if state.done else "")
    )


@search_command("ays")
def ays_command(
    model: options.Model = "digits",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Image folder or .safetensors file of images (default: the model's data); "
            "with --pipeline, a folder of (prompt, image) pairs with a metadata.jsonl "
            '(lines {"file_name": ..., "text": ...}).'
        ),
    ] = None,
    pipeline: options.Pipeline = None,
    guidance_scale: options.GuidanceScale = None,
    nfe: options.NFE = 10,
    out: Annotated[
        Path,
        typer.Option(metavar="FILE", help="Schedule file to write (JSON).", parser=check_out_file),
    ] = Path("ays.json"),
    solver: options.Solver = "dpm_solver_pp_2m",
    strategy: Annotated[str, typer.Option(help=f"One of: {', '.join(STRATEGIES)}.")] = (
        "hierarchical"
    ),
    samples: Annotated[
        int, typer.Option(help="KLUB Monte Carlo samples per interval.", min=2)
    ] = 64,
    proxy_samples: Annotated[
        int, typer.Option(help="Samples of the early-stopping proxy (search seed).", min=2)
    ] = 256,
    metric: Annotated[str, typer.Option(help="Proxy metric: traj or fd.")] = "traj",
    teacher_steps: Annotated[
        int, typer.Option(help="Steps of the converged solve traj compares with.", min=2)
    ] = 100,
    order: Annotated[
        int,
        typer.Option(help="KLUB order: 1 (paper, stochastic DDIM), 2 (multistep), 0 (by solver)."),
    ] = 1,
    max_sweeps: Annotated[int, typer.Option(help="Sweeps per stage at most.", min=0)] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the KLUB draws.")] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint to resume (default: OUT.ckpt.json).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="PNG to write (default: OUT.png).")] = None,
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
) -> None:
    """Optimise a step schedule with Align Your Steps (KL upper bound, coordinate search)."""
    with usage_errors():
        config = AYSConfig(
            strategy=strategy,
            num_samples=samples,
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
            proxy_samples=proxy_samples,
            teacher_steps=teacher_steps,
            checkpoint=checkpoint,
            plot=plot,
            device=device,
            dtype=dtype,
            on_progress=_progress,
        )
    sigmas = ", ".join(f"{s:.4g}" for s in result.schedule.to_kdiffusion_sigmas())
    console.print(f"chose {result.chosen}; sigmas [{sigmas}]")
    search = result.runs[result.chosen].score
    console.print(
        f"{search.metric}: search {search.value:.4g}, held-out {result.held_out.value:.4g}; "
        f"{result.seconds:.1f} s; wrote {out}"
        + (f" and {result.extra['plot']}" if "plot" in result.extra else "")
    )
