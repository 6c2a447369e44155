"""``stepsearch optimize --storage`` with one and with two workers on the bundled digits model.

Runs ``stepsearch optimize --model digits --nfe 4 5 6 --budget-evals N`` twice, each time on a
fresh study store and a fresh tensor cache (``$STEPSEARCH_CACHE``) so that neither run reuses the
other's teachers: once as one worker, once as two workers started together on one store, each
worker on its own core (``taskset -c K``, ``OMP_NUM_THREADS=1``) with its own ``--out``. It checks
that every report is the same (timings and file locations aside) and writes
``benchmarks/results/optimize_workers.{json,md}``: the wall times and their ratio (goal: two
workers <= 0.65x one), the tasks each worker ran, the machine.

The store is a SQLite file by default; ``--postgres URL`` (e.g. the server of
``scripts/ci_postgres.sh``) creates two fresh databases on that server for the two runs instead.

Run: ``python benchmarks/optimize_workers.py`` (``--quick``: NFE 4 5, 32 / 64 / 64 samples, OLSS,
AutoDiffusion and S³ only, a 20,000-evaluation budget).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.eval.report import environment

RESULTS = Path(__file__).resolve().parent / "results"


def _fresh_database(server: str, name: str) -> str:
    """A new database ``name`` on the PostgreSQL server of URL ``server``; its URL."""
    import sqlalchemy

    url = server.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server.rsplit("/", 1)[0] + "/" + name


def _command(args: argparse.Namespace, out: Path, storage: str, worker: str) -> list[str]:
    command = [sys.executable, "-m", "stepsearch", "optimize", "--model", "digits",
               "--nfe", *map(str, args.nfe), "--budget-evals", str(args.budget_evals),
               "--budget-minutes", "600", "--storage", storage, "--worker-name", worker,
               "--out", str(out), "--overwrite"]  # fmt: skip
    if args.quick:
        command += ["--num-samples", "32", "--select-samples", "64", "--held-out-samples", "64",
                    "--methods", "olss", "autodiffusion", "s3"]  # fmt: skip
    return command


def _run_workers(
    args: argparse.Namespace, folder: Path, storage: str, count: int
) -> dict[str, Any]:
    """``count`` workers on one store, worker ``k`` on core ``k``; their wall time and reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPSEARCH_CACHE": str(folder / "cache")}
    began = time.perf_counter()
    processes = []
    for k in range(count):
        name = f"worker-{k}"
        command = ["taskset", "-c", str(k), *_command(args, folder / name, storage, name)]
        log = open(folder / f"{name}.log", "w")  # noqa: SIM115 - closed below
        processes.append((name, subprocess.Popen(command, env=env, stdout=log, stderr=log), log))
    for name, process, log in processes:
        process.wait()
        log.close()
        if process.returncode != 0:
            tail = (folder / f"{name}.log").read_text()[-3000:]
            raise SystemExit(f"{name} failed ({process.returncode}):\n{tail}")
    seconds = time.perf_counter() - began
    reports = {
        name: json.loads((folder / name / "report.json").read_text()) for name, _, _ in processes
    }
    tasks, busy = _tasks(storage)
    return {"seconds": seconds, "reports": reports, "tasks": tasks, "busy": busy}


def _tasks(storage: str) -> tuple[dict[str, list[str]], dict[str, float]]:
    """The tasks each worker completed and the seconds it spent in them, from the store."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage if "://" in storage else f"sqlite:///{storage}"
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    done: dict[str, list[str]] = {}
    busy: dict[str, float] = {}
    for summary in optuna.get_all_study_summaries(url):
        if not summary.study_name.startswith("optimize-"):
            continue
        for trial in optuna.load_study(study_name=summary.study_name, storage=url).get_trials():
            if trial.state.name == "COMPLETE":
                worker = trial.user_attrs["worker"]["id"]
                done.setdefault(worker, []).append(trial.user_attrs["key"])
                spent = (trial.datetime_complete - trial.datetime_start).total_seconds()
                busy[worker] = round(busy.get(worker, 0.0) + spent, 1)
    return done, busy


def _comparable(report: Any) -> Any:
    if isinstance(report, dict):
        return {k: _comparable(v) for k, v in report.items() if k not in ("seconds", "files")}
    if isinstance(report, list):
        return [_comparable(v) for v in report]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6])
    # AutoDiffusion and S³ split it over 6 stages; each needs its 6 starts and a trial of
    # 256 samples x NFE 6 at the default sample count: 6 x 64,512 = 387,072 at least
    parser.add_argument("--budget-evals", type=int, default=400_000)
    parser.add_argument("--postgres", metavar="URL", help="a PostgreSQL server (its database URL)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "optimize_workers")
    args = parser.parse_args()
    if args.quick:
        args.nfe, args.budget_evals = [4, 5], 20_000
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("two workers need two cores")
    runs: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="optimize-workers-") as scratch:
        for count in (1, 2):
            folder = Path(scratch) / f"workers-{count}"
            folder.mkdir()
            if args.postgres:
                storage = _fresh_database(
                    args.postgres, f"stepsearch_w{count}_{uuid.uuid4().hex[:8]}"
                )
            else:
                storage = str(folder / "store.sqlite3")
            runs[count] = _run_workers(args, folder, storage, count)
            print(f"{count} worker(s): {runs[count]['seconds']:.1f} s", flush=True)
    reports = [_comparable(r) for run in runs.values() for r in run["reports"].values()]
    identical = all(report == reports[0] for report in reports)
    ratio = runs[2]["seconds"] / runs[1]["seconds"]
    result = {
        "nfe": args.nfe,
        "budget_evals": args.budget_evals,
        "quick": bool(args.quick),
        "store": "postgresql" if args.postgres else "sqlite",
        "seconds": {str(count): round(run["seconds"], 1) for count, run in runs.items()},
        "ratio_two_over_one": round(ratio, 3),
        "goal_ratio": 0.65,
        "identical_reports": identical,
        "tasks": {str(count): run["tasks"] for count, run in runs.items()},
        "busy_seconds": {str(count): run["busy"] for count, run in runs.items()},
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    lines = [
        "# optimize with one and two workers on one study",
        "",
        f"`stepsearch optimize --model digits --nfe {' '.join(map(str, args.nfe))} "
        f"--budget-evals {args.budget_evals}`{' (quick settings)' if args.quick else ''}, "
        f"{result['store']} store, one core per worker.",
        "",
        "| workers | wall time (s) | tasks per worker | seconds in tasks per worker |",
        "| ---: | ---: | --- | --- |",
    ]
    for count, run in runs.items():
        tasks = ", ".join(f"{w}: {len(t)}" for w, t in sorted(run["tasks"].items()))
        busy = ", ".join(f"{w}: {b:.0f}" for w, b in sorted(run["busy"].items()))
        lines.append(f"| {count} | {run['seconds']:.1f} | {tasks} | {busy} |")
    lines += ["", f"Two workers / one: {ratio:.2f}x (goal <= 0.65x). Reports identical: "
              f"{'yes' if identical else 'NO'}."]  # fmt: skip
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    if not identical:
        raise SystemExit("the reports differ")


if __name__ == "__main__":
    main()
