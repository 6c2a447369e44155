"""``stepsearch eval`` and ``stepsearch demo``: side-by-side sampler evaluation with tables and plots."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from stepsearch._io import atomic_write_bytes, atomic_write_text
from stepsearch.eval.experiment import (
    METRICS,
    Method,
    default_methods,
    load_image_model,
    run_experiment,
)
from stepsearch.eval.report import ResultTable, environment, save_sample_grid
from stepsearch.schedule import SPACINGS, StepSchedule
from stepsearch.solvers import SOLVERS

console = Console()

METRIC_TITLES = {
    "fd": "Fréchet distance to real data (FD-digits for the bundled model)",
    "kid": "KID x 1e3",
    "traj": "median RMS error to a reference ODE solution (same noise)",
}


def _accelerator() -> Any | None:
    """An ``accelerate`` Accelerator when launched with several processes, else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def _methods(schedules: list[str], solvers: list[str], baselines: list[str]) -> list[Method]:
    methods = [Method.diffusers(name) for name in baselines]
    for schedule_spec in schedules:
        if schedule_spec in SPACINGS:
            schedule: str | StepSchedule = schedule_spec
        else:
            path = Path(schedule_spec)
            if not path.is_file():
                raise ValueError(
                    f"{schedule_spec!r} is neither a spacing ({', '.join(SPACINGS)}) nor a file"
                )
            loaded = StepSchedule.load(path)
            schedule = loaded.with_metadata(name=path.stem)
        for solver in solvers:
            if solver not in SOLVERS:
                raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
            methods.append(Method.stepsearch(solver, schedule))
    return methods


def _print_table(table: ResultTable) -> None:
    best = {nfe: table.best(nfe) for nfe in table.nfes}
    view = Table(title=METRIC_TITLES.get(table.metric, table.metric))
    view.add_column("method")
    for nfe in table.nfes:
        view.add_column(f"NFE {nfe}", justify="right")
    for method in table.methods:
        cells = []
        for nfe in table.nfes:
            value = table.value(method, nfe)
            text = "–" if value is None else f"{value:.3g}"
            cells.append(f"[bold green]{text}[/]" if best[nfe] == method else text)
        view.add_row(method, *cells)
    console.print(view)


def evaluate(
    model_spec: str,
    methods: list[Method],
    nfes: list[int],
    metrics: list[str],
    num_samples: int,
    seed: int,
    out: Path,
    device: str,
    chunk_size: int,
    title: str,
    save_samples: bool = False,
) -> dict[str, ResultTable]:
    """Run, print and write everything (only the main process writes)."""
    accelerator = _accelerator()
    main = accelerator is None or accelerator.is_main_process
    model = load_image_model(model_spec, device=device)
    grids: dict[int, list[tuple[str, Any]]] = {}

    def keep_grid(method: Method, nfe: int, samples: Any) -> None:
        grids.setdefault(nfe, []).append((method.label, samples[:16]))
        if save_samples and main:
            from safetensors.torch import save

            name = re.sub(r"[^A-Za-z0-9]+", "_", method.label).strip("_")
            atomic_write_bytes(
                out / "samples" / f"{name}_nfe{nfe}.safetensors",
                save({"samples": samples.contiguous()}),
            )

    start = time.perf_counter()
    tables = run_experiment(
        model, methods, nfes, metrics, num_samples, seed, accelerator, chunk_size, keep_grid
    )
    seconds = time.perf_counter() - start
    if not main:
        return tables
    context = {
        "model": model_spec,
        "num_samples": num_samples,
        "seed": seed,
        "seconds": round(seconds, 1),
        "environment": environment(),
    }
    summary = [
        f"# {title}\n",
        f"model `{model_spec}`, {num_samples} samples per cell, seed {seed}, {seconds:.0f} s\n",
    ]
    for metric, table in tables.items():
        _print_table(table)
        table.save(out, f"results_{metric}", METRIC_TITLES.get(metric, metric), **context)
        summary += [
            f"## {METRIC_TITLES.get(metric, metric)}\n",
            table.to_markdown(),
            f"![{metric}](results_{metric}.png)\n",
        ]
    for nfe, rows in grids.items():
        save_sample_grid(
            rows,
            out / f"samples_nfe{nfe}.png",
            f"first 16 samples at NFE {nfe} (same noise in every row)",
        )
    atomic_write_text(out / "summary.md", "\n".join(summary))
    console.print(f"wrote tables, plots and sample grids to [bold]{out}[/] in {seconds:.0f} s")
    return tables


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``demo`` to the ``stepsearch`` command."""

    @app.command("eval")
    def eval_command(
        model: Annotated[
            str, typer.Option(help="'digits' (bundled) or a local diffusers UNet2DModel directory.")
        ] = "digits",
        schedules: Annotated[
            list[str], typer.Option(help="Spacing names or schedule JSON files.")
        ] = ["logsnr_uniform"],
        solvers: Annotated[list[str], typer.Option(help=f"Solvers: {', '.join(SOLVERS)}.")] = [
            "dpm_solver_pp_2m"
        ],
        baselines: Annotated[
            list[str], typer.Option(help="diffusers scheduler classes to run beside them.")
        ] = [],
        nfe: Annotated[list[int], typer.Option(help="Model-evaluation budgets.")] = [
            4,
            5,
            6,
            8,
            10,
        ],
        metric: Annotated[list[str], typer.Option(help=f"Metrics: {', '.join(METRICS)}.")] = [
            "fd",
            "traj",
        ],
        num_samples: Annotated[int, typer.Option(help="Samples per cell.", min=2)] = 1000,
        seed: Annotated[int, typer.Option(help="Seed of the per-sample noise.")] = 0,
        out: Annotated[Path, typer.Option(help="Output directory.")] = Path("stepsearch-eval"),
        device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
        chunk_size: Annotated[int, typer.Option(help="Samples per model batch.", min=1)] = 250,
        save_samples: Annotated[
            bool,
            typer.Option(help="Also write every cell's samples as safetensors under out/samples/."),
        ] = False,
    ) -> None:
        """Evaluate solvers x schedules (and diffusers baselines) at several NFEs: tables, plots, grids.

        Multi-GPU / multi-process: ``accelerate launch -m stepsearch eval ...`` splits the samples
        across processes; results do not depend on the number of processes.
        """
        try:
            methods = _methods(schedules, solvers, baselines)
            evaluate(
                model,
                methods,
                nfe,
                metric,
                num_samples,
                seed,
                out,
                device,
                chunk_size,
                "stepsearch eval",
                save_samples,
            )
        except (ValueError, FileNotFoundError) as error:
            console.print(f"[red]error:[/red] {error}")
            raise typer.Exit(2) from None

    @app.command("demo")
    def demo_command(
        out: Annotated[Path, typer.Option(help="Output directory.")] = Path("stepsearch-demo"),
        num_samples: Annotated[int, typer.Option(help="Samples per cell.", min=2)] = 500,
        nfe: Annotated[list[int], typer.Option(help="Model-evaluation budgets.")] = [
            4,
            5,
            6,
            8,
            10,
        ],
        seed: Annotated[int, typer.Option(help="Seed of the per-sample noise.")] = 0,
        device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    ) -> None:
        """The main job on the bundled digits model: diffusers' DDIM, DPM-Solver++, UniPC and Euler
        with their spacings vs stepsearch solvers and schedules, FD-digits and trajectory error at
        NFE 4-10 (a few minutes on 2 CPU cores)."""
        evaluate(
            "digits",
            default_methods(),
            nfe,
            ["fd", "traj"],
            num_samples,
            seed,
            out,
            device,
            250,
            "stepsearch demo: bundled digits DDPM",
        )
