"""A toy S³ search (the Gaussian test bed of :mod:`_toy_search`, exact denoiser) shared by the
S³ tests and the worker processes they start:
``python _toy_s3.py STORAGE BUDGET OUT [STUDY [GO]]`` (``GO``: the start barrier of
:mod:`_toy_search`)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _toy_search import NOISE, toy_objective

from stepsearch.search.job import spacing_schedules
from stepsearch.search.predictor import PredictorSettings
from stepsearch.search.s3 import S3Result, S3Settings, s3_search
from stepsearch.search.store import StudyStore

NFE = 3
SETTINGS = S3Settings(
    proposals=4,
    explore=2,
    parents=6,
    generations=2,
    children=32,
    seed_solvers=("ddim", "dpm_solver_pp_2m", "unipc_bh2"),
    predictor=PredictorSettings(hidden=16, epochs=40),
    select_plans=8,  # the pick on a selection seed (the default), so resume covers it
    restarts=1,  # one evolution: test_s3's restart test runs two
)


def toy_s3(
    storage: str,
    budget: int,
    *,
    study_name: str = "toy-s3",
    settings: S3Settings = SETTINGS,
    seed: int = 0,
    ready: Callable[[], None] | None = None,
    **open_kwargs,
) -> S3Result:
    objective = toy_objective()
    starts = spacing_schedules(NOISE, NFE, ("time_uniform", "logsnr_uniform"))
    with StudyStore.open(storage, study_name, metadata={"toy-s3": NFE}, **open_kwargs) as store:
        if ready is not None:
            ready()
        return s3_search(
            objective,
            nfe=NFE,
            budget=budget,
            store=store,
            schedules=starts,
            settings=settings,
            seed=seed,
        )


def summary(result: S3Result) -> dict:
    return {
        "best": result.best.to_json_dict(),
        "best_value": result.best_score.value,
        "history": [[r.index, r.stage, r.origin, r.value] for r in result.history],
        "selection": [[index, value] for index, value in result.selection],
    }


if __name__ == "__main__":
    storage, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    name = sys.argv[4] if len(sys.argv) > 4 else "toy-s3"
    go = Path(sys.argv[5]) if len(sys.argv) > 5 else None

    def wait_for_go() -> None:
        if go is None:
            return
        Path(f"{go}.ready.{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    result = toy_s3(storage, budget, study_name=name, ready=wait_for_go, poll_interval=0.02)
    with open(out, "w") as file:
        json.dump(summary(result), file)
