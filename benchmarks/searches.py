"""Search families against their starting points on the bundled digits DDPM, on HELD-OUT seeds.

For each NFE the starting point is the best built-in solver + spacing on the search seed (every
solver of ``--solvers`` with every spacing of :data:`~stepsearch.search.job.DEFAULT_SPACINGS`). Each
search family then searches schedules for that solver, starting from its spacings, and the result
and the starting point are scored on the held-out seed (noise the search never saw), beside the
converged reference (DPM-Solver++(3M), 100 logSNR steps) on the same held-out noise. Results:
``benchmarks/results/searches.{json,md}``.

Full run (the default settings; < 15 minutes per NFE and family on 2 idle cores is the target)::

    OMP_NUM_THREADS=2 python benchmarks/searches.py

Reduced run (what was run on the shared development machine; see the markdown's header)::

    OMP_NUM_THREADS=1 python benchmarks/searches.py --budget 60 --num-samples 128 \\
        --held-out-samples 500 --solvers dpm_solver_pp_3m unipc_bh2 --population 20 \\
        --mutations 10 --crossovers 4 --parents 5 --threads 1

Families: ``autodiffusion`` (here) and ``dp`` (the dynamic-programming searches: add its runner to
:data:`FAMILIES`, a function ``(objective, solver, nfe, start, args, work) -> dict`` returning at
least ``{"schedule": StepSchedule, "search": float, "trials": int}``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.eval.report import environment
from stepsearch.models import load_source
from stepsearch.schedule import StepSchedule, make_schedule
from stepsearch.search.autodiffusion import AutoDiffusionSettings, run_autodiffusion_job
from stepsearch.search.job import spacing_schedules
from stepsearch.solvers import get_solver
from stepsearch.testbeds.digits import checkpoint_record

RESULTS = Path(__file__).resolve().parent / "results"
SOLVERS = ("ddim", "pndm", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh2")


def run_autodiffusion(
    objective: Objective, solver: str, nfe: int, start: dict[str, Any], args: Any, work: Path
) -> dict[str, Any]:
    del start  # the job starts from every spacing of the solver, the best one included
    settings = AutoDiffusionSettings(
        population=args.population,
        mutations=args.mutations,
        crossovers=args.crossovers,
        parents=args.parents,
    )
    summary = run_autodiffusion_job(
        objective,
        solver,
        nfe=nfe,
        budget=args.budget,
        out=work / f"autodiffusion-nfe{nfe}",
        seed=args.seed,
        settings=settings,
        progress=False,
    )
    return {
        "schedule": summary.result.best,
        "search": summary.result.best_score.value,
        "trials": len(summary.result.history),
        "held_out": summary.held_out["search_result"],
    }


FAMILIES: dict[str, Callable[..., dict[str, Any]]] = {
    "autodiffusion": run_autodiffusion,
    # "dp": run_dp,  <- the dynamic-programming searches (GITS / OSS style) go here
}


def starting_point(objective: Objective, nfe: int, solvers: list[str]) -> dict[str, Any]:
    """The best built-in solver + spacing at ``nfe`` on the search seed (all of them listed)."""
    scores = {}
    for solver in solvers:
        try:
            steps = get_solver(solver).num_steps_for_nfe(nfe)
        except ValueError:
            continue
        for spacing, schedule in spacing_schedules(objective.source.noise, steps).items():
            scores[(solver, spacing)] = (objective(schedule, solver).value, schedule)
    (solver, spacing), (value, schedule) = min(
        scores.items(), key=lambda item: math.inf if math.isnan(item[1][0]) else item[1][0]
    )
    return {
        "solver": solver,
        "spacing": spacing,
        "schedule": schedule,
        "search": value,
        "all": {f"{s} / {p}": v for (s, p), (v, _) in scores.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    parser.add_argument("--metric", default="fd")
    parser.add_argument("--budget", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--held-out-samples", type=int, default=1000)
    parser.add_argument("--population", type=int, default=50)
    parser.add_argument("--mutations", type=int, default=25)
    parser.add_argument("--crossovers", type=int, default=10)
    parser.add_argument("--parents", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/searches"), help="studies, files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="", help="a line for the markdown (machine load, ...)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    source = load_source("digits")
    objective = Objective(
        source,
        args.metric,
        num_samples=args.num_samples,
        held_out_samples=args.held_out_samples,
        cache=TensorCache(args.work / "cache"),
    )
    began = time.perf_counter()
    reference = make_schedule(source.noise, 100, "logsnr_uniform")
    converged = objective.held_out(reference, "dpm_solver_pp_3m").value
    rows = []
    for nfe in args.nfe:
        t0 = time.perf_counter()
        start = starting_point(objective, nfe, args.solvers)
        start_held_out = objective.held_out(start["schedule"], start["solver"]).value
        row: dict[str, Any] = {
            "nfe": nfe,
            "start": {
                "solver": start["solver"],
                "spacing": start["spacing"],
                "search": start["search"],
                "held_out": start_held_out,
            },
            "built_ins_search": start["all"],
            "families": {},
        }
        print(
            f"NFE {nfe}: start {start['solver']} / {start['spacing']} held-out {start_held_out:.2f}"
        )
        for family in args.families:
            t1 = time.perf_counter()
            found = FAMILIES[family](objective, start["solver"], nfe, start, args, args.work)
            schedule: StepSchedule = found["schedule"]
            held_out = found.get("held_out")
            if held_out is None:
                held_out = objective.held_out(schedule, start["solver"]).value
            row["families"][family] = {
                "search": found["search"],
                "held_out": held_out,
                "trials": found["trials"],
                "beats_start": bool(held_out < start_held_out),
                "timesteps": schedule.to_diffusers_timesteps(integer=False).tolist(),
                "minutes": round((time.perf_counter() - t1) / 60, 2),
            }
            print(f"  {family}: held-out {held_out:.2f} ({found['trials']} trials)")
        row["minutes"] = round((time.perf_counter() - t0) / 60, 2)
        rows.append(row)
        payload = _write(args, source, converged, rows, time.perf_counter() - began)
    print(markdown(payload))


def _write(args: Any, source: Any, converged: float, rows: list, seconds: float) -> dict:
    """Write the results so far (after every NFE, so a long run keeps what it finished)."""
    payload = {
        "model": source.identity.to_json_dict(),
        "checkpoint_sha256": checkpoint_record("digits")["weights_sha256"],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "metric": args.metric,
        "converged_reference_held_out": converged,
        "rows": rows,
        "minutes": round(seconds / 60, 2),
        "environment": environment(),
        "note": args.note,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "searches.json", payload)
    atomic_write_text(args.out / "searches.md", markdown(payload))
    return payload


def markdown(payload: dict[str, Any]) -> str:
    settings = payload["settings"]
    families = sorted({f for row in payload["rows"] for f in row["families"]})
    lines = [
        f"## Searches vs their starting points: held-out {payload['metric'].upper()}-digits "
        "(lower is better)",
        "",
        f"Bundled digits model {payload['model']['name']} (checkpoint sha256 "
        f"{payload.get('checkpoint_sha256', 'n/a')}; weights digest {payload['model']['digest']}). "
        f"Starting point: the best of solvers {', '.join(settings['solvers'])}"
        " x built-in spacings on the search seed. Budget "
        f"{settings['budget']} trials, {settings['num_samples']} samples per candidate (search "
        f"seed), {settings['held_out_samples']} held-out samples; population "
        f"{settings['population']} ({settings['mutations']} mutation, {settings['crossovers']} "
        f"crossover), top-{settings['parents']} parents. Converged reference (DPM-Solver++(3M), "
        f"100 logSNR steps) on the same held-out noise: **{payload['converged_reference_held_out']:.2f}**."
        f" Total {payload['minutes']} min.",
        "",
        "| NFE | start (solver / spacing) | start | "
        + " | ".join(f"{f} | vs start | trials | min" for f in families)
        + " |",
        "| ---: | --- | ---: | " + " | ".join("---: | ---: | ---: | ---:" for _ in families) + " |",
    ]
    for row in payload["rows"]:
        start = row["start"]
        cells = [
            str(row["nfe"]),
            f"{start['solver']} / {start['spacing']}",
            f"{start['held_out']:.2f}",
        ]
        for family in families:
            found = row["families"].get(family)
            if found is None:
                cells += ["–"] * 4
                continue
            change = 100 * (found["held_out"] / start["held_out"] - 1)
            cells += [
                f"**{found['held_out']:.2f}**"
                if found["beats_start"]
                else f"{found['held_out']:.2f}",
                f"{change:+.0f}%",
                str(found["trials"]),
                str(found["minutes"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "A held-out score below the converged reference's means the schedule's samples match the "
        "data better than the model's exact ODE solution does: the search also corrects model "
        "error (and FD at a few hundred samples is biased), it does not only solve the ODE "
        "more accurately.",
        "",
        "Found timesteps (diffusers indices):",
        "",
    ]
    for row in payload["rows"]:
        for family, found in row["families"].items():
            shown = ", ".join(f"{t:.0f}" for t in found["timesteps"])
            lines.append(f"- NFE {row['nfe']} {family}: [{shown}]")
    if payload.get("note"):
        lines += ["", payload["note"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
