"""What the judges score: search results and built-in samplers (:class:`Candidate`), and the
baselines of one NFE."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from stepsearch._io import atomic_write_dir
from stepsearch.integrations.load import load_scheduler
from stepsearch.integrations.plan_scheduler import write_plan_scheduler_dir
from stepsearch.models import ImageModel, Method, PipelineModel, default_methods
from stepsearch.models.source import SampleSource, generate_from_source
from stepsearch.noise import DiscreteVP
from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.job import spacing_schedules, write_scheduler_dir
from stepsearch.search.optimize.settings import Model, _Run
from stepsearch.solvers import get_solver, solver_to_json
from stepsearch.solvers.base import Solver


@dataclass
class Candidate:
    """A sampler the judges score: a stepsearch solver on a schedule (a search result or a
    built-in spacing), or a diffusers scheduler (``method``)."""

    label: str
    family: str  # "baseline", "diffusers" or a search family
    nfe: int
    solver: Solver | None = None
    schedule: StepSchedule | None = None
    method: Method | None = None
    schedule_file: ScheduleFile | None = None
    partial: bool = False
    plan: SolverPlan | None = None
    """A solver plan (S³) the ``plan`` solver runs; ``schedule`` is then the plan's own."""

    @property
    def runs(self) -> StepSchedule | SolverPlan:
        """What the solver runs: the plan, else the schedule."""
        assert self.schedule is not None
        return self.plan if self.plan is not None else self.schedule

    def key(self) -> str:
        """What the candidate's scores depend on (a resumed run reuses scores of equal keys)."""
        if self.method is not None:
            return json.dumps(
                {"diffusers": self.method.diffusers_scheduler, **self.method.diffusers_options},
                sort_keys=True,
            )
        assert self.solver is not None and self.schedule is not None
        solver = solver_to_json(self.solver)
        if self.plan is not None:
            return json.dumps(
                {"solver": solver["name"], "config": solver["config"],
                 "plan": self.plan.to_json_dict()},
                sort_keys=True,
            )  # fmt: skip
        return json.dumps(
            {"solver": solver["name"], "config": solver["config"],
             "times": [float(t) for t in self.schedule.times]},
            sort_keys=True,
        )  # fmt: skip

    def samples(
        self, model: Model | None, source: SampleSource, count: int, seed: int, chunk: int
    ) -> Tensor:
        """``count`` samples from the noise of ``seed`` (sample ``i`` from its own generator)."""
        if self.method is not None:
            assert model is not None
            found = self.method.diffusers_scheduler_for(model.scheduler_config, self.nfe)
            assert found is not None
            scheduler, steps = found
            return model.sample_diffusers(scheduler, steps, count, seed, None, chunk, False)
        assert self.solver is not None and self.schedule is not None
        return generate_from_source(
            source, self.solver, self.runs, count, seed=seed, chunk_size=chunk
        )

    def write_scheduler(self, path: Path, prediction_type: str | None) -> tuple[Path, int] | None:
        """This sampler as a diffusers scheduler directory and its ``num_inference_steps``;
        ``None`` where the noise schedule has no diffusers form. The folder is replaced at once
        (the previous one stays until the new one is complete)."""
        if self.method is not None:
            raise RuntimeError("diffusers baselines are written by write_diffusers_scheduler")
        assert self.solver is not None and self.schedule is not None
        config = {} if prediction_type is None else {"prediction_type": prediction_type}
        if self.plan is not None:
            provenance = None if self.schedule_file is None else self.schedule_file.provenance
            written = write_plan_scheduler_dir(
                path,
                self.plan,
                self.solver,
                provenance=None if provenance is None else provenance.to_json_dict(),
                **config,
            )
        else:
            written = write_scheduler_dir(path, self.schedule, self.solver, **config)
        return None if written is None else (written, self.schedule.num_steps)


def _write_diffusers_scheduler(candidate: Candidate, model: Model, path: Path) -> tuple[Path, int]:
    assert candidate.method is not None
    found = candidate.method.diffusers_scheduler_for(model.scheduler_config, candidate.nfe)
    assert found is not None
    scheduler, steps = found
    return atomic_write_dir(path, scheduler.save_pretrained), steps


def load_scheduler_dir(path: str | Path) -> Any:
    """The scheduler of a directory written by :func:`optimize` (or any diffusers scheduler
    directory): :func:`stepsearch.integrations.load.load_scheduler` (its ``_class_name`` looked
    up among stepsearch's scheduler classes, then diffusers')."""
    return load_scheduler(path)


def _baselines(run: _Run, nfe: int) -> list[Candidate]:
    return baseline_candidates(run.source, run.settings, nfe)


def baseline_candidates(source: SampleSource, settings: Any, nfe: int) -> list[Candidate]:
    """The built-in samplers judged at ``nfe``: diffusers' schedulers (a source that runs
    diffusers' loop, on a discrete noise schedule) and ``settings.baseline_solvers`` x
    ``settings.spacings``."""
    candidates = []
    model = source if isinstance(source, (ImageModel, PipelineModel)) else None
    if model is not None and settings.diffusers_baselines and isinstance(source.noise, DiscreteVP):
        for method in default_methods():
            if method.diffusers_scheduler is None:
                continue
            if method.diffusers_scheduler_for(model.scheduler_config, nfe) is not None:
                candidates.append(Candidate(method.label, "diffusers", nfe, method=method))
    for name in settings.baseline_solvers:
        solver = get_solver(name)
        steps = solver.num_steps_for_nfe(nfe)
        for spacing, schedule in spacing_schedules(source.noise, steps, settings.spacings).items():
            candidates.append(
                Candidate(f"stepsearch {name} / {spacing}", "baseline", nfe, solver, schedule)
            )
    return candidates
