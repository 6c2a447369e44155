"""Does S³'s predictor pick the truly best of a parent's children? (the ``pick="siblings"`` check)

For a finished S³ search (a study of ``benchmarks/s3.py``'s predictor ablation), the predictor is
trained on the search's first ``--history`` evaluated plans, as a stage would train it; then
``--families`` times the parent(s) are drawn from the 16 best of them as the evolution draws them,
8 unseen children of each are made, the predictor ranks them and every child is truly scored on
the search objective (FD-digits, 256 samples of the search seed). Reported per family: the true
rank of the predictor's pick among its siblings (1 = the best), its FD against the siblings'
median and best, and Kendall's tau of predicted vs true scores. Writes
``benchmarks/results/s3-siblings/sibling_ranks.json``.

Run (after ``benchmarks/s3.py --nfe --ablation-nfe 4 5 --ablation-arms with --ablation-pick
siblings --work runs/s3``)::

    OMP_NUM_THREADS=1 python benchmarks/s3_sibling_ranks.py --nfe 4 5   # ~5 min per NFE
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau

from stepsearch._io import atomic_write_json
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.eval.report import environment
from stepsearch.models import load_source
from stepsearch.search.job import sortable
from stepsearch.search.plan_space import PlanSpace, plan_key, step_features
from stepsearch.search.predictor import train_predictor
from stepsearch.search.s3 import S3Settings, _family, _offspring, plan_solver_for
from stepsearch.search.store import StudyStore

RESULTS = Path(__file__).resolve().parent / "results" / "s3-siblings"


def sibling_ranks(
    objective: Objective, store: StudyStore, nfe: int, history: int, families: int, seed: int
) -> dict[str, Any]:
    """One search's families (module docstring)."""
    solver = plan_solver_for(objective)
    trials = sorted(store.trials(), key=lambda t: t.attrs.get("index", t.number))[:history]
    plans = [t.candidate() for t in trials]
    values = [float(t.value) for t in trials]  # type: ignore[arg-type]
    settings = S3Settings(pick="siblings")
    space = PlanSpace.for_noise(
        objective.source.noise, nfe, data_mean=solver.data_mean is not None, free_start=True
    )
    predictor = train_predictor(
        [step_features(p) for p in plans], values, seed=1, settings=settings.predictor
    )
    order = np.argsort([sortable(v) for v in values], kind="stable")
    parents = [plans[k] for k in order[: settings.parents]]
    seen = {plan_key(p) for p in plans}
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(families):
        family = _family(len(parents), settings, rng)
        children: dict[str, Any] = {}
        for _ in range(settings.siblings):
            child = _offspring(space, parents, family, rng)
            if child is not None and plan_key(child) not in seen:
                children.setdefault(plan_key(child), child)
        kids = list(children.values())
        if len(kids) < 3:
            continue
        predicted = predictor.scores([step_features(k) for k in kids])
        true = np.array([objective(k, solver).value for k in kids])
        pick = int(np.argmin(predicted))
        rows.append({
            "parents": [int(order[k]) for k in family],
            "children": len(kids),
            "pick_true_rank": int((true < true[pick]).sum()) + 1,
            "pick": float(true[pick]),
            "median": float(np.median(true)),
            "best": float(true.min()),
            "tau": float(kendalltau(predicted, true).statistic),
        })  # fmt: skip
    return {
        "nfe": nfe,
        "history": len(plans),
        "families": rows,
        "mean_pick_rank": float(np.mean([r["pick_true_rank"] for r in rows])),
        "mean_random_rank": float(np.mean([(r["children"] + 1) / 2 for r in rows])),
        "median_pick_minus_median": float(np.median([r["pick"] - r["median"] for r in rows])),
        "worst_pick_over_median": float(max(r["pick"] / r["median"] for r in rows)),
        "mean_tau": float(np.mean([r["tau"] for r in rows])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--search-seed", type=int, default=0, help="the ablation run's seed")
    parser.add_argument("--history", type=int, default=120)
    parser.add_argument("--families", type=int, default=8)
    parser.add_argument("--seed", type=int, default=123, help="the families' draws")
    parser.add_argument("--work", type=Path, default=Path("runs/s3"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    paths = {nfe: args.work / "ablation" / f"nfe{nfe}-seed{args.search_seed}-True.sqlite3"
             for nfe in args.nfe}  # fmt: skip
    for path in paths.values():  # before any work
        if not path.is_file():
            raise SystemExit(f"no ablation study at {path}: run benchmarks/s3.py's ablation first")
    source = load_source("digits")
    objective = Objective(source, "fd", num_samples=256, held_out_samples=1000,
                          cache=TensorCache.default(), progress=False)  # fmt: skip
    found = []
    for nfe in args.nfe:
        with StudyStore.open(f"sqlite:///{paths[nfe]}", "s3", metadata={"nfe": nfe}) as store:
            found.append(
                sibling_ranks(objective, store, nfe, args.history, args.families, args.seed)
            )
        print({k: v for k, v in found[-1].items() if k != "families"}, flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "s3_sibling_ranks",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": found,
        "minutes": round((time.perf_counter() - began) / 60, 1),
        "environment": environment(),
    }
    atomic_write_json(args.results / "sibling_ranks.json", payload)


if __name__ == "__main__":
    main()
