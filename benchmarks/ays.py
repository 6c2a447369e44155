"""Align Your Steps on the bundled digits model: optimised schedules beside the built-in spacings.

For DPM-Solver++(2M) and UniPC (bh2) at NFE 5 and 10: the AYS schedule (``search_ays``, proxy =
trajectory error on the *search* seed, 256 samples) beside the same solver on its best built-in
spacing (chosen on the search seed among time-uniform, logSNR, Karras, diffusers' trailing and
leading), the closed-form Gaussian AYS schedule (Thm 3.1, ``ays_gaussian``) and the converged
reference (DPM-Solver++(3M), 100 logSNR steps). Reported on the *held-out* seed: FD-digits and
trajectory error (median RMS to the converged solve from the same noise). Also the wall time of
each optimisation. Writes ``benchmarks/results/ays.{json,md}``.

Run: ``nice python benchmarks/ays.py`` (OMP_NUM_THREADS=1; about 10 minutes on 2 loaded CPU cores);
``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.ays.search import AYSConfig, search_ays
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.eval.report import environment
from stepsearch.eval.trajectory import per_sample_rms_error
from stepsearch.models import generate_from_source, load_source
from stepsearch.schedule import StepSchedule, ays_gaussian, make_schedule
from stepsearch.solvers import get_solver

SOLVERS = {"dpm_solver_pp_2m": "DPM-Solver++(2M)", "unipc_bh2": "UniPC (bh2)"}
SPACINGS = ("time_uniform", "logsnr_uniform", "karras", "trailing", "leading")
RESULTS = Path(__file__).resolve().parent / "results"


class HeldOut:
    """FD-digits and trajectory error of one set of held-out samples (generated once per
    schedule): the first ``count`` samples of the trajectory objective's held-out seed, compared
    with the same samples of its cached converged solve."""

    def __init__(self, traj: Objective, count: int):
        from stepsearch.eval.fid import FeatureStatistics

        self.traj, self.count = traj, count
        self.teacher = traj.teacher("held_out")[:count]
        self.reference = FeatureStatistics.from_features(traj.reference_features())

    def _fd(self, samples: torch.Tensor) -> float:
        from stepsearch.eval.features import ensure_features
        from stepsearch.eval.fid import FeatureStatistics, frechet_distance

        assert self.traj.source.features is not None
        finite = samples.clamp(-1e4, 1e4).nan_to_num(0.0)
        features = ensure_features(finite, self.traj.source.features, progress=False)
        return frechet_distance(FeatureStatistics.from_features(features), self.reference)

    def reference_row(self) -> dict[str, Any]:
        return {"fd": self._fd(self.teacher), "traj": 0.0}

    def __call__(self, schedule: StepSchedule, solver: str) -> dict[str, Any]:
        samples = generate_from_source(
            self.traj.source, get_solver(solver), schedule, self.count,
            seed=self.traj.seeds["held_out"], chunk_size=256,
        )
        errors = per_sample_rms_error(samples, self.teacher).numpy()
        return {
            "fd": self._fd(samples),
            "traj": float(np.median(errors)),
            "sigmas": [round(float(s), 5) for s in schedule.to_kdiffusion_sigmas()],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--strategy", default="direct", help="AYS strategy (direct, hierarchical)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    quick = args.quick
    nfes = (5,) if quick else (5, 10)
    held_out_samples = 64 if quick else 1000  # the cached teacher's count
    evaluated = 64 if quick else 1000  # the first samples of it that every method is scored on
    cache = TensorCache(os.environ.get("STEPSEARCH_CACHE", "/tmp/ayscache"))
    source = load_source("digits")
    noise = source.noise
    traj = Objective(
        source,
        "traj",
        num_samples=32 if quick else 256,
        held_out_samples=held_out_samples,
        cache=cache,
        bootstrap=0,
    )
    config = AYSConfig(
        strategy=args.strategy,
        num_samples=8 if quick else 32,
        max_sweeps=1 if quick else 3,
        patience=1,
    )
    began = time.perf_counter()
    held_out = HeldOut(traj, evaluated)
    rows: list[dict[str, Any]] = [
        {
            "solver": "dpm_solver_pp_3m",
            "nfe": 100,
            "schedule": "converged reference (100 logSNR steps)",
            **held_out.reference_row(),
        }
    ]
    for nfe in nfes:
        for solver in SOLVERS:
            search_scores = {
                spacing: traj(make_schedule(noise, nfe, spacing), solver).value
                for spacing in SPACINGS
            }
            best = min(search_scores, key=search_scores.get)
            rows.append(
                {
                    "solver": solver,
                    "nfe": nfe,
                    "schedule": f"best built-in ({best})",
                    **held_out(make_schedule(noise, nfe, best), solver),
                    "search_scores": search_scores,
                }
            )
            gaussian = ays_gaussian(noise, nfe)
            rows.append(
                {
                    "solver": solver,
                    "nfe": nfe,
                    "schedule": "AYS closed form (Gaussian, Thm 3.1)",
                    **held_out(gaussian, solver),
                }
            )
            start = time.perf_counter()
            result = search_ays(source, get_solver(solver), nfe, objective=traj, config=config)
            seconds = time.perf_counter() - start
            run = result.runs[result.chosen]
            rows.append(
                {
                    "solver": solver,
                    "nfe": nfe,
                    "schedule": f"AYS optimised ({result.chosen})",
                    **held_out(result.schedule, solver),
                    "seconds": seconds,
                    "klub": [entry["klub"] for state in run.stages for entry in state.history],
                    "sweeps": sum(state.sweeps for state in run.stages),
                    "stop": [state.reason for state in run.stages],
                    "klub_evaluations": result.klub_evaluations,
                }
            )
            print(rows[-3:], flush=True)
    payload = {
        "benchmark": "ays",
        "model": source.identity.to_json_dict(),
        "held_out_samples": evaluated,
        "proxy": traj.describe(),
        "ays_config": config.to_json_dict(),
        "rows": rows,
        "seconds": time.perf_counter() - began,
        "environment": environment(),
        "load_average": round(os.getloadavg()[0], 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "ays.json", payload)
    atomic_write_text(args.out / "ays.md", _markdown(payload))
    print(_markdown(payload))


def _markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Align Your Steps on the bundled digits model",
        "",
        f"Held-out seed, {payload['held_out_samples']} samples; FD-digits (lower is better; "
        "real-vs-real floor ~3) and trajectory error (median RMS to the converged solve). AYS: "
        f"KLUB with {payload['ays_config']['num_samples']} Monte Carlo samples per interval, "
        f"strategy {payload['ays_config']['strategy']}, early stopping on trajectory error "
        "(search seed, 256 samples). Generated by `benchmarks/ays.py`.",
        "",
        f"Model {payload['model']['name']} ({payload['model']['digest'][:19]}); "
        f"{payload['environment']['date']}, {payload['environment']['cpu_count']} CPU cores, "
        f"torch threads {payload['environment']['torch_threads']}, load average "
        f"{payload.get('load_average', 'n/a')} at the end (optimisation seconds are upper bounds "
        "on a shared machine).",
        "",
        "| solver | NFE | schedule | FD-digits | traj error | optimisation s | sweeps |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in payload["rows"]:
        seconds = f"{row['seconds']:.0f}" if "seconds" in row else ""
        sweeps = str(row.get("sweeps", ""))
        lines.append(
            f"| {SOLVERS.get(row['solver'], row['solver'])} | {row['nfe']} | {row['schedule']} | "
            f"{row['fd']:.1f} | {row['traj']:.4f} | {seconds} | {sweeps} |"
        )
    lines += ["", f"Total wall time {payload['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
