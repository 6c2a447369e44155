"""OLSS on the bundled digits DDPM: held-out trajectory error and FD-digits against the built-ins.

For each NFE, OLSS is fitted on 64 teacher trajectories (DPM-Solver++(3M), 100 logSNR steps, search
seed 0; path: best of the greedy / uniform / DP searches by endpoint fit error, rollout fit) and
scored on 1,000 held-out samples (seed 1) next to stepsearch DDIM, DPM-Solver++(2M) and UniPC-bh2
and diffusers' DPMSolverMultistepScheduler 3M, each on its best built-in spacing (chosen on the
held-out trajectory error of the first 100 held-out samples, which favours the baselines), and the
converged reference (the
100-step teacher). Also timed: fitting 10 steps from the 64 trajectories (teacher recorded).
Writes ``benchmarks/results/olss.{json,md}``. Run: ``OMP_NUM_THREADS=1 nice python
benchmarks/olss.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.cache import TensorCache
from stepsearch.eval.features import ensure_features
from stepsearch.eval.fid import FeatureStatistics, frechet_distance
from stepsearch.eval.objective import Objective
from stepsearch.eval.report import environment
from stepsearch.eval.trajectory import trajectory_error
from stepsearch.models import DEFAULT_TEACHER, Method, load_image_model
from stepsearch.models.source import generate_from_source
from stepsearch.olss import OLSSSolver, fit_olss, record_teacher
from stepsearch.schedule import make_schedule
from stepsearch.solvers import get_solver

RESULTS = Path(__file__).parent / "results"
SPACINGS = ("time_uniform", "logsnr_uniform", "karras", "leading", "linspace", "trailing")
BASELINES = ("ddim", "dpm_solver_pp_2m", "unipc_bh2")
DIFFUSERS_3M = [
    Method.diffusers("DPMSolverMultistepScheduler", f"3M ({s})", solver_order=3, timestep_spacing=s)
    for s in ("leading", "linspace", "trailing")
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few samples, two NFEs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    nfes = (4, 10) if args.quick else (4, 5, 6, 8, 10)
    train, held_out = (16, 64) if args.quick else (64, 1000)
    probe_size = min(held_out, 100)  # the best spacing of a baseline is chosen on this prefix
    model = load_image_model("digits")
    source = model
    cache = TensorCache.default()
    traj = Objective(source, "traj", num_samples=train, held_out_samples=held_out, cache=cache)
    fd = Objective(source, "fd", num_samples=train, held_out_samples=held_out, cache=cache)
    reference = traj.teacher("held_out")
    reference_stats = FeatureStatistics.from_features(fd.reference_features())

    def fd_of(samples: torch.Tensor) -> float:
        features = ensure_features(samples.clamp(-1e4, 1e4), source.features, progress=False)
        return frechet_distance(FeatureStatistics.from_features(features), reference_stats)

    start = time.perf_counter()
    recording = record_teacher(source, train, cache=cache, teacher=DEFAULT_TEACHER)
    teacher_seconds = time.perf_counter() - start
    denoise = source.denoiser(range(train))
    timings = {}
    for search in ("greedy", "best"):
        start = time.perf_counter()
        fit_olss(recording, 10, search=search, denoise=denoise)
        timings[search] = time.perf_counter() - start
    rows: list[dict[str, Any]] = []

    def write(done: tuple[int, ...]) -> None:
        payload = {
            "model": source.identity.to_json_dict(),
            "teacher": DEFAULT_TEACHER.to_json_dict(),
            "train_samples": train,
            "held_out_samples": held_out,
            "reference_fd": reference_fd,
            "teacher_seconds": teacher_seconds,
            "fit_seconds_10_steps": timings,
            "nfes": list(done),
            "rows": rows,
            "environment": environment(),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "olss.json", payload)
        atomic_write_text(args.out / "olss.md", _markdown(payload, done))

    reference_fd = fd_of(reference)
    for k, nfe in enumerate(nfes):
        fit = fit_olss(recording, nfe, search="best", denoise=denoise)
        samples = traj.samples(fit.schedule, OLSSSolver(fit.coefficients), "held_out")
        rows.append(_row("OLSS", nfe, fit.search, samples, reference, fd_of, fit=fit.describe()))
        for name in BASELINES:
            solver = get_solver(name)

            def probe(spacing: str, solver=solver, nfe=nfe) -> float:
                schedule = make_schedule(source.noise, nfe, spacing)
                samples = generate_from_source(source, solver, schedule, probe_size, seed=1)
                return trajectory_error(samples, reference[:probe_size])

            spacing = min(SPACINGS, key=probe)
            schedule = make_schedule(source.noise, nfe, spacing)
            samples = traj.samples(schedule, solver, "held_out")
            rows.append(_row(name, nfe, spacing, samples, reference, fd_of))
        method = min(
            DIFFUSERS_3M,
            key=lambda m: trajectory_error(
                m.run(model, nfe, probe_size, seed=1)[0], reference[:probe_size]
            ),
        )
        samples = method.run(model, nfe, held_out, seed=1)[0]
        rows.append(
            _row("diffusers DPMSolverMultistep", nfe, method.label, samples, reference, fd_of)
        )
        write(nfes[: k + 1])
        print(
            f"NFE {nfe}: "
            + ", ".join(f"{r['method']} {r['traj']:.4f}/{r['fd']:.1f}" for r in rows[-5:]),
            flush=True,
        )


def _row(method: str, nfe: int, spacing: str, samples, reference, fd_of, **extra: Any) -> dict:
    return {
        "method": method,
        "nfe": nfe,
        "spacing": spacing,
        "traj": trajectory_error(samples, reference),
        "fd": fd_of(samples),
        **extra,
    }


def _markdown(payload: dict[str, Any], nfes: tuple[int, ...]) -> str:
    methods = list(dict.fromkeys(row["method"] for row in payload["rows"]))
    lines = [
        "# OLSS on the bundled digits DDPM",
        "",
        f"Fit on {payload['train_samples']} teacher trajectories (DPM-Solver++(3M), 100 logSNR steps); "
        f"scored on {payload['held_out_samples']} held-out samples. Baselines on their best "
        "built-in spacing (chosen on the trajectory error of the first 100 held-out samples). "
        "Fitting 10 steps: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in payload["fit_seconds_10_steps"].items())
        + f" (teacher recording {payload['teacher_seconds']:.1f} s).",
        "",
    ]
    for metric, title in (("traj", "median RMS error to the reference"), ("fd", "FD-digits")):
        lines += [f"## {title}", "", "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |"]
        lines.append("| --- | " + " | ".join("---:" for _ in nfes) + " |")
        for method in methods:
            cells = []
            for nfe in nfes:
                row = next(r for r in payload["rows"] if r["method"] == method and r["nfe"] == nfe)
                cells.append(f"{row[metric]:.4g} ({row['spacing']})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if metric == "fd":
            lines.append(
                f"| reference (100 steps) | {payload['reference_fd']:.4g} |"
                + " |" * (len(nfes) - 1)
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
