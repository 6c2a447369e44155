"""The DP search's solver-coefficient tables: closed form vs one-hot ``solver.step`` probing.

For each solver, every coefficient table the DP needs (one per distinct layer rule: the first step
and, for multistep solvers, the history-reading step) is computed on a ``G``-point grid (default
100, logSNR-uniform on Stable Diffusion's scaled-linear VP schedule) twice: by the old reference
path (``step_coefficients(method="one_hot")``: one ``solver.step`` per index tuple, 161,700 for a
multistep solver at ``G = 100``) and by the default closed form
(:mod:`stepsearch.search.dp_coefficients`). Reported: wall time of each (the closed form as the
median of ``--repeats`` runs), the speed-up, and the largest relative difference between the two
tables. Issue 24's target: a multistep table on 100 points in <= 5 s on one core.

Run: ``OMP_NUM_THREADS=1 python benchmarks/dp_coefficients.py`` (a few minutes on one core: the
one-hot path dominates); ``--quick`` for a smoke run on a 30-point grid. Writes
``benchmarks/results/dp_coefficients.{json,md}`` with the machine and library versions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.eval.report import environment
from stepsearch.noise import DiscreteVP
from stepsearch.search import dynamic
from stepsearch.solvers import get_solver

SOLVERS = ("ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh2")
NUM_STEPS = 6  # enough steps for every layer rule of the solvers above to appear


def tables(solver_name: str, grid: Any, method: str) -> tuple[float, list[np.ndarray]]:
    """Seconds to compute every distinct coefficient table of ``solver_name``, and the tables."""
    rules = {r.key: r for r in dynamic.layer_rules(get_solver(solver_name), NUM_STEPS)}
    started = time.perf_counter()
    out = [dynamic.step_coefficients(rule, grid, method=method) for rule in rules.values()]
    return time.perf_counter() - started, out


def max_relative_difference(fast: list[np.ndarray], reference: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(fast, reference, strict=True):
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return float("inf")
        valid = ~np.isnan(b)
        scale = np.maximum(np.abs(b[valid]), 1e-300)
        worst = max(worst, float(np.max(np.abs(a[valid] - b[valid]) / scale)))
    return worst


def measure(solver_name: str, grid: Any, repeats: int) -> dict[str, Any]:
    one_hot_s, reference = tables(solver_name, grid, "one_hot")
    runs = [tables(solver_name, grid, "closed_form") for _ in range(repeats)]
    closed_form_s = statistics.median(seconds for seconds, _ in runs)
    fast = runs[0][1]
    return {
        "solver": solver_name,
        "tables": len(reference),
        "depth": max(table.ndim - 3 for table in reference),
        "coefficients": int(sum(np.count_nonzero(~np.isnan(t[..., 0])) for t in reference)),
        "one_hot_s": one_hot_s,
        "closed_form_s": closed_form_s,
        "speedup": one_hot_s / closed_form_s,
        "max_relative_difference": max_relative_difference(fast, reference),
        "bitwise_equal": all(
            np.array_equal(a, b, equal_nan=True) for a, b in zip(fast, reference, strict=True)
        ),
    }


def markdown(results: list[dict[str, Any]], env: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [
        "# DP solver-coefficient tables: closed form vs one-hot `solver.step`",
        "",
        f"Grid of {settings['grid_points']} points ({settings['spacing']}, SD scaled-linear VP), "
        f"every distinct layer rule of a {NUM_STEPS}-step schedule; closed form: median of "
        f"{settings['repeats']} runs. Issue 24 target: multistep table on 100 points <= 5 s on "
        "one core.",
        "",
        f"Machine: {env['processor']} ({env['cpu_count']} CPUs, torch threads "
        f"{env['torch_threads']}, OMP_NUM_THREADS={settings['omp_threads']}). Python "
        f"{env['python']}, torch {env['torch']}, numpy {env['numpy']}, stepsearch "
        f"{env['stepsearch']}. Date {env['date']}.",
        "",
        "| solver | tables (max depth) | index tuples | one-hot s | closed form s | speed-up "
        "| max rel. diff | bitwise equal |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r['solver']}` | {r['tables']} ({r['depth']}) | {r['coefficients']:,} | "
            f"{r['one_hot_s']:.2f} | {r['closed_form_s']:.4f} | {r['speedup']:,.0f}x | "
            f"{r['max_relative_difference']:.1e} | {'yes' if r['bitwise_equal'] else 'no'} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=100, help="grid points G")
    parser.add_argument("--repeats", type=int, default=5, help="closed-form runs (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run (30-point grid)")
    parser.add_argument("--solvers", nargs="*", default=list(SOLVERS), help="solver names")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="output folder"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = 30 if args.quick else args.grid
    noise = DiscreteVP.from_diffusers_config({"beta_schedule": "scaled_linear"})
    grid = dynamic.fine_grid(noise, size, "logsnr_uniform")
    results = []
    for name in args.solvers:
        result = measure(name, grid, args.repeats)
        results.append(result)
        print(
            f"{name:18s} one-hot {result['one_hot_s']:8.2f} s  closed form "
            f"{result['closed_form_s']:.4f} s  max rel diff {result['max_relative_difference']:.1e}",
            flush=True,
        )
    env = environment()
    settings = {
        "grid_points": size,
        "spacing": "logsnr_uniform",
        "repeats": args.repeats,
        "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
    }
    stem = "dp_coefficients_quick" if args.quick else "dp_coefficients"
    payload = {"environment": env, "settings": settings, "results": results}
    atomic_write_json(args.out / f"{stem}.json", payload)
    atomic_write_text(args.out / f"{stem}.md", markdown(results, env, settings))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
