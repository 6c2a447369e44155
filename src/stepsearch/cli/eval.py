"""``stepsearch eval``: solvers x schedules (and diffusers baselines) side by side at several NFEs,
on an unconditional model or inside a text-to-image pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import (
    console,
    one_line_warnings,
    print_table,
    print_unreachable,
    usage_errors,
)
from stepsearch.eval.evaluate import (
    EvalInputs,
    EvalResult,
    PlanStepsOnlyWarning,
    default_metrics,
    evaluate,
    methods_from_names,
    sampling_guidance_scale,
    write_report,
)
from stepsearch.eval.experiment import METRICS, TEXT_TO_IMAGE_METRICS
from stepsearch.schedule_file import GuidanceMismatchWarning, ModelMismatchWarning
from stepsearch.solvers import BUILT_IN_SOLVERS

DEFAULT_NFES = [4, 5, 6, 8, 10]


def report(result: EvalResult, out: Path, title: str) -> None:
    """Print the tables and the skipped cells, then write everything to ``out``."""
    if not result.main_process:
        return
    for table in result.tables.values():
        print_table(table)
    print_unreachable(result.unreachable)
    write_report(result, out, title)
    console.print(
        f"wrote tables, plots and sample grids to [bold]{out}[/] in {result.seconds:.0f} s"
    )


def eval_command(
    model: options.Model = "digits",
    pipeline: Annotated[
        str | None,
        typer.Option(
            metavar="DIR",
            help="A local diffusers text-to-image pipeline directory (instead of --model).",
        ),
    ] = None,
    prompts: options.Prompts = None,
    schedules: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME|FILE...",
            help="Spacing names or schedule JSON files. [default: logsnr_uniform]",
            show_default=False,
        ),
    ] = None,
    solvers: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME...",
            help=f"Solvers: {', '.join(BUILT_IN_SOLVERS)}. [default: dpm_solver_pp_2m]",
            show_default=False,
        ),
    ] = None,
    baselines: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CLASS...",
            help="diffusers scheduler classes to run beside them (e.g. DDIMScheduler).",
        ),
    ] = None,
    nfe: Annotated[
        list[int] | None,
        typer.Option(
            metavar="N...",
            help="Model-evaluation budgets. [default: 4 5 6 8 10]",
            show_default=False,
            min=1,
            max=options.MAX_NFE,
        ),
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME...",
            help=f"{', '.join(METRICS)} (--model; acc: digits-cond); "
            f"{', '.join(TEXT_TO_IMAGE_METRICS)} "
            "(--pipeline). [default: fd traj (and acc for digits-cond); with --pipeline: clip "
            "if --clip-model is given, else traj]",
        ),
    ] = None,
    clip_model: options.ClipModel = None,
    inception_weights: options.InceptionWeights = None,
    reference_stats: options.ReferenceStats = None,
    guidance_scale: options.GuidanceScale = None,
    num_samples: Annotated[int, typer.Option(metavar="N", help="Samples per cell.", min=2)] = 1000,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the per-sample noise.")] = 0,
    out: options.OutDir = Path("stepsearch-eval"),
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    chunk_size: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Samples per model batch. [default: 250; 16 with --pipeline]",
            min=1,
        ),
    ] = None,
    save_samples: Annotated[
        bool,
        typer.Option("--save-samples", help="Also write every cell's samples under DIR/samples/."),
    ] = False,
) -> None:
    """Evaluate solvers x schedules (and diffusers baselines) at several NFEs: tables, plots,
    sample grids.

    An image model (--model) or text-to-image (--pipeline DIR --prompts FILE): image i always
    starts from the noise of its own seed (and gets prompt i mod #prompts; with --model
    digits-cond, digit i mod 10, guided at --guidance-scale), so every method sees the same
    noise. List options take several values: `--nfe 4 5 6`. Multi-GPU / multi-process:
    `accelerate launch -m stepsearch eval ...` splits the samples across processes; results do
    not depend on the number of processes.
    """
    with usage_errors():
        if pipeline is not None and model != "digits":
            raise ValueError("pass either --model or --pipeline, not both")
        with one_line_warnings(ModelMismatchWarning, GuidanceMismatchWarning, PlanStepsOnlyWarning):
            methods = methods_from_names(
                schedules or ["logsnr_uniform"],
                solvers or ["dpm_solver_pp_2m"],
                baselines or [],
                guidance_scale=sampling_guidance_scale(model, pipeline, guidance_scale),
                model=pipeline if pipeline is not None else model,
            )
        inputs = EvalInputs(
            pipeline, prompts, clip_model, inception_weights, reference_stats, guidance_scale,
            dtype,
        )  # fmt: skip
        result = evaluate(
            model,
            methods,
            nfe or DEFAULT_NFES,
            metric or default_metrics(pipeline is not None, clip_model is not None, model),
            num_samples,
            seed,
            device=device,
            chunk_size=chunk_size,
            inputs=inputs,
            samples_dir=out / "samples" if save_samples else None,
        )
        report(result, out, "stepsearch eval")
