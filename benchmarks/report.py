"""Side-by-side sample-quality benchmark on the bundled digits DDPM.

Every stepsearch solver x schedule and diffusers' built-in schedulers (with their usual spacings)
generate the same samples (same per-index noise) at each NFE; FD-digits and the error to a reference
ODE solution are written to ``benchmarks/results/report_<metric>.{json,md,png}`` with the machine and
library versions. Run: ``python benchmarks/report.py`` (about 17 minutes on 2 idle CPU cores at 1,000
samples per cell); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from stepsearch._io import atomic_write_text
from stepsearch.eval.experiment import Method, load_image_model, run_experiment
from stepsearch.eval.report import ResultTable, environment

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
TITLES = {
    "fd": "FD-digits (lower is better)",
    "traj": "median RMS error to the reference ODE solution",
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
        Method.diffusers(
            "DPMSolverMultistepScheduler",
            "diffusers DPMSolverMultistepScheduler 3M (leading)",
            solver_order=3,
            timestep_spacing="leading",
        ),
        Method.diffusers("UniPCMultistepScheduler", timestep_spacing="linspace"),
        Method.diffusers("EulerDiscreteScheduler", timestep_spacing="trailing"),
        Method.diffusers("HeunDiscreteScheduler", timestep_spacing="trailing"),
    ]


def replot(directory: Path) -> None:
    """Rewrite ``report_<metric>.{md,png}`` and ``report.md`` from the saved JSON (no sampling)."""
    import json

    lines = []
    for path in sorted(directory.glob("report_*.json")):
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
    header = (directory / "report.md").read_text().split("\n## ")[0].rstrip() + "\n"
    atomic_write_text(directory / "report.md", "\n".join([header, *lines]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        replot(args.out)
        return

    solvers, schedules = SOLVERS, SCHEDULES
    if args.quick:
        args.num_samples, args.nfe = 100, [5, 10]
        solvers, schedules = ("ddim", "dpm_solver_pp_2m"), ("trailing", "logsnr_uniform")
    options = {"pndm": {"warmup": "lower_order"}}  # the RK4 warm-up alone costs 9 evaluations
    methods = baselines() + [
        Method.stepsearch(s, sch, **options.get(s, {})) for s in solvers for sch in schedules
    ]
    model = load_image_model("digits")
    start = time.perf_counter()
    tables = run_experiment(model, methods, args.nfe, args.metrics, args.num_samples, args.seed)
    seconds = time.perf_counter() - start
    context = {
        "model": "digits",
        "num_samples": args.num_samples,
        "seed": args.seed,
        "seconds": round(seconds, 1),
        "environment": environment(),
    }
    env = context["environment"]
    lines = [
        "# Sample quality vs NFE on the bundled digits DDPM\n",
        f"{args.num_samples} samples per cell, seed {args.seed}, same noise for every method; "
        f"{seconds:.0f} s on {env['cpu_count']} CPU cores ({env['processor']}), torch {env['torch']}, "
        f"diffusers {env['diffusers']}, {env['date']}. Dashed lines in the plots are diffusers' built-ins.\n",
    ]
    for metric, table in tables.items():
        table.save(args.out, f"report_{metric}", TITLES.get(metric, metric), **context)
        lines += [
            f"## {TITLES.get(metric, metric)}\n",
            table.to_markdown(),
            f"![{metric}](report_{metric}.png)\n",
        ]
    atomic_write_text(args.out / "report.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
