"""How well S³'s predictor ranks plans it never saw, on the bundled digits DDPM.

The predictor's job in a search is to screen children of the best plans evaluated so far
(:mod:`stepsearch.search.s3`). This measures exactly that, without the search's own bias: a search
*without* the predictor (``--budget`` true evaluations, FD-digits on ``--num-samples`` samples of
the search seed) gives stages of children drawn blindly; for every stage ``s >= --min-stage`` a
predictor is trained on the plans of the stages before it (as the search would) and ranks the
stage's children. Reported per predictor, as the mean and standard error over stages:

- ``tau``: Kendall's tau between predicted and true scores on the stage's evolution children
  (the plans the predictor screens in a search; 1: the true order, 0: chance);
- ``tau_all``: the same on every plan of the stage (its bold random variants too);
- ``pick_gain``: mean log FD of the predictor's ``--picks`` best children minus the mean log FD of
  all the stage's children (below 0: its picks are better than blind ones).

Predictors: the default (:class:`~stepsearch.search.predictor.PredictorSettings`) on the plan's
own features and with the plan proxy's error as one more feature (what S³ uses by default since
2026-12-07, :mod:`stepsearch.search.plan_proxy`), the proxy's error alone (no training), the one
used before 2026-12-06 (hinge loss on raw features), and a nearest-neighbour baseline with no
training (the value of the closest evaluated plan in standardized pooled features).

The in-search ``ranking_agreement`` of ``benchmarks/s3.py`` is not this: it ranks only the
predictor's own picks, the candidates it already scored best, a narrow range that pulls tau
towards 0 even for a good ranker.

Run (the committed results; the searches ~12 min each on one core, the predictors ~1 min)::

    OMP_NUM_THREADS=1 python benchmarks/s3_predictor.py --nfe 4 5

Results: ``benchmarks/results/s3_predictor.{json,md}``. The searches' trials live in ``--work``
(one SQLite study per NFE): a rerun replays them from the store.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau

from stepsearch._io import atomic_write_json, atomic_write_text
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.eval.report import environment
from stepsearch.models import load_source
from stepsearch.search.job import spacing_schedules
from stepsearch.search.plan_proxy import PlanProxy
from stepsearch.search.predictor import PredictorSettings, train_predictor
from stepsearch.search.s3 import Features, S3Settings, _featurizer, plan_solver_for, s3_search
from stepsearch.search.store import StudyStore

RESULTS = Path(__file__).parent / "results"

Ranker = Callable[[Sequence[np.ndarray], np.ndarray, Sequence[np.ndarray], int], np.ndarray]
"""``(train features, train values, test features, stage) -> predicted scores`` (lower: better)."""


def learned(settings: PredictorSettings) -> Ranker:
    def rank(train: Sequence[np.ndarray], values: np.ndarray, test: Sequence[np.ndarray],
             stage: int) -> np.ndarray:  # fmt: skip
        model = train_predictor(list(train), list(values), seed=stage, settings=settings)
        return model.scores(list(test))

    return rank


def _pooled(plans: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.concatenate([p.mean(0), p[0], p[-1], [p.shape[0]]]) for p in plans])


def nearest(train: Sequence[np.ndarray], values: np.ndarray, test: Sequence[np.ndarray],
            stage: int) -> np.ndarray:  # fmt: skip
    """The log value of the nearest evaluated plan (standardized pooled features)."""
    known, asked = _pooled(train), _pooled(test)
    mean, scale = known.mean(0), known.std(0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    known, asked = (known - mean) / scale, (asked - mean) / scale
    distance = ((asked[:, None, :] - known[None, :, :]) ** 2).sum(-1)
    return np.log(values[np.argmin(distance, axis=1)])


def proxy_alone(train: Sequence[np.ndarray], values: np.ndarray, test: Sequence[np.ndarray],
                stage: int) -> np.ndarray:  # fmt: skip
    """The plan proxy's log error (the last feature column, with the proxy's features)."""
    return np.array([float(rows[0, -1]) for rows in test])


def study(
    history: Sequence[Any], rank: Ranker, min_stage: int, picks: int, featurize: Features
) -> dict[str, Any]:
    features = [featurize(r.plan) for r in history]
    values = np.array([r.value for r in history], dtype=np.float64)
    stages = sorted({r.stage for r in history if r.stage >= min_stage})
    per_stage = []
    for stage in stages:
        train = [k for k, r in enumerate(history) if r.stage < stage]
        test = [k for k, r in enumerate(history) if r.stage == stage]
        children = [j for j, k in enumerate(test) if history[k].origin == "evolution"]
        predicted = rank([features[k] for k in train], values[train],
                         [features[k] for k in test], stage)  # fmt: skip
        logs = np.log(values[test])
        best = np.array(children)[np.argsort(predicted[children], kind="stable")[:picks]]
        per_stage.append({
            "stage": stage,
            "tau": float(kendalltau(predicted[children], logs[children]).statistic),
            "tau_all": float(kendalltau(predicted, logs).statistic),
            "pick_gain": float(logs[best].mean() - logs[children].mean()),
        })  # fmt: skip
    summary = {}
    for key in ("tau", "tau_all", "pick_gain"):
        column = np.array([s[key] for s in per_stage])
        summary[key] = {"mean": float(column.mean()),
                        "se": float(column.std(ddof=1) / np.sqrt(column.size))}  # fmt: skip
    return {"summary": summary, "stages": per_stage}


PREDICTORS: dict[str, tuple[Ranker, bool]] = {
    "default, plan features and the proxy's error (S³ since 2026-12-07)": (
        learned(PredictorSettings()),
        True,
    ),
    "default, plan features alone (standardized, logistic loss)": (
        learned(PredictorSettings()),
        False,
    ),
    "the proxy's error alone (no training)": (proxy_alone, True),
    "before 2026-12-06 (raw features, hinge loss)": (
        learned(PredictorSettings(loss="hinge", standardize=False)),
        False,
    ),
    "nearest evaluated plan (no training)": (nearest, False),
}
"""Each predictor and whether it sees the plan proxy's error as a feature."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--nfe", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--budget", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--min-stage", type=int, default=2)
    parser.add_argument("--picks", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("runs/s3-predictor"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    began = time.perf_counter()
    source = load_source(args.model)
    objective = Objective(source, "fd", num_samples=args.num_samples, held_out_samples=1000,
                          cache=TensorCache.default(), progress=False)  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for nfe in args.nfe:
        storage = f"sqlite:///{args.work / f'nfe{nfe}-seed{args.seed}.sqlite3'}"
        with StudyStore.open(storage, "s3", metadata={"nfe": nfe}) as store:
            found = s3_search(objective, nfe=nfe, budget=args.budget, store=store,
                              seed=args.seed, schedules=spacing_schedules(source.noise, nfe),
                              settings=S3Settings(use_predictor=False))  # fmt: skip
        row: dict[str, Any] = {"nfe": nfe, "plans": len(found.history), "predictors": {}}
        solver = plan_solver_for(objective)
        proxy = PlanProxy.for_source(source)
        for name, (rank, with_proxy) in PREDICTORS.items():
            featurize = _featurizer(proxy if with_proxy else None, solver)
            row["predictors"][name] = study(
                found.history, rank, args.min_stage, args.picks, featurize
            )
            print(f"NFE {nfe} {name}: {row['predictors'][name]['summary']}", flush=True)
        rows.append(row)
    payload = {
        "benchmark": "s3_predictor",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "minutes": round((time.perf_counter() - began) / 60, 1),
        "environment": environment(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "s3_predictor.json", payload)
    atomic_write_text(args.results / "s3_predictor.md", _markdown(payload))


def _markdown(payload: dict[str, Any]) -> str:
    settings = payload["settings"]
    lines = [
        "## S³'s predictor on plans it never saw (bundled digits DDPM)",
        "",
        f"A search without the predictor ({settings['budget']} FD evaluations, "
        f"{settings['num_samples']} samples, seed {settings['seed']}); each stage from "
        f"{settings['min_stage']} on is ranked by a predictor trained on the stages before it. "
        "Mean ± standard error over stages. `tau`: Kendall's tau on the stage's evolution "
        "children (what the predictor screens); `tau (all)`: on every plan of the stage; "
        f"`pick gain`: mean log FD of its {settings['picks']} best-ranked children minus that "
        "of all of them (below 0: better than blind picks).",
        "",
        "| NFE | predictor | tau | tau (all) | pick gain |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for row in payload["rows"]:
        for name, result in row["predictors"].items():
            cells = [f"{result['summary'][k]['mean']:+.3f} ± {result['summary'][k]['se']:.3f}"
                     for k in ("tau", "tau_all", "pick_gain")]  # fmt: skip
            lines.append(f"| {row['nfe']} | {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nTotal {payload['minutes']} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
