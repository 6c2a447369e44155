"""Would a selection stage help S³? A check on the studies of a ``benchmarks/s3.py`` run.

For each NFE's S³ study in the benchmark's work folder: the ``top`` plans by search-seed FD,
rescored on a selection seed (10, ``select_samples`` samples) and on the held-out seed (1, 1,000
samples, the benchmark's held-out split); the plan a selection stage would take (best on the
selection seed) beside the search winner, both held-out. Results:
``benchmarks/results/s3_selection.json``.

    python benchmarks/s3_selection.py runs/s3 8 1024 3 4 5
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import torch

from stepsearch._io import atomic_write_json
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models import load_source
from stepsearch.search.s3 import plan_solver_for
from stepsearch.search.store import StoredTrial

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    work, top, select_samples = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    source = load_source("digits")
    cache = TensorCache.default()
    held = Objective(source, "fd", num_samples=256, held_out_samples=1000, cache=cache)
    select = Objective(source, "fd", num_samples=select_samples, search_seed=10,
                       held_out_seed=1, cache=cache)  # fmt: skip
    solver = plan_solver_for(held)
    out = {}
    for nfe in sys.argv[4:]:
        url = f"sqlite:///{work / f'nfe-{nfe}' / 's3' / 'study.sqlite3'}"
        (name,) = optuna.get_all_study_names(url)
        study = optuna.load_study(study_name=name, storage=url)
        trials = [StoredTrial.from_frozen(t) for t in study.get_trials(deepcopy=False)
                  if t.state.name == "COMPLETE"]  # fmt: skip
        trials = sorted(
            (t for t in trials if t.value is not None), key=lambda t: (t.value, t.number)
        )
        rows = []
        for trial in trials[:top]:
            plan = trial.candidate()
            rows.append({"trial": trial.number, "origin": trial.attrs.get("origin"),
                         "search": trial.value, "select": select(plan, solver).value,
                         "held_out": held.held_out(plan, solver).value})  # fmt: skip
        chosen = min(rows, key=lambda r: r["select"])
        out[f"nfe-{nfe}"] = {"rows": rows, "winner_held_out": rows[0]["held_out"],
                             "selected_held_out": chosen["held_out"]}  # fmt: skip
        print(nfe, out[f"nfe-{nfe}"]["winner_held_out"], chosen["held_out"], flush=True)
    atomic_write_json(RESULTS / "s3_selection.json", out)


if __name__ == "__main__":
    main()
