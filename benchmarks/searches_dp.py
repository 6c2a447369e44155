"""DP schedules (GITS / OSS style) on the bundled digits model vs the best built-in solver + spacing.

For each NFE and each metric (FD-digits, trajectory error to the converged solve):

- **built-in**: every solver of ``--baseline-solvers`` on every spacing of ``--spacings``, scored on
  the *search* seed; the best one is the starting point and is then scored on the *held-out* seed;
- **DP**: for every solver of ``--dp-solvers`` and GITS coefficient of ``--coeffs``, the DP schedule
  from a 100-point grid teacher (256 trajectories, search seed), scored on the search seed; the best
  is scored on the held-out seed.

Only held-out numbers are compared. Also timed: the teacher, the DP with cold and warm coefficient
caches (the coefficients depend only on the noise schedule, the grid and the solver), and one
``run_dp_search`` job at NFE 5. Writes ``benchmarks/results/searches_dp.{json,md}``.

    OMP_NUM_THREADS=1 nice python benchmarks/searches_dp.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models import load_source
from stepsearch.schedule import StepSchedule, make_schedule
from stepsearch.search.dp_job import DEFAULT_COEFFS, DPSettings, run_dp_search
from stepsearch.search.dynamic import dynamic_schedule, fine_grid, record_grid_teacher
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver
from stepsearch.testbeds.digits import MODELS, checkpoint_record

RESULTS = Path(__file__).resolve().parent / "results"


def _csv(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--nfe", default="4,5,6,8,10")
    parser.add_argument("--metrics", default="fd,traj")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--held-out-samples", type=int, default=1000)
    parser.add_argument(
        "--check-seeds",
        default="2,3",
        help="more noise seeds (neither search nor held-out) on which the two FD winners are also "
        "scored, to show how much of a held-out difference is seed noise; never used for choices",
    )
    parser.add_argument("--grid-points", type=int, default=100)
    parser.add_argument("--teacher-samples", type=int, default=256)
    parser.add_argument("--dp-solvers", default="ddim,dpm_solver_pp_2m,unipc_bh2")
    parser.add_argument("--coeffs", default=",".join(str(c) for c in DEFAULT_COEFFS))
    parser.add_argument(
        "--baseline-solvers", default="ddim,dpm_solver_pp_2m,dpm_solver_pp_3m,unipc_bh2"
    )
    parser.add_argument("--diffusers-3m", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--spacings", default="trailing,leading,linspace,time_uniform,logsnr_uniform,karras"
    )
    parser.add_argument("--job-solver", default="unipc_bh2", help="the timed NFE-5 job's solver")
    parser.add_argument("--cache", default=None, help="tensor cache (default: the user cache)")
    parser.add_argument(
        "--out", default=str(RESULTS / "searches_dp"), help="the NFE-5 job's folder"
    )
    parser.add_argument(
        "--results", default=str(RESULTS), help="where searches_dp.{json,md} are written"
    )
    args = parser.parse_args()

    source = load_source(args.model)
    cache = TensorCache(args.cache) if args.cache else TensorCache.default()
    nfes = [int(n) for n in _csv(args.nfe)]
    objectives = {
        metric: Objective(
            source,
            metric,
            num_samples=args.num_samples,
            held_out_samples=args.held_out_samples,
            cache=cache,
        )
        for metric in _csv(args.metrics)
    }
    first = next(iter(objectives.values()))

    def score_all(schedule: StepSchedule, solver, split: str = "search") -> dict:
        """Every metric from one set of samples (the objectives share seeds and sample counts)."""
        samples = first.samples(schedule, solver, split)
        nfe = int(solver.evaluation_times(schedule).size)
        return {
            metric: objective.score_samples(samples, nfe, split=split)
            for metric, objective in objectives.items()
        }

    timings: dict[str, float] = {}
    start = time.perf_counter()
    grid = fine_grid(source.noise, args.grid_points)
    teacher = record_grid_teacher(
        source, grid, num_samples=args.teacher_samples, seed=0, cache=cache
    )
    timings["teacher_s"] = time.perf_counter() - start
    print(f"teacher: {timings['teacher_s']:.1f} s", flush=True)

    dp_seconds: dict[str, list[float]] = {}
    dp_rows: dict[str, dict[int, list[dict]]] = {metric: {} for metric in objectives}
    for name in _csv(args.dp_solvers):
        solver = get_solver(name)
        for nfe in nfes:
            for coeff in (float(c) for c in _csv(args.coeffs)):
                start = time.perf_counter()
                result = dynamic_schedule(teacher, solver, nfe, coeff=coeff, cache=cache)
                seconds = time.perf_counter() - start
                dp_seconds.setdefault(name, []).append(seconds)
                for metric, score in score_all(result.schedule, solver).items():
                    dp_rows[metric].setdefault(nfe, []).append(
                        {"solver": name, "coeff": coeff, "path": result.path,
                         "times": result.schedule.times.tolist(), "search": score.value}
                    )  # fmt: skip
            print(f"dp {name} NFE {nfe} done", flush=True)
    dp_times = {  # the first call computes the solver coefficients (cached afterwards)
        name: {"first_s": times[0], "max_warm_s": max(times[1:], default=0.0)}
        for name, times in dp_seconds.items()
    }

    base_rows: dict[str, dict[int, list[dict]]] = {metric: {} for metric in objectives}
    baseline_solvers = {name: get_solver(name) for name in _csv(args.baseline_solvers)}
    if args.diffusers_3m:  # diffusers' DPM-Solver++(3M) (second order; the README's best at NFE 4)
        baseline_solvers["dpm_solver_pp_3m_legacy"] = get_solver("dpm_solver_pp_3m", legacy_3m=True)
    for name, solver in baseline_solvers.items():
        for spacing in _csv(args.spacings):
            for nfe in nfes:
                schedule = make_schedule(source.noise, nfe, spacing)
                for metric, score in score_all(schedule, solver).items():
                    base_rows[metric].setdefault(nfe, []).append(
                        {"solver": name, "spacing": spacing, "search": score.value}
                    )
        print(f"baselines {name} done", flush=True)

    table: dict[str, dict[int, dict]] = {metric: {} for metric in objectives}
    checks = {
        seed: _seed_scorer(first, seed, args.held_out_samples)
        for seed in (int(s) for s in _csv(args.check_seeds))
    }
    for metric, objective in objectives.items():
        for nfe in nfes:
            best_base = min(base_rows[metric][nfe], key=lambda row: row["search"])
            best_dp = min(dp_rows[metric][nfe], key=lambda row: row["search"])
            base_schedule = make_schedule(source.noise, nfe, best_base["spacing"])
            base_held = objective.held_out(base_schedule, baseline_solvers[best_base["solver"]])
            dp_schedule = StepSchedule(best_dp["times"], source.noise)
            dp_held = objective.held_out(dp_schedule, get_solver(best_dp["solver"]))
            table[metric][nfe] = {
                "baseline": {**best_base, "held_out": base_held.to_json_dict()},
                "dp": {**best_dp, "held_out": dp_held.to_json_dict()},
                "dp_wins": dp_held.value < base_held.value,
            }
            if metric == "fd" and checks:
                table[metric][nfe]["check_seeds"] = {
                    str(seed): {
                        "baseline": check(base_schedule, baseline_solvers[best_base["solver"]]),
                        "dp": check(dp_schedule, get_solver(best_dp["solver"])),
                    }
                    for seed, check in checks.items()
                }
            print(metric, nfe, best_base, base_held.value, "| dp", best_dp["solver"],
                  best_dp["coeff"], dp_held.value, flush=True)  # fmt: skip

    reference = {}
    if "fd" in objectives:
        spec = objectives["fd"].teacher_spec
        converged = make_schedule(source.noise, spec.num_steps, spec.spacing)
        reference = objectives["fd"].held_out(converged, get_solver(spec.solver)).to_json_dict()

    payload = {
        "model": source.identity.to_json_dict(),
        "checkpoint_sha256": checkpoint_record(args.model)["weights_sha256"]
        if args.model in MODELS
        else None,
        "settings": vars(args),
        "timings": {**timings, "dp": dp_times},
        "converged_reference_fd": reference,
        "table": {m: {str(n): row for n, row in rows.items()} for m, rows in table.items()},
        "dp_candidates": dp_rows,
        "baselines": base_rows,
    }
    # the comparison is complete here; the job below adds its timing
    _write(payload, nfes, Path(args.results))

    start = time.perf_counter()
    job_metric = "fd" if "fd" in objectives else next(iter(objectives))
    with tempfile.TemporaryDirectory() as directory:
        job = run_dp_search(
            objectives[job_metric],
            args.job_solver,
            5,
            Path(args.out),
            storage=str(Path(directory) / "study.sqlite3"),
            settings=DPSettings(
                grid_points=args.grid_points,
                teacher_samples=args.teacher_samples,
                coeffs=tuple(float(c) for c in _csv(args.coeffs)),
            ),
            progress=False,
        )
    timings["job_nfe5_s"] = time.perf_counter() - start
    payload["timings"] = {**timings, "dp": dp_times}
    payload["job_nfe5"] = {
        "solver": args.job_solver,
        "metric": job_metric,
        "best": job.best.settings,
        "path": job.best.result.path,
        "held_out": job.held_out.to_json_dict(),
        "start": job.start.name,
        "held_out_values": job.held_out_values,
        "seconds": job.seconds,
    }
    _write(payload, nfes, Path(args.results))
    print(_markdown(payload, nfes))


def _write(payload: dict, nfes: list[int], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results / "searches_dp.json", json.loads(json.dumps(payload, default=str)))
    atomic_write_text(results / "searches_dp.md", _markdown(payload, nfes))


def _seed_scorer(
    first: Objective, seed: int, num_samples: int
) -> Callable[[StepSchedule, Solver], float]:
    """FD on another noise seed, neither ``first``'s search nor its held-out seed."""
    if seed in first.seeds.values():
        raise ValueError(f"check seed {seed} is one of the objective's seeds {first.seeds}")
    objective = Objective(
        first.source,
        "fd",
        num_samples=num_samples,
        search_seed=seed,
        held_out_seed=first.seeds["held_out"],
        cache=first.cache,
    )
    return lambda schedule, solver: objective(schedule, solver).value


def _held(row: dict) -> str:
    held = row["held_out"]
    spread = held.get("std")
    return f"{held['value']:.4g}" + (f" +- {spread:.2g}" if spread is not None else "")


def _check_lines(rows: dict, nfes: list[int]) -> list[str]:
    lines = [
        "The same two schedules on other noise seeds (same sample count; never used to choose), "
        "DP minus built-in:",
        "",
        "| NFE | seed | built-in | DP | DP - built-in |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for nfe in nfes:
        for seed, pair in rows[str(nfe)].get("check_seeds", {}).items():
            base, dp = pair["baseline"], pair["dp"]
            lines.append(f"| {nfe} | {seed} | {base:.4g} | {dp:.4g} | {dp - base:+.3g} |")
    return [*lines, ""]


def _job_line(payload: dict) -> str:
    job, seconds = payload["job_nfe5"], payload["timings"]["job_nfe5_s"]
    values = ", ".join(f"{k} {v:.4g}" for k, v in job["held_out_values"].items())
    return (
        f"`run_dp_search` at NFE 5 ({job['solver']}, {job['metric']}, teacher and solver "
        f"coefficients cached): {seconds:.1f} s; chose coeff {job['best']['coeff']}, path "
        f"{job['path']}; held-out {values}."
    )


def _markdown(payload: dict, nfes: list[int]) -> str:
    lines = [
        "## DP schedules (GITS / OSS style) vs the best built-in solver + spacing",
        "",
        f"Model {payload['model']['name']} (checkpoint sha256 "
        f"{payload.get('checkpoint_sha256') or 'n/a'}; weights digest "
        f"{payload['model']['digest']}); held-out seed, "
        f"{payload['settings']['held_out_samples']} samples; both picked on the search seed "
        f"({payload['settings']['num_samples']} samples); DP candidates: solvers "
        f"{payload['settings']['dp_solvers']} x GITS coefficients {payload['settings']['coeffs']}. "
        "Lower is better; +- is the held-out score's bootstrap standard deviation.",
        "",
    ]
    for metric, rows in payload["table"].items():
        lines += [f"### {metric}", "", "| NFE | best built-in | held-out | best DP | held-out | DP wins |",
                  "| ---: | --- | ---: | --- | ---: | --- |"]  # fmt: skip
        for nfe in nfes:
            row = rows[str(nfe)]
            base, dp = row["baseline"], row["dp"]
            lines.append(
                f"| {nfe} | {base['solver']} / {base['spacing']} | {_held(base)} "
                f"| {dp['solver']} (coeff {dp['coeff']}) | {_held(dp)} "
                f"| {'yes' if row['dp_wins'] else 'no'} |"
            )
        lines.append("")
        if any("check_seeds" in row for row in rows.values()):
            lines += _check_lines(rows, nfes)
    reference = payload.get("converged_reference_fd") or {}
    if reference:
        lines.append(
            f"Converged reference (the teacher's solve) FD-digits: {reference['value']:.4g}."
        )
    timings = payload["timings"]
    lines += [
        "",
        f"Teacher (grid {payload['settings']['grid_points']} points, "
        f"{payload['settings']['teacher_samples']} trajectories): {timings['teacher_s']:.1f} s "
        "(cached across runs). "
        + (_job_line(payload) if "job_nfe5_s" in timings else "Job at NFE 5: not run."),
        "",
        "DP time per solver: first call (computes the solver coefficients, cached afterwards) / "
        "slowest later call:",
        "",
    ]
    for name, times in timings["dp"].items():
        lines.append(f"- {name}: {times['first_s']:.1f} s / {times.get('max_warm_s', 0.0):.1f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
