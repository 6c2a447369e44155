"""The AutoDiffusion family: the evolutionary search of :mod:`stepsearch.search.autodiffusion`
as a :class:`~stepsearch.search.family.SearchFamily` (every candidate a trial of the study store;
generation 0 opens with the runner's starting points). ``optimize`` runs it last, with the time
left (``expensive``): its trial budget comes from the measured time of one trial."""

from __future__ import annotations

from typing import Any

from stepsearch.noise import DiscreteVP
from stepsearch.schedule import StepSchedule
from stepsearch.search.autodiffusion import AutoDiffusionSettings, autodiffusion
from stepsearch.search.family import FamilyBase, Found, JobContext

__all__ = ["AutoDiffusionFamily"]


class AutoDiffusionFamily(FamilyBase):
    """AutoDiffusion (Li et al., ICCV 2023): evolution over timestep subsets."""

    name = "autodiffusion"
    label = "AutoDiffusion"
    settings_type = AutoDiffusionSettings
    default_solvers = ("unipc_bh2",)
    expensive = True

    def search(self, job: JobContext) -> Found:
        if job.budget is None:
            raise ValueError("AutoDiffusion needs a trial budget")
        job.bar.budget = len(job.starts) + int(job.budget)
        result = autodiffusion(
            job.objective,
            job.solver,
            nfe=job.nfe,
            budget=job.budget,
            store=job.store,
            seed=job.seed,
            starts=job.starts,
            settings=job.settings,
            on_trial=lambda done, best: job.bar.update(len(job.starts) + done, best),
        )
        return Found(
            result.best,
            result.best_score,
            {**job.settings.to_json_dict(), "budget": int(job.budget), "seed": int(job.seed)},
            summary={
                "budget": int(job.budget),
                "seed": int(job.seed),
                "best": {"diffusers_timesteps": _timesteps(result.best)},
            },
            values=result.values,
            details=result,
        )


def _timesteps(schedule: StepSchedule) -> list[Any] | None:
    if isinstance(schedule.noise, DiscreteVP):
        return schedule.to_diffusers_timesteps(integer=False).tolist()
    return None
