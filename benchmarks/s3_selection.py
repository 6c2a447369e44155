"""Does a larger selection sample rank S³'s best plans as the held-out judge does?

An S³ search scores every plan by FD-digits on a few hundred samples of the search seed, and the
best of ~200 such noisy scores is partly luck (the winner's curse): at NFE 6 two searches ended on
the same search-seed score (26.10, 26.09) and 12.6 vs 14.9 held-out. ``S3Settings.select_plans``
re-scores the best plans on a separate selection seed; at 1,024 samples it did not pay on digits
(``results/s3-select8``). FD is biased upwards by a term that shrinks like ``1/N`` and differs
from plan to plan, so a ranking at small ``N`` need not be the ranking at 5,000. This measures,
for the ``--top`` best plans of finished S³ searches, how well each ranking agrees with the
held-out judge (FD-digits on ``--held-out-samples`` of the held-out seed, 1):

- ``search``: the search seed's own scores (what S³ picks by without a selection);
- ``select N``: FD on ``N`` samples of the selection seed (``--select-seed``, 3, as S³'s default),
  for each ``N`` of ``--select-samples``.

Per NFE: Kendall's tau of each ranking against the held-out scores, the held-out score of each
ranking's pick, and the best held-out score among the plans (what a perfect pick would get). A
diagnostic for choosing ``select_samples``, not a search result: the held-out seed is looked at.

The searches are ``benchmarks/s3.py``'s (their studies under its ``--work``), e.g.::

    OMP_NUM_THREADS=1 python benchmarks/s3.py --nfe 5 --large-nfe 5 --ablation-nfe --work W
    OMP_NUM_THREADS=1 python benchmarks/s3_selection.py --work W --nfe 5

Results: ``benchmarks/results/s3_selection.{json,md}`` (rows of other NFEs in the file are kept).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from scipy.stats import kendalltau

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.eval.objective import Objective
from stepsearch.eval.report import environment
from stepsearch.models import load_source
from stepsearch.search.s3 import plan_solver_for
from stepsearch.search.store import StoredTrial

RESULTS = Path(__file__).parent / "results"
EARLIER_NOTE = (
    "The first version of this check (2026-12-06, the searches of an earlier default): the 8 best "
    "plans rescored on 1,024 samples of seed 10 ('select') and judged on 1,000 held-out samples."
)


def top_trials(study_path: Path, count: int) -> list[StoredTrial]:
    """The ``count`` completed trials with the lowest search score (earliest among ties)."""
    url = f"sqlite:///{study_path}"
    names = optuna.get_all_study_names(url)
    if len(names) != 1:
        raise ValueError(f"{study_path}: expected one study, found {names}")
    study = optuna.load_study(study_name=names[0], storage=url)
    done = [StoredTrial.from_frozen(t) for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]  # fmt: skip
    return sorted(done, key=lambda t: (float(t.value), t.number))[:count]


def study_path(work: Path, nfe: int) -> Path:
    """Where ``benchmarks/s3.py --work work`` keeps the S³ study of ``nfe``."""
    return work / f"nfe-{nfe}" / "s3" / "study.sqlite3"


def judge_nfe(args: argparse.Namespace, base: Objective, nfe: int) -> dict[str, Any]:
    """The top plans of ``nfe``'s study scored on each selection sample count and held-out
    (``base``: the searches' objective, held-out split at ``--held-out-samples``)."""
    solver = plan_solver_for(base)
    selections = {n: base.reseeded(args.select_seed, n) for n in args.select_samples}
    plans = []
    for trial in top_trials(study_path(args.work, nfe), args.top):
        plan = trial.candidate()
        row: dict[str, Any] = {"trial": trial.number, "origin": trial.attrs.get("origin"),
                               "search": float(trial.value)}  # fmt: skip
        for n, objective in selections.items():
            row[f"select {n}"] = objective(plan, solver).value
        row["held_out"] = base.held_out(plan, solver).value
        plans.append(row)
        print(f"NFE {nfe} trial {trial.number}: " + json.dumps(
            {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}), flush=True)  # fmt: skip
    held_out = np.array([p["held_out"] for p in plans])
    rankings: dict[str, Any] = {}
    for key in ["search", *(f"select {n}" for n in args.select_samples)]:
        values = np.array([p[key] for p in plans])
        rankings[key] = {
            "tau": float(kendalltau(values, held_out).statistic),
            "pick_held_out": float(held_out[int(np.argmin(values))]),
        }
    return {"nfe": nfe, "plans": plans, "rankings": rankings,
            "best_held_out": float(held_out.min())}  # fmt: skip


def markdown(payload: dict[str, Any]) -> str:
    s = payload["settings"]
    keys = ["search", *(f"select {n}" for n in s["select_samples"])]
    lines = [
        "## Ranking S³'s best plans: search seed vs a selection seed vs the held-out judge",
        "",
        f"Bundled `{s['model']}` DDPM; the {s['top']} best plans (search-seed FD-digits on "
        f"{s['num_samples']} samples) of each `benchmarks/s3.py` search, re-scored on the "
        f"selection seed ({s['select_seed']}) and judged on {s['held_out_samples']} samples of "
        "the held-out seed (1). Kendall's tau against the held-out scores; the held-out score "
        "of each ranking's pick (lower is better).",
        "",
        "| NFE | " + " | ".join(f"{k}: tau / pick" for k in keys) + " | best of the plans |",
        "| ---: | " + " | ".join("---" for _ in keys) + " | ---: |",
    ]
    for row in payload["rows"]:
        cells = [f"{row['rankings'][k]['tau']:+.2f} / {row['rankings'][k]['pick_held_out']:.2f}"
                 for k in keys]  # fmt: skip
        lines.append(f"| {row['nfe']} | " + " | ".join(cells) + f" | {row['best_held_out']:.2f} |")
    lines += ["", "Per plan (FD-digits):", ""]
    lines.append("| NFE | trial | origin | " + " | ".join(keys) + " | held-out |")
    lines.append("| ---: | ---: | --- | " + " | ".join("---:" for _ in keys) + " | ---: |")
    for row in payload["rows"]:
        for p in row["plans"]:
            values = " | ".join(f"{p[k]:.2f}" for k in keys)
            lines.append(f"| {row['nfe']} | {p['trial']} | {p['origin']} | {values} | "
                         f"{p['held_out']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="benchmarks/s3.py's --work")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 6])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=256, help="the searches' samples")
    parser.add_argument("--select-seed", type=int, default=3)
    parser.add_argument("--select-samples", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--held-out-samples", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    path = args.results / "s3_selection.json"
    missing = [str(study_path(args.work, n)) for n in args.nfe
               if not study_path(args.work, n).is_file()]  # fmt: skip
    if missing:
        raise SystemExit(f"s3_selection: no S³ study at {', '.join(missing)} (run benchmarks/s3.py "
                         "with this --work first)")  # fmt: skip
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("work", "results", "nfe")}  # fmt: skip
    old = json.loads(path.read_text()) if path.exists() else {}
    earlier = old.get("earlier")
    if old and old.get("benchmark") != "s3_selection":  # the first version's file (2026-12-06)
        earlier, old = {"note": EARLIER_NOTE, "results": old}, {}
    if old and {k: v for k, v in old["settings"].items() if k != "threads"} != {
        k: v for k, v in settings.items() if k != "threads"
    }:
        raise SystemExit(f"s3_selection: {path} holds rows of other settings ({old['settings']}); "
                         "pass another --results")  # fmt: skip
    source = load_source(args.model)
    base = Objective(source, "fd", num_samples=args.num_samples,
                     held_out_samples=args.held_out_samples, progress=False)  # fmt: skip
    rows = {row["nfe"]: row for row in old.get("rows", [])}
    for nfe in args.nfe:
        rows[nfe] = judge_nfe(args, base, nfe)
    payload = {
        "benchmark": "s3_selection",
        "settings": settings,
        "rows": [rows[k] for k in sorted(rows)],
        "minutes": round((time.perf_counter() - began) / 60, 1),
        "environment": environment(),
    }
    if earlier is not None:
        payload["earlier"] = earlier
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)
    atomic_write_text(args.results / "s3_selection.md", markdown(payload))


if __name__ == "__main__":
    main()
