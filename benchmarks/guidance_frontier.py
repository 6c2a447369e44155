"""Is constant guidance's FD-accuracy curve the model's own? Simple weight schedules against it.

``benchmarks/guidance.py`` finds no searched schedule below the constant-guidance curve at 16 and
32 UNet passes on ``digits-cond``. This probe asks why without a search: it samples the constant
curve and Wang et al.'s linear schedules (increasing and decreasing, several mean weights) on the
same held-out noise at a small and a large pass budget, and reports each schedule's FD margin to
the constant curve at the schedule's own accuracy (the curve interpolated in the weight, as the
guidance benchmark does), with a paired bootstrap over the shared samples. If the schedules lie on
the curve at a budget where the sampler has converged, the trade-off belongs to the guided model,
and no weight schedule can dominate constant guidance there except through discretization error.

Usage::

    python benchmarks/guidance_frontier.py --passes 16 64 --jobs 2
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

# benchmarks/guidance.py, importable because Python puts a script's own folder on sys.path
from guidance import _held_out, constant_at_accuracy, joint_margin, paired_fd_combination

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.eval.experiment import class_correct
from stepsearch.eval.report import environment
from stepsearch.eval.scoring import FeatureReference
from stepsearch.guidance import GuidanceSchedule, noise_range
from stepsearch.models import load_model
from stepsearch.search.guidance import GuidanceCandidate, condition_judge
from stepsearch.solvers import get_solver

RESULTS = Path(__file__).resolve().parent / "results"
RHO = 7.0


def run_budget(budget: int, args: argparse.Namespace) -> dict[str, Any]:
    """The constant curve and the linear schedules at ``budget`` passes, on held-out noise."""
    if args.jobs > 1:
        torch.set_num_threads(1)
    began = time.perf_counter()
    source = load_model("digits-cond")
    reference = FeatureReference.from_images(source.feature_extractor, source.reference_images)
    solver = get_solver(args.solver)
    low, high = noise_range(source.noise)

    classifier = condition_judge(source).classifier
    labels = source.labels_for(range(args.held_out_samples))

    def judge(schedule: GuidanceSchedule) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        score, features, samples = _held_out(
            source, GuidanceCandidate(schedule, RHO), solver, budget, args.held_out_samples,
            reference,
        )  # fmt: skip
        return score.to_json_dict(), features, class_correct(classifier, samples, labels).numpy()

    constants = {w: judge(GuidanceSchedule.constant(w)) for w in args.constant_weights}
    curve = {w: score for w, (score, _, _) in constants.items()}
    top = max(score["accuracy"] for score in curve.values())
    rows = []
    for increasing in [shape == "increasing" for shape in args.shapes]:
        for mean in args.mean_weights:
            schedule = GuidanceSchedule.linear(mean, low, high, increasing=increasing)
            score, features, correct = judge(schedule)
            joint = joint_margin(
                features, correct, {w: (f, c) for w, (_, f, c) in constants.items()},
                reference.statistics, args.bootstrap,
            )  # fmt: skip
            matched = constant_at_accuracy(curve, score["accuracy"])
            (w_low, w_high), t = matched["between"], matched["t"]
            beyond = score["accuracy"] > top
            margin = paired_fd_combination(  # one constant when w_low == w_high: weights add up
                [features, constants[w_low][1], constants[w_high][1]], [1.0, -(1 - t), -t],
                reference.statistics, args.bootstrap,
            )  # fmt: skip
            rows.append({
                "shape": "linear_increasing" if increasing else "linear_decreasing",
                "mean_weight": mean, **score, "constant_at_accuracy": matched,
                "beyond_constant_accuracy": beyond,
                "fd_margin": margin[0], "fd_margin_std": margin[1],
                "fd_margin_joint": joint[0], "fd_margin_std_joint": joint[1],
            })  # fmt: skip
    return {
        "unet_passes": budget,
        "constants": {str(w): score for w, score in curve.items()},
        "schedules": rows,
        "seconds": round(time.perf_counter() - began, 1),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: per budget, the constant curve and the schedules' margins to it."""
    settings = report["settings"]
    lines = [
        "# Constant guidance's FD-accuracy curve against simple weight schedules (digits-cond)",
        "",
        f"Settings: `{settings}`. Held-out seed 1, {settings['held_out_samples']} samples per "
        "schedule, every schedule on the same noise and labels. Margin: the schedule's FD minus "
        "constant guidance's at the schedule's accuracy (the curve interpolated linearly in the "
        "weight between the two constants that bracket it, as in `benchmarks/guidance.py`; a "
        "schedule more accurate than every constant is compared with the most accurate one and "
        "marked), with paired bootstrap standard errors over the shared samples: FD-only (the matched "
        "accuracy held fixed) and joint (FDs and accuracies resampled together, the curve and the "
        "matched point recomputed each time; the one that decides). Near accuracy "
        "1 the curve is nearly flat in accuracy and neighbouring accuracies differ by about their "
        "standard error (0.001 at 2,000 samples), so margins there compare FDs at accuracies "
        "that cannot be told apart: read the rows below about 0.995.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    for row in report["budgets"]:
        lines += [f"## {row['unet_passes']} UNet passes", "",
                  "| schedule | steps | FD-digits | accuracy |", "|---|---:|---:|---:|"]  # fmt: skip
        for weight, score in row["constants"].items():
            lines.append(f"| constant w={weight} | {score['num_steps']} | {score['fd']:.2f} | "
                         f"{score['accuracy']:.4f} |")  # fmt: skip
        lines += ["", "| schedule | mean weight | steps | FD-digits | accuracy | constant curve "
                  "there (weight, FD) | margin (FD-only s.e.) | margin (joint s.e.) | below the curve "
                  "(2 joint s.e.) |", "|---|---:|---:|---:|---:|---|---:|---:|---|"]  # fmt: skip
        for s in row["schedules"]:
            matched = s["constant_at_accuracy"]
            where = f"{matched['weight']:.2f}, {matched['fd']:.2f}" + (
                " (more accurate than every constant)" if s["beyond_constant_accuracy"] else ""
            )
            joint = s.get("fd_margin_joint")
            below = joint is not None and joint < -2 * s["fd_margin_std_joint"]
            joint_cell = "-" if joint is None else f"{joint:+.2f} ± {s['fd_margin_std_joint']:.2f}"
            lines.append(
                f"| {s['shape']} | {s['mean_weight']} | {s['num_steps']} | {s['fd']:.2f} | "
                f"{s['accuracy']:.4f} | {where} | {s['fd_margin']:+.2f} ± "
                f"{s['fd_margin_std']:.2f} | {joint_cell} | {'yes' if below else 'no'} |"
            )
        lines += ["", f"({row['seconds']} s)", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--held-out-samples", type=int, default=5000)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--constant-weights", type=float, nargs="+",
                        default=[1, 1.25, 1.5, 1.75, 2, 2.5, 3])  # fmt: skip
    parser.add_argument("--mean-weights", type=float, nargs="+", default=[1.25, 1.5, 1.75, 2])
    parser.add_argument("--shapes", nargs="+", choices=["increasing", "decreasing"],
                        default=["increasing", "decreasing"])  # fmt: skip
    parser.add_argument("--solver", default="dpm_solver_pp_2m")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    settings = {k: v for k, v in vars(args).items() if k not in ("results", "jobs")}
    if args.jobs > 1:
        with ProcessPoolExecutor(min(args.jobs, len(args.passes))) as pool:
            budgets = list(pool.map(run_budget, args.passes, [args] * len(args.passes)))
    else:
        budgets = [run_budget(budget, args) for budget in args.passes]
    report = {
        "settings": settings,
        "command": "python benchmarks/guidance_frontier.py " + " ".join(sys.argv[1:]),
        "budgets": budgets,
        "environment": environment(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "guidance_frontier.json", report)
    atomic_write_text(args.results / "guidance_frontier.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
