"""S³ against every other search family on the bundled digits DDPM, on HELD-OUT noise.

For each NFE every family is run through the one job runner
(:func:`~stepsearch.search.family.run_search`) on one objective (FD-digits on the search seed,
common random numbers): DP, Align Your Steps, OLSS, AutoDiffusion (a trial budget) and S³ (a trial
budget, seeded with the others' results at that NFE, as ``stepsearch optimize`` does). Each result
is then scored on the held-out seed - FD-digits at ``--held-out-samples`` (and at
``--large-samples`` for the NFEs of ``--large-nfe``, with the ratio to two independent converged
solves) and trajectory error to the converged solve - beside the best built-in solver + spacing.
Part two is the predictor ablation: S³ with and without its predictor at each NFE of
``--ablation-nfe``, ``--ablation-seeds`` seeds at ``--ablation-budget`` evaluations (``--nfe``
with no value: the ablation alone; ``--ablation-nfe`` with none: no ablation). Results: ``benchmarks/results/s3.{json,md}``.

Full protocol (the issue's done-when; ~2 h on 2 idle cores)::

    OMP_NUM_THREADS=2 python benchmarks/s3.py --nfe 3 4 5 6 --budget 200 \\
        --autodiffusion-budget 200 --large-nfe 4 5 --ablation-budget 200

The committed results ran it in parts, one thread per process, each merged into the results file
(the settings of each part are under ``parts`` in the JSON)::

    OMP_NUM_THREADS=1 python benchmarks/s3.py --nfe 3 4 5 6 --ablation-nfe      # 82 min
    OMP_NUM_THREADS=1 python benchmarks/s3.py --nfe 7 8 9 10 --large-nfe --ablation-nfe
    OMP_NUM_THREADS=1 python benchmarks/s3.py --nfe --ablation-nfe 3 6         # two processes
    OMP_NUM_THREADS=1 python benchmarks/s3.py --nfe --ablation-nfe 4 5         # ~40 min each

then, after the predictor changed (2026-12-06), its arm alone, one process per NFE pair::

    OMP_NUM_THREADS=1 python benchmarks/s3.py --nfe --ablation-nfe 3 --ablation-arms with  # then 6
    OMP_NUM_THREADS=1 python benchmarks/s3.py --nfe --ablation-nfe 4 --ablation-arms with  # then 5

and, into their own results folders, ``--num-samples 1024 --results
benchmarks/results/s3-search-1024`` and ``--metric traj`` (``results/s3-traj``,
``results/s3-traj-ablation``). S³'s rows hold its plan as a table (``plan``) and, from 2026-12-06
on, exactly (``plan_json``, :meth:`SolverPlan.to_json_dict`) for judging it again. With the
pick on the selection seed (the default since 2026-12-07) the results are
``results/s3-select4096``: the families at NFE 3-6, both ablation arms rerun, and S³'s NFE-5 search
again with ``--s3-seed 1`` and ``2`` (its own random draws only; ``s3-seed1``, ``s3-seed2``).
With two evolutions (``--restarts 2``, S³'s default since 2026-12-07) the results are
``results/s3-restarts``: ``--nfe 5 3 --large-nfe 5`` and ``--nfe 6 4 --large-nfe 4 6`` (two
processes), ``--nfe 5 --large-nfe 5 --s3-seed 4`` (``s3-seed4``) and ``--metric traj
--num-samples 64`` (``traj``), each into a copy of the results before it (their converged
references).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.eval.report import environment
from stepsearch.models import load_source
from stepsearch.schedule import make_schedule
from stepsearch.search.family import family, run_search
from stepsearch.search.job import sortable, spacing_schedules
from stepsearch.search.s3 import PICKS, SEED_SOLVERS, S3Settings, plan_solver_for, s3_search
from stepsearch.search.store import StudyStore
from stepsearch.solvers import get_solver

RESULTS = Path(__file__).resolve().parent / "results"
OTHERS = ("dp", "ays", "olss", "autodiffusion")
SCHEDULE_ONLY = ("dp", "ays", "autodiffusion")
"""The families that search timesteps only (OLSS fits coefficients too)."""
_HELD_OUT = {"fd": "held_out_fd", "traj": "held_out_traj"}
"""The results key of each metric's held-out score."""
_PREDICTOR_ONLY = (
    "predictor", "pick", "screen_fraction", "generations", "children", "siblings", "proxy",
)  # fmt: skip
"""The S³ settings that only the predictor's stages use (the arm without it ignores them)."""
CONVERGED = (("dpm_solver_pp_3m", "logsnr_uniform", 100), ("unipc_bh2", "time_uniform", 200))
"""Two independent converged solves (the FD ratio's denominators)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--nfe", type=int, nargs="*", default=[3, 4, 5, 6])
    parser.add_argument("--families", nargs="+", default=list(OTHERS), choices=OTHERS)
    parser.add_argument("--budget", type=int, default=200, help="S³ evaluations")
    parser.add_argument(
        "--s3-seed",
        type=int,
        default=0,
        help="S³'s own random draws in the families protocol (the objective's "
        "noise stays the search seed's; the other families keep seed 0)",
    )
    parser.add_argument(
        "--restarts",
        type=int,
        default=S3Settings().restarts,
        help="S³'s evolutions in the families protocol (S3Settings.restarts; the ablation "
        "compares single evolutions)",
    )
    parser.add_argument("--autodiffusion-budget", type=int, default=200)
    parser.add_argument(
        "--metric",
        choices=("fd", "traj"),
        default="fd",
        help="the search objective (every family); both judges are reported",
    )
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--held-out-samples", type=int, default=1000)
    parser.add_argument("--large-samples", type=int, default=5000)
    parser.add_argument("--large-nfe", type=int, nargs="*", default=[4, 5])
    parser.add_argument("--ablation-nfe", type=int, nargs="*", default=[3, 4, 5, 6])
    parser.add_argument("--ablation-budget", type=int, default=200)
    parser.add_argument("--ablation-samples", type=int, default=256)
    parser.add_argument("--ablation-seeds", type=int, default=3)
    parser.add_argument(
        "--ablation-arms",
        choices=("both", "with", "without"),
        default="both",
        help="which arms to run: 'with' after a change to the predictor alone keeps the "
        "results file's runs without it (they do not use it)",
    )
    parser.add_argument(
        "--ablation-pick",
        choices=PICKS,
        default=None,
        help="the predictor arm's pick rule (S3Settings.pick; default: S³'s default)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("runs/s3"))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    source = load_source(args.model)
    cache = TensorCache(args.cache) if args.cache is not None else TensorCache.default()

    def objective(metric: str, held_out: int, samples: int = args.num_samples) -> Objective:
        return Objective(source, metric, num_samples=samples, held_out_samples=held_out,
                         cache=cache, progress=False)  # fmt: skip

    search = objective(args.metric, args.held_out_samples)
    fd = search if args.metric == "fd" else objective("fd", args.held_out_samples)
    large = objective("fd", args.large_samples)
    traj = search if args.metric == "traj" else objective("traj", args.held_out_samples)
    noise = source.noise
    converged = {
        f"{name} / {spacing} x{steps}": (make_schedule(noise, steps, spacing), get_solver(name))
        for name, spacing, steps in CONVERGED
    }
    # the converged solves' FD (minutes of work): only the families' rows need it
    # the converged solves' FDs (minutes of work each, the same numbers every time: one seed, one
    # sample count) are the results file's where it has them at these sample counts
    known = _known_references(args, list(converged))
    reference = known.get("held_out") or (
        {label: fd.held_out(*pair).value for label, pair in converged.items()}
        if args.nfe
        else _results(args).get("converged_held_out_fd", {})
    )
    large_reference = known.get("large")
    rows: list[dict[str, Any]] = []
    for nfe in args.nfe:
        row: dict[str, Any] = {"nfe": nfe, "results": {}}
        found: dict[str, Any] = {}
        for name in [*args.families, "s3"]:
            fam = family(name)
            solver = fam.default_solvers[0]
            budget = {"autodiffusion": args.autodiffusion_budget, "s3": args.budget}.get(name)
            inputs = {k: v["runs"] for k, v in found.items()} if name == "s3" else None
            start = time.perf_counter()
            try:
                job = run_search(fam, search, solver, nfe, args.work / f"nfe-{nfe}" / name,
                                 budget=budget, inputs=inputs, progress=False,
                                 seed=args.s3_seed if name == "s3" else 0,
                                 settings=S3Settings(restarts=args.restarts)
                                 if name == "s3" else None)  # fmt: skip
            except ValueError as error:  # e.g. an NFE a family cannot reach, or a stale --work
                row["results"][name] = {"skipped": str(error)}
                print(f"NFE {nfe}: {name} skipped: {error}", file=sys.stderr, flush=True)
                continue
            minutes = (time.perf_counter() - start) / 60
            runs, run_solver = job.found.result, job.found.solver or get_solver(solver)
            found[name] = {"runs": runs}
            entry: dict[str, Any] = {"solver": run_solver.name, "search": job.found.score.value}
            for key, judge in (("held_out_fd", fd), ("held_out_traj", traj)):
                # the search objective's held-out score is the job's own: no second solve
                held_out = job.held_out if judge is search else judge.held_out(runs, run_solver)
                entry[key] = held_out.value
            entry.update(trials=job.trials, minutes=round(minutes, 2))
            if nfe in args.large_nfe:
                value = large.held_out(runs, run_solver).value
                entry["large_fd"] = value
            if name == "s3":
                entry["plan"] = runs.describe()
                # the exact plan (SolverPlan JSON), so the result can be judged again later
                entry["plan_json"] = runs.to_json_dict()
                entry["best_origin"] = job.found.summary.get("best_origin")
                # the pick on the selection seed: the best plans' search / selection scores
                entry["selection"] = job.found.summary.get("selection")
                history = job.found.details.history
                first = min(history, key=lambda r: (sortable(r.value), r.index)).plan
                if first is not runs:  # the search seed's best, passed over: held-out too
                    entry["search_best"] = {"held_out_fd": fd.held_out(first, run_solver).value}
                    if nfe in args.large_nfe:
                        entry["search_best"]["large_fd"] = large.held_out(first, run_solver).value
            row["results"][name] = entry
            print(f"NFE {nfe} {name}: {entry['held_out_fd']:.3f} ({minutes:.1f} min)", flush=True)
        built_in = _best_built_in(search, fd, noise, nfe)
        row["built_in"] = {**built_in, "held_out_traj": traj.held_out(
            built_in["schedule"], get_solver(built_in["solver"])).value}  # fmt: skip
        row["built_in"]["schedule"] = built_in["schedule"].times.tolist()
        if nfe in args.large_nfe:
            large_reference = large_reference or {
                label: large.held_out(*pair).value for label, pair in converged.items()
            }
            row["large_reference"] = large_reference
        rows.append(row)
        _write(args, rows, reference, None, began)
    ablation = _ablation(args, source, cache) if args.ablation_nfe else None
    _write(args, rows, reference, ablation, began)


def _best_built_in(search: Objective, fd: Objective, noise: Any, nfe: int) -> dict[str, Any]:
    """The best built-in solver + spacing on the search seed, its FD scored held-out."""
    best: dict[str, Any] | None = None
    for name in (*SEED_SOLVERS, "unipc_bh1", "pndm"):
        solver = get_solver(name)
        try:
            steps = solver.num_steps_for_nfe(nfe)
        except ValueError:
            continue
        for spacing, schedule in spacing_schedules(noise, steps).items():
            value = search(schedule, solver).value
            if best is None or value < best["search"]:
                best = {"solver": name, "spacing": spacing, "search": value, "schedule": schedule}
    assert best is not None
    best["held_out_fd"] = fd.held_out(best["schedule"], get_solver(best["solver"])).value
    return best


def _ablation(args: Any, source: Any, cache: TensorCache) -> dict[str, Any]:
    """S³ with and without the predictor at each NFE of ``--ablation-nfe``: best search-seed and
    held-out score (``--metric``) per seed, at an equal number of true evaluations."""
    objective = Objective(source, args.metric, num_samples=args.ablation_samples,
                          held_out_samples=args.held_out_samples, cache=cache, progress=False)  # fmt: skip
    out = args.work / "ablation"
    out.mkdir(parents=True, exist_ok=True)
    # single evolutions (restarts=1): the predictor's worth at an equal number of evaluations
    chosen: dict[str, Any] = {"restarts": 1}
    if args.ablation_pick is not None:
        chosen["pick"] = args.ablation_pick
    s3_settings = {
        k: v for k, v in S3Settings(**chosen).to_json_dict().items() if k != "use_predictor"
    }
    result: dict[str, Any] = {"nfe": list(args.ablation_nfe), "budget": args.ablation_budget,
                              "metric": args.metric, "s3_settings": s3_settings, "runs": []}  # fmt: skip
    for nfe in args.ablation_nfe:
        starts = spacing_schedules(source.noise, nfe)
        for seed in range(args.ablation_seeds):
            for use in {"both": (True, False), "with": (True,), "without": (False,)}[
                args.ablation_arms
            ]:
                begin = time.perf_counter()
                storage = f"sqlite:///{out / f'nfe{nfe}-seed{seed}-{use}.sqlite3'}"
                with StudyStore.open(storage, "s3", metadata={"nfe": nfe}) as store:
                    found = s3_search(objective, nfe=nfe, budget=args.ablation_budget,
                                      store=store, seed=seed, schedules=starts,
                                      settings=S3Settings(use_predictor=use, **chosen))  # fmt: skip
                values = np.array(found.values)
                searched = values[[r.stage >= 0 for r in found.history]]
                solver = plan_solver_for(objective)
                held_out = objective.held_out(found.best, solver).value
                # the search seed's best, which the selection seed may have passed over
                first = min(found.history, key=lambda r: (sortable(r.value), r.index))
                unselected = (held_out if first.plan is found.best
                              else objective.held_out(first.plan, solver).value)  # fmt: skip
                run = {
                    "nfe": nfe,
                    "seed": seed,
                    "predictor": use,
                    "free_start": found.settings.free_start,
                    "search": found.best_score.value,
                    _HELD_OUT[args.metric]: held_out,
                    # the same run's held-out score had it taken the search seed's best
                    "held_out_search_best": unselected,
                    "selected_from": len(found.selection),
                    "best_after": {str(k): float(np.min(searched[:k]))
                                   for k in (25, 50, 100, 150, 200) if k <= searched.size},
                    # Kendall's tau of the predictor's picks, per stage (mean)
                    "ranking_agreement": float(np.mean(found.agreement))
                    if found.agreement else None,
                    "minutes": round((time.perf_counter() - begin) / 60, 2),
                }  # fmt: skip
                result["runs"].append(run)
                print(f"ablation NFE {nfe} seed {seed} predictor={use}: "
                      f"{run[_HELD_OUT[args.metric]]:.3f}", flush=True)  # fmt: skip
    return result


def ablation_summary(ablation: dict[str, Any]) -> list[dict[str, Any]]:
    """Per NFE with runs of both arms: the mean and sample standard deviation of the held-out
    score (the ablation's metric) over the seeds with and without the predictor, and whether the
    predictor's mean is lower (an NFE with one arm only, e.g. a stopped run, is left out)."""
    score = _HELD_OUT[ablation.get("metric", "fd")]
    rows = []
    for nfe in dict.fromkeys(run.get("nfe", ablation["nfe"]) for run in ablation["runs"]):
        arms = {r["predictor"] for r in ablation["runs"] if r.get("nfe", nfe) == nfe}
        if arms != {True, False}:
            continue
        row: dict[str, Any] = {"nfe": nfe}
        for use, key in ((True, "with"), (False, "without")):
            values = [r[score] for r in ablation["runs"]
                      if r.get("nfe", nfe) == nfe and r["predictor"] == use]  # fmt: skip
            row[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "seeds": len(values),
            }
        row["predictor_better"] = bool(row["with"]["mean"] < row["without"]["mean"])
        rows.append(row)
    return rows


def _ablation_key(ablation: dict[str, Any], predictor: bool = True) -> tuple[Any, ...]:
    """The settings an ablation's runs depend on; ``predictor=False``: those of its runs without
    the predictor (every S³ setting but those only the predictor stages use)."""
    settings = ablation.get("s3_settings")
    if settings is not None and int(settings.get("select_plans", 0)) <= 1:
        # no selection seed: its keys (absent before they existed) change nothing
        settings = {k: v for k, v in settings.items() if not k.startswith("select_")}
    if not predictor and settings is not None:
        settings = {k: v for k, v in settings.items() if k not in _PREDICTOR_ONLY}
    return ablation.get("budget"), ablation.get("metric", "fd"), settings


def _known_references(args: Any, labels: list[str]) -> dict[str, dict[str, float]]:
    """The converged solves' held-out FDs the results file holds at this run's sample counts
    (``held_out``: ``--held-out-samples``, ``large``: ``--large-samples``), for the same model."""
    old = _results(args)
    found: dict[str, dict[str, float]] = {}
    parts = [p for k, p in old.get("parts", {}).items() if k.startswith("families")]
    if not parts or any(p.get("model") != args.model for p in parts):
        return found
    if all(p.get("held_out_samples") == args.held_out_samples for p in parts):
        held_out = old.get("converged_held_out_fd") or {}
        if sorted(held_out) == sorted(labels):
            found["held_out"] = held_out
    large = [row["large_reference"] for row in old.get("rows", []) if "large_reference" in row]
    same = all(p.get("large_samples") == args.large_samples for p in parts)
    if large and same and sorted(large[-1]) == sorted(labels):
        found["large"] = large[-1]
    return found


def _results(args: Any) -> dict[str, Any]:
    """The results file's content (empty when there is none yet)."""
    try:
        return json.loads((args.results / "s3.json").read_text())
    except (OSError, ValueError):
        return {}


def _merged(
    args: Any, rows: list, ablation: dict | None, minutes: float
) -> tuple[list, dict | None, dict, list]:
    """This run's rows and ablation runs merged into the results file's: rows of NFEs this run
    did not search and ablation runs of NFEs it did not ablate are kept (so the parts can run
    separately, e.g. ``--nfe`` alone and ``--nfe --ablation-nfe 6``; a redone run, the same
    NFE, seed and arm, replaces the old one), with each part's settings. An ablation under other settings (budget, metric, S³ settings) is not merged: it moves to the
    earlier ablations, returned last; where only the predictor's settings differ, its runs
    without the predictor (which do not use it) that this run did not redo are kept, marked
    ``from_earlier``."""
    old = _results(args)
    mine = {row["nfe"] for row in rows}
    merged_rows = sorted(
        [row for row in old.get("rows", []) if row["nfe"] not in mine] + list(rows),
        key=lambda row: row["nfe"],
    )
    merged_ablation = ablation
    old_ablation = old.get("ablation")
    earlier = list(old.get("earlier_ablations", []))
    if (
        old_ablation
        and ablation is not None
        and _ablation_key(old_ablation) != _ablation_key(ablation)
    ):
        earlier.append(old_ablation)
        if _ablation_key(old_ablation, False) == _ablation_key(ablation, False):
            done = {(r["nfe"], r["seed"], r["predictor"]) for r in ablation["runs"]}
            kept = [{**r, "from_earlier": True} for r in old_ablation["runs"]
                    if not r["predictor"] and (r["nfe"], r["seed"], False) not in done]  # fmt: skip
            runs = sorted(ablation["runs"] + kept,
                          key=lambda r: (r["nfe"], r["seed"], not r["predictor"]))  # fmt: skip
            merged_ablation = {**ablation, "nfe": sorted({r["nfe"] for r in runs}), "runs": runs}
    elif old_ablation:
        redone = {(r["nfe"], r["seed"], r["predictor"]) for r in (ablation or {}).get("runs", [])}
        kept = [r for r in old_ablation["runs"]
                if (r.get("nfe"), r["seed"], r["predictor"]) not in redone]  # fmt: skip
        runs = sorted(kept + (ablation["runs"] if ablation else []),
                      key=lambda r: (r["nfe"], r["seed"], not r["predictor"]))  # fmt: skip
        merged_ablation = {**old_ablation, **(ablation or {}),
                           "nfe": sorted({r["nfe"] for r in runs}), "runs": runs}  # fmt: skip
    parts = dict(old.get("parts", {}))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("work", "cache", "results")}  # fmt: skip
    settings["minutes"] = minutes
    if rows:
        parts["families NFE " + ", ".join(str(nfe) for nfe in args.nfe)] = settings
    if ablation:
        for nfe in ablation["nfe"]:
            parts[f"ablation NFE {nfe}"] = settings
    return merged_rows, merged_ablation, parts, earlier


def _evolutions_text(settings: Mapping[str, Any]) -> str:
    """`` in each of N evolutions`` where the families' S³ ran more than one (runs before the
    option ran one)."""
    restarts = int(settings.get("restarts", 1))
    return f" in each of {restarts} evolutions" if restarts > 1 else ""


def _write(args: Any, rows: list, reference: dict, ablation: dict | None, began: float) -> None:
    minutes = round((time.perf_counter() - began) / 60, 1)
    rows, ablation, parts, earlier = _merged(args, rows if args.nfe else [], ablation, minutes)
    payload = {
        "benchmark": "s3",
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("work", "cache", "results")
        },
        "parts": parts,
        "converged_held_out_fd": reference,
        "rows": rows,
        "ablation": ablation,
        "earlier_ablations": earlier,
        "minutes": minutes,
        "environment": environment(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "s3.json", payload)
    atomic_write_text(args.results / "s3.md", _markdown(payload))


def _markdown(payload: dict[str, Any]) -> str:
    families = [v for k, v in payload.get("parts", {}).items() if k.startswith("families")]
    settings = families[0] if families else payload["settings"]
    names = [*settings["families"], "s3"]
    metric = {"fd": "FD-digits", "traj": "trajectory error"}[settings.get("metric", "fd")]
    lines = [
        f"## S³ vs the other search families, searched for {metric}: held-out FD-digits and "
        "trajectory error (lower is better)",
        "",
        f"Bundled `{settings['model']}` DDPM. Every family through the one job runner on one "
        f"objective ({metric}, {settings['num_samples']} samples on the search seed); scores on "
        f"the held-out seed ({settings['held_out_samples']} samples). S³: {settings['budget']} "
        f"evaluations{_evolutions_text(settings)}; AutoDiffusion: {settings['autodiffusion_budget']}. Converged solves on "
        "the same held-out noise: "
        + ", ".join(f"{k} **{v:.2f}**" for k, v in payload["converged_held_out_fd"].items())
        + f". {_minutes_text(payload, families)}",
        "",
        *([payload["note"], ""] if payload.get("note") else []),
        "| NFE | best built-in | " + " | ".join(names) + " | S³ best? |",
        "| ---: | --- | " + " | ".join("---:" for _ in names) + " | --- |",
    ]
    for row in payload["rows"]:
        values = {n: row["results"].get(n, {}).get("held_out_fd") for n in names}
        ranked = [v for n, v in values.items() if v is not None and n != "s3"]
        best = values["s3"] is not None and all(values["s3"] < v for v in ranked)
        built = row["built_in"]
        cells = [f"{v:.2f}" if v is not None else "-" for v in values.values()]
        lines.append(
            f"| {row['nfe']} | {built['solver']} / {built['spacing']} {built['held_out_fd']:.2f} | "
            + " | ".join(cells)
            + f" | {'yes' if best else 'no'} |"
        )
    passed_over = [row for row in payload["rows"] if "search_best" in row["results"].get("s3", {})]
    if passed_over:
        lines += ["", "Where S³'s pick on the selection seed is not its best plan on the search "
                  "seed, that plan's held-out FD (what S³ would have reported without the "
                  "selection seed):", ""]  # fmt: skip
        for row in passed_over:
            s3 = row["results"]["s3"]
            large = s3["search_best"].get("large_fd")
            lines.append(f"- NFE {row['nfe']}: pick {s3['held_out_fd']:.2f}, the search seed's "
                         f"best {s3['search_best']['held_out_fd']:.2f}"
                         + (f" ({settings['large_samples']} samples: {s3['large_fd']:.2f} vs {large:.2f})"
                            if large is not None else ""))  # fmt: skip
    schedule_only = [n for n in names if n in SCHEDULE_ONLY]
    lines += ["", "Held-out trajectory error (RMS to the converged solve, same noise; S³ against "
              "the schedule-only searches " + ", ".join(schedule_only) + "):", "",
              "| NFE | best built-in | " + " | ".join(names) + " | S³ best? |",
              "| ---: | ---: | " + " | ".join("---:" for _ in names) + " | --- |"]  # fmt: skip
    for row in payload["rows"]:
        values = {n: row["results"].get(n, {}).get("held_out_traj") for n in names}
        cells = [f"{v:.4f}" if v is not None else "-" for v in values.values()]
        best = values["s3"] is not None and all(
            values["s3"] < values[n] for n in schedule_only if values[n] is not None
        )
        lines.append(f"| {row['nfe']} | {row['built_in']['held_out_traj']:.4f} | "
                     + " | ".join(cells) + f" | {'yes' if best else 'no'} |")  # fmt: skip
    large = [row for row in payload["rows"] if "large_reference" in row]
    if large:
        lines += ["", f"At {settings['large_samples']} held-out samples (FD, and S³'s ratio to "
                  "each converged solve):", ""]  # fmt: skip
        for row in large:
            s3 = row["results"].get("s3", {}).get("large_fd")
            if s3 is None:  # S³ skipped (its error is in the JSON)
                continue
            others = ", ".join(f"{n} {row['results'][n]['large_fd']:.2f}" for n in names
                               if "large_fd" in row["results"].get(n, {}) and n != "s3")  # fmt: skip
            ratios = ", ".join(f"{s3 / v:.2f}x {k}" for k, v in row["large_reference"].items())
            lines.append(f"- NFE {row['nfe']}: S³ **{s3:.2f}** ({ratios}); {others}")
    for row in payload["rows"]:
        if "s3" in row["results"] and "plan" in row["results"]["s3"]:
            lines += ["", f"S³ plan at NFE {row['nfe']} (from {row['results']['s3']['best_origin']}):",
                      "", "```", row["results"]["s3"]["plan"], "```"]  # fmt: skip
    if not payload["rows"]:  # an ablation-only results file
        lines = ["## S³ predictor ablation on the bundled digits DDPM"]
    if payload.get("ablation"):
        lines += _ablation_markdown(payload["ablation"], "Predictor ablation")
    for earlier in payload.get("earlier_ablations", []):
        lines += _ablation_markdown(earlier, "An earlier ablation, under other settings")
    return "\n".join(lines) + "\n"


def _minutes_text(payload: dict[str, Any], families: list[dict[str, Any]]) -> str:
    """The wall time of the families protocol: one run's, or each run's when rows were merged."""
    minutes = [part["minutes"] for part in families if "minutes" in part]
    if len(minutes) > 1:
        return f"Total {sum(minutes):.1f} min in {len(minutes)} runs ({' + '.join(map(str, minutes))})."
    return f"Total {minutes[0] if minutes else payload['minutes']} min."


def _ablation_markdown(ablation: dict[str, Any], title: str) -> list[str]:
    """The ablation's runs and its per-NFE summary, as markdown lines."""
    lines: list[str] = []
    key = _HELD_OUT[ablation.get("metric", "fd")]
    name = {"held_out_fd": "FD", "held_out_traj": "trajectory error"}[key]
    settings = ablation.get("s3_settings")
    lines += ["", f"### {title} ({ablation['budget']} true evaluations per run, {name})", "",
              *([f"S³ settings: `{json.dumps(settings)}`", ""] if settings else []),
              f"| NFE | seed | predictor | search | held-out {name} | the search seed's best, "
              "held-out | best after 25 / 50 / 100 | ranking agreement |",
              "| ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |"]  # fmt: skip
    for run in ablation["runs"]:
        after = " / ".join(f"{v:.4g}" for k, v in run["best_after"].items() if int(k) <= 100)
        lines.append(f"| {run.get('nfe', ablation['nfe'])} | {run['seed']} | "
                     f"{'yes' if run['predictor'] else 'no'} | {run['search']:.4g} | "
                     f"{run[key]:.4g} | {_held_out_search_best(run)} | {after} | "
                     f"{_tau(run.get('ranking_agreement'))} |")  # fmt: skip
    summary = ablation_summary(ablation)
    lines += ["", f"| NFE | held-out {name} with the predictor (mean ± s.d. over seeds) | without | "
              "predictor better |", "| ---: | ---: | ---: | --- |"]  # fmt: skip
    for row in summary:
        cells = [f"{row[k]['mean']:.4g} ± {row[k]['std'] or float('nan'):.2g}"
                 for k in ("with", "without")]  # fmt: skip
        lines.append(f"| {row['nfe']} | {cells[0]} | {cells[1]} | "
                     f"{'yes' if row['predictor_better'] else 'no'} |")  # fmt: skip
    wins = sum(row["predictor_better"] for row in summary)
    lines.append(f"\nThe predictor's mean is lower at {wins} of {len(summary)} NFEs.")
    return lines


def _held_out_search_best(run: dict[str, Any]) -> str:
    """The held-out score of the search seed's best plan, where the run picked on a selection
    seed ("-": a run without one, which took that plan)."""
    value = run.get("held_out_search_best")
    return "-" if value is None or not run.get("selected_from") else f"{value:.4g}"


def _tau(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


if __name__ == "__main__":
    main()
