"""Per-step scheduler overhead: each stepsearch drop-in scheduler beside its diffusers counterpart.

Only ``scheduler.step()`` is timed (no model): a full ``set_timesteps`` run over a 1x4x64x64 float32
latent (Stable Diffusion's at 512 px) with fixed random "model outputs", ours and diffusers'
alternating run by run so both see the same machine load. After warm-up runs, the median over all
timed ``step()`` calls is reported, with ``scale_model_input + step()`` beside it (diffusers' Euler
and Heun rescale the model input; ours is the identity). Writes
``benchmarks/results/scheduler_overhead.{json,md}`` with the machine and library versions.

Run: ``python benchmarks/scheduler_overhead.py`` (about a minute on 2 CPU cores); ``--quick`` for a
smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.eval.report import environment
from stepsearch.integrations.diffusers import SCHEDULERS

SD_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
LATENT_SHAPE = (1, 4, 64, 64)


@dataclass(frozen=True)
class Pair:
    """A stepsearch solver and the diffusers scheduler that does the same job."""

    solver: str
    diffusers_name: str
    make_diffusers: Callable[[], Any]


PAIRS = (
    Pair("ddim", "DDIMScheduler", lambda: DDIMScheduler(**SD_CONFIG, clip_sample=False)),
    Pair("pndm", "PNDMScheduler (PLMS)", lambda: PNDMScheduler(**SD_CONFIG, skip_prk_steps=True)),
    Pair(
        "dpm_solver_1",
        "DPMSolverMultistepScheduler (order 1)",
        lambda: DPMSolverMultistepScheduler(**SD_CONFIG, solver_order=1),
    ),
    Pair(
        "dpm_solver_2",
        "DPMSolverSinglestepScheduler (dpmsolver, order 2)",
        lambda: DPMSolverSinglestepScheduler(
            **SD_CONFIG, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
        ),
    ),
    Pair(
        "dpm_solver_3",
        "DPMSolverSinglestepScheduler (dpmsolver, order 3)",
        lambda: DPMSolverSinglestepScheduler(
            **SD_CONFIG, algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"
        ),
    ),
    Pair(
        "dpm_solver_pp_2m",
        "DPMSolverMultistepScheduler (2M)",
        lambda: DPMSolverMultistepScheduler(**SD_CONFIG),
    ),
    Pair(
        "dpm_solver_pp_3m",
        "DPMSolverMultistepScheduler (3M)",
        lambda: DPMSolverMultistepScheduler(**SD_CONFIG, solver_order=3),
    ),
    Pair(
        "dpm_solver_pp_2s",
        "DPMSolverSinglestepScheduler (2S)",
        lambda: DPMSolverSinglestepScheduler(**SD_CONFIG),
    ),
    Pair(
        "unipc_bh1",
        "UniPCMultistepScheduler (bh1)",
        lambda: UniPCMultistepScheduler(**SD_CONFIG, solver_type="bh1"),
    ),
    Pair(
        "unipc_bh2",
        "UniPCMultistepScheduler (bh2)",
        lambda: UniPCMultistepScheduler(**SD_CONFIG),
    ),
    Pair("euler", "EulerDiscreteScheduler", lambda: EulerDiscreteScheduler(**SD_CONFIG)),
    Pair("heun", "HeunDiscreteScheduler", lambda: HeunDiscreteScheduler(**SD_CONFIG)),
)


def timed_run(
    scheduler: Any, num_steps: int, outputs: list[torch.Tensor], x_T: torch.Tensor
) -> tuple[list[float], list[float]]:
    """One sampling run; returns per-call seconds of ``step()`` and of ``scale_model_input``."""
    scheduler.set_timesteps(num_steps)
    x = x_T * scheduler.init_noise_sigma
    step_times, scale_times = [], []
    for i, t in enumerate(scheduler.timesteps):
        started = time.perf_counter()
        scheduler.scale_model_input(x, t)
        scaled = time.perf_counter()
        x = scheduler.step(outputs[i % len(outputs)], t, x, return_dict=False)[0]
        done = time.perf_counter()
        scale_times.append(scaled - started)
        step_times.append(done - scaled)
    return step_times, scale_times


def measure(pair: Pair, num_steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(LATENT_SHAPE, generator=generator)
    outputs = [0.5 * torch.randn(LATENT_SHAPE, generator=generator) for _ in range(8)]
    theirs = pair.make_diffusers()
    ours = SCHEDULERS[pair.solver].from_config(theirs.config)
    samples: dict[str, dict[str, list[float]]] = {
        name: {"step": [], "scale": []} for name in ("ours", "diffusers")
    }
    evaluations = {}
    for run in range(warmup + repeats):
        for name, scheduler in (("ours", ours), ("diffusers", theirs)):
            step_times, scale_times = timed_run(scheduler, num_steps, outputs, x_T)
            evaluations[name] = len(step_times)
            if run >= warmup:
                samples[name]["step"] += step_times
                samples[name]["scale"] += scale_times

    def median_us(values: list[float]) -> float:
        return 1e6 * statistics.median(values)

    result: dict[str, Any] = {
        "solver": pair.solver,
        "stepsearch_class": type(ours).__name__,
        "diffusers": pair.diffusers_name,
        "num_inference_steps": num_steps,
    }
    for name in ("ours", "diffusers"):
        steps, scales = samples[name]["step"], samples[name]["scale"]
        result[f"{name}_evaluations"] = evaluations[name]
        result[f"{name}_step_us"] = median_us(steps)
        result[f"{name}_step_scale_us"] = median_us(
            [a + b for a, b in zip(steps, scales, strict=True)]
        )
        result[f"{name}_timed_calls"] = len(steps)
    result["ratio_step"] = result["ours_step_us"] / result["diffusers_step_us"]
    result["ratio_step_scale"] = result["ours_step_scale_us"] / result["diffusers_step_scale_us"]
    return result


def markdown(results: list[dict[str, Any]], env: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [
        "# Scheduler overhead per `step()` (no model)",
        "",
        f"Latent {'x'.join(map(str, LATENT_SHAPE))} float32, {settings['num_steps']} inference "
        f"steps, {settings['warmup']} warm-up + {settings['repeats']} timed runs per scheduler "
        "(ours and diffusers' alternating); medians over all timed calls, microseconds. "
        "Ratio = stepsearch / diffusers (<= 1 is the goal).",
        "",
        f"Machine: {env['processor']} ({env['cpu_count']} CPUs, torch threads "
        f"{env['torch_threads']}), cuda: {env['cuda']}. Python {env['python']}, torch "
        f"{env['torch']}, diffusers {env['diffusers']}, numpy {env['numpy']}, stepsearch "
        f"{env['stepsearch']}. Date {env['date']}.",
        "",
        "| solver | diffusers counterpart | evals (ours / diffusers) | ours step | diffusers step "
        "| ratio | ours step+scale | diffusers step+scale | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| `{r['solver']}` | {r['diffusers']} | {r['ours_evaluations']} / "
            f"{r['diffusers_evaluations']} | {r['ours_step_us']:.1f} | "
            f"{r['diffusers_step_us']:.1f} | {r['ratio_step']:.2f} | "
            f"{r['ours_step_scale_us']:.1f} | {r['diffusers_step_scale_us']:.1f} | "
            f"{r['ratio_step_scale']:.2f} |"
        )
    ratios = [r["ratio_step"] for r in results]
    lines += [
        "",
        f"Geometric-mean ratio (step only): {statistics.geometric_mean(ratios):.2f}; "
        f"worst {max(ratios):.2f} (`{results[ratios.index(max(ratios))]['solver']}`).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps per run")
    parser.add_argument("--repeats", type=int, default=40, help="timed runs per scheduler")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per scheduler")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="smoke run (3 repeats)")
    parser.add_argument("--solvers", nargs="*", help="only these stepsearch solvers")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results", help="output folder"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (3, 1) if args.quick else (args.repeats, args.warmup)
    pairs = [p for p in PAIRS if not args.solvers or p.solver in args.solvers]
    results = []
    for pair in pairs:
        result = measure(pair, args.steps, repeats, warmup)
        results.append(result)
        print(
            f"{pair.solver:18s} ours {result['ours_step_us']:8.1f} us  "
            f"diffusers {result['diffusers_step_us']:8.1f} us  ratio {result['ratio_step']:.2f}",
            flush=True,
        )
    env = environment()
    settings = {"num_steps": args.steps, "repeats": repeats, "warmup": warmup}
    stem = "scheduler_overhead_quick" if args.quick else "scheduler_overhead"
    payload = {"environment": env, "settings": settings, "latent_shape": LATENT_SHAPE}
    atomic_write_json(args.out / f"{stem}.json", {**payload, "results": results})
    atomic_write_text(args.out / f"{stem}.md", markdown(results, env, settings))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
