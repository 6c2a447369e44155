"""The OLSS family: :func:`stepsearch.olss.search.search_olss` (teacher trajectories, least-squares
fit of a linear-subspace step rule) as a direct :class:`~stepsearch.search.family.SearchFamily`.
Its result is a schedule *and* the fitted solver that runs it (``Found.solver``); the ``solver``
given to the runner (``"olss"`` names DDIM, the first-order solver the fit starts from) only
scores the starting points."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from stepsearch.models import DEFAULT_TEACHER
from stepsearch.olss import search as olss_search
from stepsearch.olss.fit import PATH_SEARCHES
from stepsearch.search.family import FamilyBase, Found, JobContext
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

__all__ = ["OLSSFamily", "OLSSSettings"]


@dataclass(frozen=True)
class OLSSSettings:
    """``num_samples`` teacher trajectories to fit on; ``search`` / ``refit`` / ``basis`` as in
    :func:`~stepsearch.olss.search.search_olss`."""

    num_samples: int = 64
    search: str = "best"
    refit: str = "rollout"
    basis: str = "eps"

    def to_json_dict(self) -> dict[str, Any]:
        """``num_samples``, and the other settings where they are not the defaults."""
        payload: dict[str, Any] = {"num_samples": int(self.num_samples)}
        for item in fields(self)[1:]:
            if getattr(self, item.name) != item.default:
                payload[item.name] = getattr(self, item.name)
        return payload


class OLSSFamily(FamilyBase):
    """OLSS (Duan et al. 2023): an optimal linear-subspace sampler fitted per step."""

    name = "olss"
    label = "OLSS"
    settings_type = OLSSSettings
    default_solvers = ("olss",)
    uses_store = False
    fits_solver = True

    def make_solver(self, name: str) -> Solver:
        """The solver the starting points run with: DDIM for ``"olss"`` (one evaluation a step)."""
        return get_solver("ddim" if name == "olss" else name)

    def optimize_settings(self, options: Any) -> OLSSSettings:
        """``options.olss_samples`` trajectories (the other settings: defaults)."""
        return OLSSSettings(num_samples=int(options.olss_samples))

    def planned_evaluations(
        self, settings: OLSSSettings, solver: str, nfe: int, search_samples: int, trials: int | None
    ) -> dict[str, int]:
        """Its teacher (``num_samples`` converged solves, cached for every NFE), the rollout fit
        of each path search (one ``nfe``-step solve of the ``num_samples`` each) and the result's
        search-seed score."""
        searches = len(PATH_SEARCHES) if settings.search == "best" else 1
        fits = searches if settings.refit == "rollout" else 0
        return {
            "once:teacher": settings.num_samples * DEFAULT_TEACHER.num_steps,  # multistep: 1/step
            "fit": fits * settings.num_samples * int(nfe),
            "score": search_samples * int(nfe),
        }

    def search(self, job: JobContext) -> Found:
        settings: OLSSSettings = job.settings
        objective = job.objective
        result = olss_search.search_olss(
            objective.source,
            job.nfe,
            num_samples=settings.num_samples,
            held_out_samples=objective.held_out_samples,
            search=settings.search,
            refit=settings.refit,
            basis=settings.basis,
            seed=objective.seeds["search"],
            held_out_seed=objective.seeds["held_out"],
            fd=False,
            baselines=(),
            cache=objective.cache,
            chunk_size=objective.chunk_size,
            progress=job.progress,
            objective=objective,
            held_out=False,  # the runner scores it after writing it
        )
        search_score = result.search_score
        assert search_score is not None
        return Found(
            result.fit.schedule,
            search_score,
            dict(result.provenance.search["settings"]),
            solver=result.solver,
            summary={"fit": result.fit.describe()},
            extra={"fit": result.fit.describe()},
            values=list(job.values),
            details=result,
        )
