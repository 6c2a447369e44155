"""``optimize --dry-run``'s time forecast against the run it forecasts (issue 24: within ±30% on 2
idle cores).

Forecasts the demo (``stepsearch demo --dry-run``: the bundled digits model, NFE 4 5 6, DP, OLSS,
AutoDiffusion and S³ at the demo's work budget and sample counts), then runs it with an empty cache
(the forecast counts the teachers: a cached teacher would make the run cheaper than forecast) and
times it. ``--nfe`` and ``--budget-evals`` forecast and run a larger optimize with the demo's
sample counts. Writes ``benchmarks/results/forecast.{json,md}``.

Run on idle cores: ``python benchmarks/forecast.py`` (about 3.5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.cache import TensorCache
from stepsearch.cli.demo import DEMO_METHODS, DEMO_NFES
from stepsearch.eval.report import environment
from stepsearch.search.optimize import DEMO_BUDGET_EVALS, demo_settings, optimize
from stepsearch.search.optimize.forecast import forecast

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 0.30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=DEMO_NFES)
    parser.add_argument("--budget-evals", type=int, default=DEMO_BUDGET_EVALS)
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    settings = demo_settings()
    with tempfile.TemporaryDirectory() as scratch:
        began = time.perf_counter()
        planned = forecast(
            "digits", args.nfe, DEMO_METHODS, args.budget_minutes,
            budget_evals=args.budget_evals, settings=settings,
        )  # fmt: skip
        dry_run_seconds = time.perf_counter() - began
        began = time.perf_counter()
        result = optimize(
            "digits", args.nfe, DEMO_METHODS, args.budget_minutes, Path(scratch) / "run",
            budget_evals=args.budget_evals, settings=settings,
            cache=TensorCache(Path(scratch) / "cache"),
        )  # fmt: skip
        actual = time.perf_counter() - began
    ratio = planned.seconds / actual
    payload = {
        "command": f"stepsearch optimize --model digits --nfe {' '.join(map(str, args.nfe))} "
        f"--budget-evals {args.budget_evals} (demo settings, empty cache)",
        "forecast": planned.to_json_dict(),
        "dry_run_seconds": dry_run_seconds,
        "actual_seconds": actual,
        "forecast_over_actual": ratio,
        "within_tolerance": abs(ratio - 1.0) <= TOLERANCE,
        "tolerance": TOLERANCE,
        "partial": result.report.get("partial"),
        "torch_threads": torch.get_num_threads(),
        "environment": environment(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "forecast.json", payload)
    phases: dict[str, list[float]] = {}
    for stage in planned.stages:
        totals = phases.setdefault(stage.phase, [0, 0.0])
        totals[0] += stage.evaluations or 0
        totals[1] += planned.seconds_of(stage) or 0.0
    env = payload["environment"]
    lines = [
        "# `optimize --dry-run`: forecast vs the run",
        "",
        f"`{payload['command']}`; {env['cpu_count']} CPUs, torch {env['torch']}, "
        f"{payload['torch_threads']} thread(s), {env['date'][:10]}.",
        "",
        "| phase | model evaluations | forecast (s) |",
        "| --- | ---: | ---: |",
        *(f"| {phase} | {count:,} | {seconds:.0f} |" for phase, (count, seconds) in phases.items()),
        f"| **whole run** | {planned.evaluations:,} | {planned.seconds:.0f} |",
        "",
        f"Measured: {planned.seconds_per_evaluation * 1e6:.0f} µs per model sample-evaluation "
        f"(one timed batch; the dry run took {dry_run_seconds:.0f} s). Actual run: "
        f"{actual:.0f} s. Forecast / actual: **{ratio:.2f}** (goal within ±{TOLERANCE:.0%}: "
        f"{'yes' if payload['within_tolerance'] else 'no'}). The forecast counts model calls only "
        "(DP's coefficient tables, S³'s predictor and FD features are not in it).",
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(args.results / "forecast.md", text)
    print(text)


if __name__ == "__main__":
    main()
