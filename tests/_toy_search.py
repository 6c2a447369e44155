"""Toys for the search tests.

- :class:`RandomPerturbationFamily`: a complete search family in ~50 lines (the example of
  ``docs/search-families.md``): random search over time-uniform schedules whose inner times are
  perturbed, every candidate a trial of the study store.
- A toy AutoDiffusion search (Gaussian test bed, exact denoiser, 25-point grid) shared by the
  search tests and the worker processes they start:
  ``python _toy_search.py STORAGE BUDGET OUT [STUDY [GO]]``: with ``GO``, a worker writes
  ``GO.ready.<pid>`` once it is set up and waits for the file ``GO`` before it searches (a start
  barrier, so that two workers really run side by side)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models.source import DenoiserSource
from stepsearch.noise import DiscreteVP
from stepsearch.schedule import StepSchedule, make_schedule
from stepsearch.search.autodiffusion import (
    AutoDiffusionResult,
    AutoDiffusionSettings,
    autodiffusion,
    time_grid,
)
from stepsearch.search.family import FamilyBase, Found, JobContext
from stepsearch.search.job import spacing_schedules
from stepsearch.search.store import StudyStore
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

# --- a search family: the example of docs/search-families.md -------------------------------------


@dataclass(frozen=True)
class RandomPerturbationSettings:
    trials: int = 8
    scale: float = 0.3  # perturbation, in units of the time-uniform step
    seed: int = 0

    def to_json_dict(self) -> dict:
        return {"trials": self.trials, "scale": self.scale, "seed": self.seed}


class RandomPerturbationFamily(FamilyBase):
    """Random search: time-uniform schedules with their inner times moved at random (at most
    ``scale`` of a step, so they stay in order)."""

    name = "random_perturbation"
    label = "Random perturbation"
    settings_type = RandomPerturbationSettings
    default_solvers = ("ddim",)

    def search(self, job: JobContext) -> Found:
        settings: RandomPerturbationSettings = job.settings
        noise = job.objective.source.noise
        uniform = make_schedule(noise, job.num_steps, "time_uniform").times
        step = (uniform[0] - uniform[-1]) / job.num_steps
        rng = np.random.default_rng(settings.seed)
        candidates = []
        for _ in range(settings.trials):
            times = uniform.copy()
            # the first, the last noisy and the clean time stay; the inner ones move
            times[1:-2] += rng.uniform(-1, 1, job.num_steps - 2) * settings.scale * step
            candidates.append(StepSchedule(times, noise, {"search": self.name}))
        job.bar.budget = len(job.starts) + len(candidates)
        scores = job.evaluate(candidates, [{"origin": "random", "index": i}
                                           for i in range(len(candidates))])  # fmt: skip
        best = min(range(len(candidates)), key=lambda i: scores[i].value)
        return Found(
            candidates[best],
            scores[best],
            {**settings.to_json_dict(), "index": best},
            summary={"best": {"index": best}},
        )


# --- a toy AutoDiffusion search ------------------------------------------------------------------

NOISE = DiscreteVP.from_diffusers_config({"beta_schedule": "linear"})
GRID = time_grid(NOISE)[::40]  # 25 trained steps: C(25, 3) = 2300 candidates at NFE 3
SETTINGS = AutoDiffusionSettings(population=8, mutations=4, crossovers=2, parents=3)
NFE = 3


def toy_objective() -> Objective:
    rng = np.random.default_rng(0)
    mixture = GaussianMixture.gaussian(rng.normal(size=4), rng.uniform(0.05, 0.5, 4), NOISE)
    source = DenoiserSource.of_mixture(mixture, name="toy-gaussian", num_reference=64)
    return Objective(source, "traj", num_samples=16, bootstrap=0, cache=TensorCache(None))


def toy_search(
    storage: str,
    budget: int,
    *,
    seed: int = 0,
    study_name: str = "toy",
    ready: Callable[[], None] | None = None,
    **open_kwargs,
) -> AutoDiffusionResult:
    objective = toy_objective()
    starts = spacing_schedules(NOISE, NFE, ("time_uniform", "trailing"))
    with StudyStore.open(storage, study_name, metadata={"toy": NFE}, **open_kwargs) as store:
        if ready is not None:
            ready()
        return autodiffusion(
            objective, "ddim", nfe=NFE, budget=budget, store=store, seed=seed, starts=starts,
            settings=SETTINGS, grid=GRID,
        )  # fmt: skip


def summary(result: AutoDiffusionResult) -> dict:
    return {
        "best": result.best.times.tolist(),
        "best_value": result.best_score.value,
        "history": [
            [r.index, r.generation, r.origin, list(r.genes), r.value] for r in result.history
        ],
    }


if __name__ == "__main__":
    storage, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    name = sys.argv[4] if len(sys.argv) > 4 else "toy"
    go = Path(sys.argv[5]) if len(sys.argv) > 5 else None

    def wait_for_go() -> None:
        if go is None:
            return
        Path(f"{go}.ready.{os.getpid()}").touch()
        deadline = time.monotonic() + 120
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    result = toy_search(storage, budget, study_name=name, ready=wait_for_go, poll_interval=0.02)
    with open(out, "w") as file:
        json.dump(summary(result), file)
