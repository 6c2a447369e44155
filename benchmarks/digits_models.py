"""Measure the bundled digits models for their model cards (docs/models.md).

For each model: the error against the exact posterior mean by timestep, FD-digits of a converged
solve (DPM-Solver++(3M), 100 logSNR-uniform steps, 1,000 samples) over ``--seeds`` noise seeds (the
metric's noise), FD-digits against NFE for DPM-Solver++(2M) and UniPC on two spacings, for DDPMs
DPM-Solver++(2M) on AYS' Gaussian closed form at NFE 10, and for ``digits-cond`` the classifier's
accuracy on the requested digit and FD at guidance 1, 2 and 4 (labels ``i mod 10``). Results go
to ``benchmarks/results/digits_models_<name>.{json,md}``.

    python benchmarks/digits_models.py --models digits digits-flow digits-cond

About 5 minutes per model on 2 CPU cores (10 for ``digits-cond``, whose guidance doubles the calls).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.denoiser import Denoiser
from stepsearch.eval.features import ensure_features
from stepsearch.eval.fid import FeatureStatistics, frechet_distance
from stepsearch.eval.report import environment
from stepsearch.models.source import generate
from stepsearch.schedule import make_schedule
from stepsearch.solvers import get_solver
from stepsearch.testbeds import digits

CONVERGED = ("dpm_solver_pp_3m", "logsnr_uniform", 100)
NFES = (4, 5, 6, 8, 10, 15, 20)
SOLVERS = ("dpm_solver_pp_2m", "unipc_bh2")
SPACINGS = {"ddpm": ("trailing", "logsnr_uniform"), "flow": ("flow_shifted", "logsnr_uniform")}
GUIDANCE_SCALES = (1.0, 2.0, 4.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--models", nargs="+", choices=sorted(digits.MODELS), default=sorted(digits.MODELS))
    add("--directory", type=Path, default=None, help="checkpoint directory (default: bundled)")
    add("--num-samples", type=int, default=1000)
    add("--seeds", type=int, default=3, help="noise seeds of the converged solve")
    add("--nfe", type=int, nargs="+", default=list(NFES), help="NFEs of the FD-vs-NFE table")
    add("--guidance-steps", type=int, default=20, help="digits-cond: DPM-Solver++(2M) steps")
    add("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


class Scorer:
    """FD-digits against all 1,797 digits, and the classifier's accuracy on requested labels."""

    def __init__(self) -> None:
        self.classifier = digits.load_classifier()
        self.extractor = digits.DigitsFeatureExtractor(self.classifier)
        real = ensure_features(digits.real_images(), self.extractor, progress=False)
        self.reference = FeatureStatistics.from_features(real)

    def fd(self, images: torch.Tensor) -> float:
        features = ensure_features(images, self.extractor, progress=False)
        return frechet_distance(FeatureStatistics.from_features(features), self.reference)


def solve(
    model: digits.DigitsModel,
    denoiser: Denoiser,
    solver: str,
    spacing: str,
    num_steps: int,
    num_samples: int,
    seed: int,
) -> torch.Tensor:
    """One seeded batch of samples, in a single chunk (labels of ``digits-cond`` are per batch)."""
    return generate(
        denoiser,
        make_schedule(model.noise, num_steps, spacing),
        get_solver(solver),
        num_samples,
        digits.IMAGE_SHAPE,
        seed=seed,
        chunk_size=num_samples,
        progress=False,
    )


def measure(
    name: str, args: argparse.Namespace, scorer: Scorer
) -> dict[str, Any]:
    start = time.perf_counter()
    model = digits.load(name, directory=args.directory)
    labels = torch.arange(args.num_samples) % digits.NUM_CLASSES
    unguided = model.denoiser(labels if model.spec.conditional else None)
    solver, spacing, steps = CONVERGED
    result: dict[str, Any] = {
        "model": name,
        "weights_sha256": digits.checkpoint_record(name, args.directory)["weights_sha256"],
        "num_samples": args.num_samples,
        "error_by_timestep": digits.posterior_mean_error(model),
        "converged": {"solver": solver, "spacing": spacing, "num_steps": steps},
    }
    converged = [
        scorer.fd(solve(model, unguided, solver, spacing, steps, args.num_samples, seed))
        for seed in range(args.seeds)
    ]
    result["converged"]["fd_by_seed"] = converged
    result["fd_by_nfe"] = {
        f"{solver} / {spacing}": {
            nfe: scorer.fd(solve(model, unguided, solver, spacing, nfe, args.num_samples, 0))
            for nfe in args.nfe
        }
        for solver in SOLVERS
        for spacing in SPACINGS[model.spec.family]
    }
    if model.spec.family == "ddpm":
        samples = solve(model, unguided, "dpm_solver_pp_2m", "ays_gaussian", 10, args.num_samples, 0)
        result["ays_gaussian_2m_nfe10_fd"] = scorer.fd(samples)
    if model.spec.conditional:
        result["guidance"] = {}
        for scale in GUIDANCE_SCALES:
            guided = model.denoiser(labels, scale)
            steps = args.guidance_steps
            samples = solve(
                model, guided, "dpm_solver_pp_2m", "logsnr_uniform", steps, args.num_samples, 0
            )
            result["guidance"][scale] = {
                "solver": "dpm_solver_pp_2m / logsnr_uniform",
                "num_steps": steps,
                "accuracy": digits.class_accuracy(scorer.classifier, samples, labels),
                "fd": scorer.fd(samples),
            }
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    result["environment"] = environment()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# {result['model']}", "", f"weights SHA-256 `{result['weights_sha256']}`", ""]
    lines += ["| timestep | sigma/alpha | x0 RMS | eps RMS | max abs x0 |", "|" + " ---: |" * 5]
    for row in result["error_by_timestep"]:
        lines.append(
            f"| {row['timestep']} | {row['sigma_over_alpha']:.3g} | {row['x0_rms']:.3g} "
            f"| {row['eps_rms']:.3g} | {row['x0_max_abs']:.3g} |"
        )
    fds = result["converged"]["fd_by_seed"]
    nfes = sorted(next(iter(result["fd_by_nfe"].values())))
    lines += [
        "",
        f"Converged solve ({result['converged']['solver']}, {result['converged']['num_steps']} "
        f"{result['converged']['spacing']} steps, {result['num_samples']} samples): FD-digits "
        + ", ".join(f"{value:.2f}" for value in fds)
        + f" over {len(fds)} seeds (mean {np.mean(fds):.2f}).",
        "",
        "| method | " + " | ".join(f"NFE {nfe}" for nfe in nfes) + " |",
        "| --- |" + " ---: |" * len(nfes),
    ]
    for method, row in result["fd_by_nfe"].items():
        lines.append(f"| {method} | " + " | ".join(f"{row[nfe]:.2f}" for nfe in nfes) + " |")
    if "ays_gaussian_2m_nfe10_fd" in result:
        lines += ["", f"DPM-Solver++(2M) / ays_gaussian, NFE 10: FD {result['ays_gaussian_2m_nfe10_fd']:.2f}"]
    if "guidance" in result:
        lines += ["", "| guidance | accuracy on the requested digit | FD-digits |", "| ---: | ---: | ---: |"]
        for scale, row in result["guidance"].items():
            lines.append(f"| {scale:g} | {row['accuracy']:.3f} | {row['fd']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    scorer = Scorer()
    for name in args.models:
        result = measure(name, args, scorer)
        stem = args.out / f"digits_models_{name.replace('-', '_')}"
        atomic_write_json(stem.with_suffix(".json"), result)
        atomic_write_text(stem.with_suffix(".md"), markdown(result))
        print(markdown(result))


if __name__ == "__main__":
    main()
