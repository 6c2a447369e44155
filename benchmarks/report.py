"""Side-by-side sample-quality benchmark on a bundled digits model (``--model``).

Every stepsearch solver x schedule and diffusers' built-in schedulers (with their usual spacings)
generate the same samples (same per-index noise) at each NFE; FD-digits and the error to a reference
ODE solution are written to ``benchmarks/results/report_<metric>.{json,md,png}`` with the machine and
library versions. Run: ``python benchmarks/report.py`` (about 17 minutes on 2 idle CPU cores at 1,000
samples per cell); ``--quick`` for a smoke run.

``--model digits-flow``: the rectified-flow twin, with diffusers' flow schedulers
(``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``, DPM-Solver++ and UniPC
on flow sigmas) and the spacings that exist on a flow; files ``report_digits-flow_<metric>.*``.
``--model digits-cond``: the class-conditional DDPM at each ``--guidance`` (default 1, 2, 4; sample
``i`` asks for digit ``i mod 10``), with the bundled classifier's accuracy on the requested digit
(``acc``) beside FD; files ``report_digits-cond_w<G>_<metric>.*`` and ``report_digits-cond.md``.
About three times the DDPM's time per guidance scale above 1 (two UNet calls per step).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from stepsearch._io import atomic_write_text
from stepsearch.eval.experiment import run_experiment
from stepsearch.eval.report import ResultTable, environment
from stepsearch.models import Method, dpm_solver_3m_leading, load_image_model

SOLVERS = (
    "ddim",
    "pndm",
    "dpm_solver_2",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_3m",
    "unipc_bh2",
    "heun",
)
SCHEDULES = ("trailing", "time_uniform", "logsnr_uniform", "karras", "ays_gaussian")
FLOW_SCHEDULES = ("flow_shifted", "time_uniform", "ays_gaussian")
"""On a rectified flow ``t_max`` has ``alpha = 0``: logSNR / Karras spacings pile up at ``t = 1``
and diffusers' timestep spacings do not apply."""
MODELS = ("digits", "digits-flow", "digits-cond")
GUIDANCE = (1.0, 2.0, 4.0)
TITLES = {
    "fd": "FD-digits (lower is better)",
    "traj": "median RMS error to the reference ODE solution",
    "acc": "classifier accuracy on the requested digit (higher is better)",
}


def baselines() -> list[Method]:
    """diffusers' built-ins, each with the spacing its docs recommend or its default."""
    return [
        Method.diffusers(
            "DDIMScheduler",
            timestep_spacing="leading",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        ),
        Method.diffusers("DDIMScheduler", timestep_spacing="trailing", clip_sample=False),
        Method.diffusers(
            "PNDMScheduler",
            "diffusers PNDMScheduler (PLMS, leading)",
            skip_prk_steps=True,
            timestep_spacing="leading",
        ),
        Method.diffusers("DPMSolverMultistepScheduler", timestep_spacing="linspace"),
        Method.diffusers("DPMSolverMultistepScheduler", timestep_spacing="trailing"),
        dpm_solver_3m_leading(),
        Method.diffusers("UniPCMultistepScheduler", timestep_spacing="linspace"),
        Method.diffusers("EulerDiscreteScheduler", timestep_spacing="trailing"),
        Method.diffusers("HeunDiscreteScheduler", timestep_spacing="trailing"),
    ]


def flow_baselines(shift: float) -> list[Method]:
    """diffusers' flow schedulers at the model's shift (DPM-Solver++ / UniPC on flow sigmas)."""
    flow = {"use_flow_sigmas": True, "flow_shift": shift, "prediction_type": "flow_prediction"}
    return [
        Method.diffusers("FlowMatchEulerDiscreteScheduler"),
        Method.diffusers("FlowMatchHeunDiscreteScheduler"),
        Method.diffusers(
            "DPMSolverMultistepScheduler", "diffusers DPMSolverMultistep (flow)", **flow
        ),
        Method.diffusers("UniPCMultistepScheduler", "diffusers UniPCMultistep (flow)", **flow),
    ]


def fd_with_accuracy(fd: ResultTable, acc: ResultTable) -> str:
    """A markdown table of ``FD (accuracy)`` per method and NFE."""
    lines = [
        "| method | " + " | ".join(f"NFE {n}" for n in fd.nfes) + " |",
        "| --- |" + " --- |" * len(fd.nfes),
    ]
    for method in fd.methods:
        cells = []
        for nfe in fd.nfes:
            value, accuracy = fd.value(method, nfe), acc.value(method, nfe)
            cells.append("–" if value is None else f"{value:.3g} ({accuracy:.2f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def replot(directory: Path, model: str = "digits") -> None:
    """Rewrite ``model``'s ``report*_<metric>.{md,png}`` and its ``report*.md`` from the saved
    JSON (no sampling; the FD (accuracy) tables of ``digits-cond`` are not redrawn)."""
    import json

    lines = []
    if model == "digits":
        paths = [directory / f"report_{metric}.json" for metric in TITLES]
        paths = [path for path in paths if path.is_file()]
    else:
        paths = sorted(directory.glob(f"report_{model}_*.json"))
    summary = directory / ("report.md" if model == "digits" else f"report_{model}.md")
    for path in paths:
        payload = json.loads(path.read_text())
        table = ResultTable.from_json_dict(payload)
        context = {
            k: v for k, v in payload.items() if k not in ("metric", "lower_is_better", "cells")
        }
        table.save(directory, path.stem, TITLES.get(table.metric, table.metric), **context)
        lines += [
            f"## {TITLES.get(table.metric, table.metric)}\n",
            table.to_markdown(),
            f"![{table.metric}]({path.stem}.png)\n",
        ]
    header = summary.read_text().split("\n## ")[0].rstrip() + "\n"
    atomic_write_text(summary, "\n".join([header, *lines]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="digits")
    parser.add_argument(
        "--guidance", type=float, nargs="+", help="digits-cond guidance scales [1 2 4]"
    )
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    parser.add_argument("--metrics", nargs="+", default=["fd", "traj"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--quick", action="store_true", help="100 samples, NFE 5 and 10, fewer methods"
    )
    parser.add_argument("--replot", action="store_true", help="re-render md/png from the JSON")
    args = parser.parse_args()
    if args.replot:
        replot(args.out, args.model)
        return

    solvers, schedules = SOLVERS, SCHEDULES
    if args.model == "digits-flow":
        schedules = FLOW_SCHEDULES
    if args.quick:
        args.num_samples, args.nfe = 100, [5, 10]
        solvers = ("ddim", "dpm_solver_pp_2m")
        schedules = schedules[:2] if args.model == "digits-flow" else ("trailing", "logsnr_uniform")
    options = {"pndm": {"warmup": "lower_order"}}  # the RK4 warm-up alone costs 9 evaluations
    if args.model == "digits-flow":
        solvers = tuple(s for s in solvers if s != "pndm")  # PNDM is a DDPM-only method
        shift = float(load_image_model(args.model).scheduler_config.get("shift", 1.0))
        diffusers_methods = flow_baselines(shift)
    else:
        diffusers_methods = baselines()
    if args.quick and args.model != "digits":
        diffusers_methods = diffusers_methods[:2]
    methods = diffusers_methods + [
        Method.stepsearch(s, sch, **options.get(s, {})) for s in solvers for sch in schedules
    ]
    conditional = args.model == "digits-cond"
    scales: list[float | None] = list(args.guidance or GUIDANCE) if conditional else [None]
    if args.guidance and not conditional:
        parser.error("--guidance is for --model digits-cond")
    metrics = list(args.metrics) + (["acc"] if conditional and "acc" not in args.metrics else [])
    names = {"digits": "the bundled digits DDPM", "digits-flow": "the rectified-flow twin",
             "digits-cond": "the class-conditional DDPM (digit i mod 10, classifier-free guidance)"}  # fmt: skip
    start_all = time.perf_counter()
    sections = []
    for scale in scales:
        model = load_image_model(args.model, guidance_scale=scale)
        start = time.perf_counter()
        tables = run_experiment(model, methods, args.nfe, metrics, args.num_samples, args.seed)
        seconds = time.perf_counter() - start
        context = {
            "model": args.model,
            "num_samples": args.num_samples,
            "seed": args.seed,
            "seconds": round(seconds, 1),
            "environment": environment(),
        }
        stem = "report" if args.model == "digits" else f"report_{args.model}"
        if scale is not None:
            context.update(guidance_scale=scale, labels="index mod 10")
            stem += f"_w{scale:g}"
        if scale is not None:
            sections += [
                f"## Guidance {scale:g}: FD-digits (accuracy on the requested digit)\n",
                fd_with_accuracy(tables["fd"], tables["acc"]) if "fd" in tables else "",
            ]
        for metric, table in tables.items():
            table.save(args.out, f"{stem}_{metric}", TITLES.get(metric, metric), **context)
            heading = TITLES.get(metric, metric) + (f", guidance {scale:g}" if scale else "")
            sections += [
                f"## {heading}\n",
                table.to_markdown(),
                f"![{metric}]({stem}_{metric}.png)\n",
            ]
    seconds = time.perf_counter() - start_all
    env = environment()
    lines = [
        f"# Sample quality vs NFE on {names[args.model]}\n",
        f"{args.num_samples} samples per cell, seed {args.seed}, same noise for every method; "
        f"{seconds:.0f} s on {env['cpu_count']} CPU cores ({env['processor']}), torch {env['torch']}, "
        f"diffusers {env['diffusers']}, {env['date']}. Dashed lines in the plots are diffusers' built-ins.\n",
        *sections,
    ]
    name = "report.md" if args.model == "digits" else f"report_{args.model}.md"
    atomic_write_text(args.out / name, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
