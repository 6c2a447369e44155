"""The option types the commands share, defined once (typer ``Annotated`` types).

A command declares ``model: options.Model = "digits"``; the flag name comes from the parameter,
the default from the command (so each command keeps its own), the help, metavar and validation
(``min=``) from here. Validation that needs the library (solver names, reachable NFEs, model
folders) is the library's: its ``ValueError`` becomes one ``error: ...`` line
(:func:`~stepsearch.cli._common.usage_errors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli.checks import (
    check_budget_minutes,
    check_clip_model,
    check_device,
    check_dtype,
    check_guidance_schedule,
    check_inception_weights,
    check_model,
    check_out_dir,
    check_out_file,
    check_reference_stats,
    check_storage,
)

MAX_NFE = 1000
"""The largest NFE an option accepts (a discrete model has 1000 trained steps at most, and a
larger budget is no few-step search)."""

__all__ = [
    "MAX_NFE",
    "NFE",
    "Budget",
    "BudgetEvals",
    "BudgetMinutes",
    "Cache",
    "ClipModel",
    "Device",
    "Dtype",
    "GuidanceScale",
    "GuidanceScheduleChoice",
    "HeldOutSamples",
    "InceptionWeights",
    "Metric",
    "Model",
    "NFEs",
    "NumSamples",
    "OptionalMetric",
    "OptionalModel",
    "OutDir",
    "OutFile",
    "Pipeline",
    "Progress",
    "Prompts",
    "ReferenceStats",
    "Seed",
    "SelectSamples",
    "Solver",
    "Storage",
    "StudyName",
    "TeacherSamples",
    "WorkerName",
]

_MODEL_HELP = (
    "`digits`, `digits-flow`, `digits-cond` (sample i asks for digit i mod 10) or a local "
    "diffusers UNet2DModel directory with its scheduler config."
)

Model = Annotated[str, typer.Option(metavar="NAME|DIR", help=_MODEL_HELP, parser=check_model)]
OptionalModel = Annotated[
    str | None,
    typer.Option(
        metavar="NAME|DIR",
        help=_MODEL_HELP + " [default: digits, unless --pipeline]",
        show_default=False,
        parser=check_model,
    ),
]
Pipeline = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="A local diffusers text-to-image pipeline directory (model_index.json; Stable "
        "Diffusion 1.x / 2.x, SDXL) instead of --model.",
    ),
]
Prompts = Annotated[
    Path | None,
    typer.Option(metavar="FILE", help="One prompt per line (with --pipeline; cycled)."),
]
ClipModel = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="Local CLIP model directory (the CLIP score of image and prompt, with --pipeline).",
        parser=check_clip_model,
    ),
]
InceptionWeights = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="inception-2015-12-05.pt or a folder holding it: the Inception features of FID "
        "(and KID). [default: $STEPSEARCH_INCEPTION_WEIGHTS, else the usual caches]",
        parser=check_inception_weights,
        show_default=False,
    ),
]
ReferenceStats = Annotated[
    Path | None,
    typer.Option(
        metavar="PATH",
        help="FID / KID reference: an .npz from `stepsearch stats`, or a folder (or "
        ".safetensors) of images (KID needs images).",
        parser=check_reference_stats,
    ),
]
GuidanceScheduleChoice = Annotated[
    str | None,
    typer.Option(
        metavar="search|FILE",
        help="A classifier-free guidance weight per noise level for a class-conditional model: "
        "`search` searches one first (`stepsearch search guidance`'s search at twice the largest "
        "NFE in network passes, its pick used by every sampler of the run), or a guidance.json.",
        parser=check_guidance_schedule,
        show_default=False,
    ),
]
GuidanceScale = Annotated[
    float | None,
    typer.Option(
        metavar="G",
        help="Classifier-free guidance (--pipeline, or --model digits-cond; 1: the conditional "
        "branch alone). [default: 7.5; 2 for digits-cond]",
        show_default=False,
    ),
]
NFE = Annotated[
    int, typer.Option(metavar="N", help="Model evaluations per sample.", min=1, max=MAX_NFE)
]
NFEs = Annotated[
    list[int] | None,
    typer.Option(metavar="N...", help="Model-evaluation budgets. [default: 4 6 8]",
                 show_default=False, min=1, max=MAX_NFE),
]  # fmt: skip
Solver = Annotated[
    str, typer.Option(metavar="NAME", help="The solver the schedule is searched for.")
]
Metric = Annotated[str, typer.Option(metavar="NAME", help="Objective: traj, fd or kid.")]
OptionalMetric = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Objective: traj, fd or kid. [default: fd; traj with --pipeline]",
        show_default=False,
    ),
]
TeacherSamples = Annotated[
    int, typer.Option(metavar="N", help="Teacher trajectories (converged solves) fitted on.", min=2)
]
Budget = Annotated[
    int, typer.Option(metavar="N", help="Trials (candidates evaluated) in all.", min=1)
]
NumSamples = Annotated[
    int, typer.Option(metavar="N", help="Samples per candidate (search seed).", min=2)
]
HeldOutSamples = Annotated[
    int, typer.Option(metavar="N", help="Samples for the held-out scores.", min=2)
]
Seed = Annotated[
    int,
    typer.Option(
        metavar="N",
        help="Seed of the search: its noise (held-out noise: seed + 1) and its random draws.",
    ),
]
OutDir = Annotated[
    Path, typer.Option(metavar="DIR", help="Output directory.", parser=check_out_dir)
]
OutFile = Annotated[Path, typer.Option(metavar="FILE", help="Output file.", parser=check_out_file)]
BudgetMinutes = Annotated[
    float,
    typer.Option(
        metavar="M",
        help="Wall-clock minutes: with --budget-evals an upper bound (no search stage starts "
        "after it; the report says by how much judging overran it), else the searches' time "
        "(AutoDiffusion and S³ get what the cheap searches leave).",
        parser=check_budget_minutes,
    ),
]
BudgetEvals = Annotated[
    int | None,
    typer.Option(
        metavar="N",
        help="Work budget in model evaluations (one sample through one model call) for the "
        "AutoDiffusion and S³ stages, split evenly over them (a trial costs NUM_SAMPLES x NFE): "
        "every family runs at every NFE and the result is the same on any machine.",
        min=1,
        show_default=False,
    ),
]
SelectSamples = Annotated[
    int, typer.Option(metavar="N", help="Samples per candidate on the selection seed.", min=2)
]
Storage = Annotated[
    str | None,
    typer.Option(
        metavar="FILE|URL",
        help="Study store: a SQLite file or a database URL (postgresql://...) shared by "
        "workers. Default: OUT/study.sqlite3.",
        parser=check_storage,
    ),
]
StudyName = Annotated[
    str | None, typer.Option(metavar="NAME", help="Study name (default from the settings).")
]
WorkerName = Annotated[
    str | None, typer.Option(metavar="NAME", help="Label of this worker's trials.")
]
Cache = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="Tensor cache (teachers, features). [default: $STEPSEARCH_CACHE or "
        "~/.cache/stepsearch]",
        show_default=False,
    ),
]
Device = Annotated[
    str, typer.Option(metavar="NAME", help="torch device (cpu, cuda, cuda:N).", parser=check_device)
]
Dtype = Annotated[
    str,
    typer.Option(
        metavar="NAME",
        help="What the network runs in: float32, float16 (GPU) or bfloat16; samples and solver "
        "maths stay float32.",
        parser=check_dtype,
    ),
]
Progress = Annotated[bool, typer.Option(help="Show progress as it goes.")]
