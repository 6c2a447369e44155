"""How much the shared Objective costs beyond the model calls it must make.

On the bundled digits model: scoring 50 five-step candidates (DPM-Solver++(2M), random schedules)
with trajectory error on 256 samples, against the same 50 x 5 UNet calls on the same batch alone.
The teacher is computed (and cached) before timing starts. Writes
benchmarks/results/objective_overhead.{json,md}.

    python benchmarks/objective_overhead.py [--candidates 50] [--samples 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.eval.report import environment
from stepsearch.models import load_source
from stepsearch.schedule import StepSchedule

RESULTS = Path(__file__).parent / "results"


def random_schedules(noise, count: int, steps: int, seed: int = 0) -> list[StepSchedule]:
    rng = np.random.default_rng(seed)
    schedules = []
    for _ in range(count):
        inner = np.sort(rng.uniform(noise.t_min, noise.t_max, steps - 1))[::-1]
        schedules.append(StepSchedule(np.array([noise.t_max, *inner, 0.0]), noise))
    return schedules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    source = load_source("digits")
    objective = Objective(
        source,
        "traj",
        num_samples=args.samples,
        solver="dpm_solver_pp_2m",
        cache=TensorCache(None),
        chunk_size=args.samples,
    )
    objective.teacher()  # computed once, outside the timing
    schedules = random_schedules(source.noise, args.candidates, args.steps)
    denoiser = source.denoiser(range(args.samples))
    x = torch.randn(args.samples, *source.sample_shape)

    def model_calls_only() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for schedule in schedules:
                for t in schedule.times[:-1]:
                    denoiser(x, float(t))
        return time.perf_counter() - start

    def objective_calls() -> float:
        start = time.perf_counter()
        for schedule in schedules:
            objective(schedule)
        return time.perf_counter() - start

    rounds = []
    for _ in range(3):  # interleaved, so machine load hits both alike
        rounds.append((model_calls_only(), objective_calls()))
    model_seconds = min(r[0] for r in rounds)
    objective_seconds = min(r[1] for r in rounds)
    ratio = objective_seconds / model_seconds
    payload = {
        "candidates": args.candidates,
        "samples": args.samples,
        "steps": args.steps,
        "model_calls_seconds": model_seconds,
        "objective_seconds": objective_seconds,
        "ratio": ratio,
        "rounds": rounds,
        "environment": environment(),
    }
    atomic_write_json(RESULTS / "objective_overhead.json", payload)
    atomic_write_text(
        RESULTS / "objective_overhead.md",
        "# Objective overhead\n\n"
        f"{args.candidates} candidates x {args.steps} steps, {args.samples} samples, bundled digits "
        "model, trajectory error (teacher cached), best of 3 interleaved rounds.\n\n"
        "| | seconds |\n| --- | ---: |\n"
        f"| model calls alone | {model_seconds:.3f} |\n"
        f"| Objective (sampling + scoring) | {objective_seconds:.3f} |\n"
        f"| ratio | **{ratio:.3f}** |\n",
    )
    print(json.dumps({k: v for k, v in payload.items() if k != "environment"}, indent=2))


if __name__ == "__main__":
    main()
