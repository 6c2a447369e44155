"""The public objective every search calls: one sample source, one metric, fixed seeds, one cache.

An :class:`Objective` is built once from a :class:`~stepsearch.models.source.SampleSource`, a metric
and a number of samples; calling it on a candidate (a :class:`~stepsearch.schedule.StepSchedule`, or
a solver plan, with a solver) returns a :class:`Score` with its uncertainty::

    objective = Objective(source, "traj", num_samples=256)
    score = objective(schedule, "dpm_solver_pp_2m")      # search seeds
    report = objective.held_out(schedule, "dpm_solver_pp_2m")  # noise the search never saw

- **Common random numbers.** Every candidate sees the same per-sample noise (sample ``i`` of seed
  ``s`` starts from ``sample_generator(s, i)``), so differences between candidates are not noise
  differences.
- **Search vs held-out seeds.** ``objective(...)`` scores on ``search_seed``; ``held_out(...)`` on
  ``held_out_seed`` (another noise stream, possibly more samples). A search calls only the first;
  reports call the second. The two seeds must differ.
- **Computed once.** The teacher (a converged ODE solution from the same noise, for ``traj``) and the
  reference features (for ``fd`` / ``kid``) are cached in memory and on disk
  (:class:`~stepsearch.cache.TensorCache`), keyed by the model's identity, the noise schedule,
  the seeds and the settings: a second search on the same model reuses them.

Metrics (:data:`OBJECTIVE_METRICS`, all lower-is-better):

- ``traj``: median per-sample RMS error to the teacher (the per-sample vector is in
  ``Score.per_sample``); its limit is 0 as the solver converges.
- ``fd``: Fréchet distance in the source's own feature space against its reference data
  (FD-digits for the bundled model); its limit is the real-vs-real floor, not 0.
- ``kid``: kernel distance (x 1e3) in the same feature space.
- ``fid``: Fréchet distance in another feature space given as a
  :class:`~stepsearch.eval.scoring.FeatureReference` (Inception features and statistics).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch.cache import TensorCache, tensor_digest
from stepsearch.eval.features import ensure_features
from stepsearch.eval.scoring import FeatureReference, bootstrap_std, distance_scores
from stepsearch.eval.trajectory import per_sample_rms_error
from stepsearch.models.source import SampleSource, generate_from_source
from stepsearch.models.trajectories import TeacherSpec, record_trajectories, teacher_key
from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.schedule_file import Provenance
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

__all__ = ["OBJECTIVE_METRICS", "Objective", "Score"]

OBJECTIVE_METRICS = ("traj", "fd", "kid", "fid")
"""Metrics an :class:`Objective` computes (module docstring)."""

SPLITS = ("search", "held_out")


@dataclass(frozen=True)
class Score:
    """One candidate's value on one split.

    ``std`` is the standard error of ``value`` (bootstrap over samples; ``None`` where not
    estimated), ``per_sample`` the per-sample errors for ``traj``, ``nfe`` the model evaluations per
    sample the candidate spent, ``seconds`` the wall time of generating and scoring.
    """

    value: float
    std: float | None
    metric: str
    split: str
    num_samples: int
    nfe: int
    seconds: float = 0.0
    per_sample: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-safe summary (non-finite values become ``None``)."""

        def finite(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else float(value)

        return {
            "metric": self.metric,
            "split": self.split,
            "value": finite(self.value),
            "std": finite(self.std),
            "num_samples": self.num_samples,
            "nfe": self.nfe,
            "seconds": round(self.seconds, 4),
        }


class Objective:
    """Scores candidate schedules / plans on a sample source (module docstring).

    Args:
        source: the model (:class:`~stepsearch.models.source.SampleSource`).
        metric: one of :data:`OBJECTIVE_METRICS`.
        num_samples: samples per candidate on the search seed.
        search_seed / held_out_seed: the two noise streams; they must differ.
        held_out_samples: samples on the held-out seed (default: ``num_samples``).
        solver: the default solver (name or :class:`~stepsearch.solvers.base.Solver`) for calls
            that do not name one.
        teacher: the converged solve for ``traj``.
        cache: where teachers and reference features live (default:
            :meth:`TensorCache.default`; ``TensorCache(None)`` keeps them in memory only).
        fid_reference: for ``fid``: a :class:`~stepsearch.eval.scoring.FeatureReference`.
        chunk_size: samples per model call.
        bootstrap: bootstrap resamples for ``std`` (0: no uncertainty estimate).
        progress: show progress bars while computing teachers and references.
    """

    def __init__(
        self,
        source: SampleSource,
        metric: str = "traj",
        *,
        num_samples: int = 256,
        search_seed: int = 0,
        held_out_seed: int = 1,
        held_out_samples: int | None = None,
        solver: str | Solver | None = None,
        teacher: TeacherSpec | None = None,
        cache: TensorCache | None = None,
        fid_reference: Any | None = None,
        chunk_size: int = 256,
        bootstrap: int = 50,
        accelerator: Any | None = None,
        progress: bool = False,
    ):
        if metric not in OBJECTIVE_METRICS:
            raise ValueError(
                f"unknown metric {metric!r}; choose from {', '.join(OBJECTIVE_METRICS)}"
            )
        if int(search_seed) == int(held_out_seed):
            raise ValueError(
                f"search_seed and held_out_seed are both {search_seed}: a search must be reported "
                "on noise it never saw"
            )
        for name, count in (("num_samples", num_samples), ("held_out_samples", held_out_samples)):
            if count is not None and (isinstance(count, bool) or int(count) < 2):
                raise ValueError(f"{name} must be at least 2, got {count!r}")
        if metric in ("fd", "kid") and (source.features is None or source.reference_data is None):
            raise ValueError(
                f"metric {metric} needs a source with a feature network and reference data "
                f"({source.identity.name} has none); use 'traj' or 'fid'"
            )
        if metric == "fid" and fid_reference is None:
            raise ValueError("metric fid needs fid_reference (Inception features and statistics)")
        self.source = source
        self.metric = metric
        self.num_samples = int(num_samples)
        self.held_out_samples = int(held_out_samples or num_samples)
        self.seeds = {"search": int(search_seed), "held_out": int(held_out_seed)}
        self.solver = self._solver(solver) if solver is not None else None
        self.teacher_spec = teacher or TeacherSpec()
        self.cache = cache if cache is not None else TensorCache.default()
        self.fid_reference = fid_reference
        self.chunk_size = int(chunk_size)
        self.bootstrap = int(bootstrap)
        self.accelerator = accelerator
        self.progress = progress
        self._distance_reference: FeatureReference | None = None
        self.evaluations = 0
        """How many candidates were scored (both splits)."""

    # public ------------------------------------------------------------------------------------
    def __call__(self, candidate: Any, solver: str | Solver | None = None) -> Score:
        """Score ``candidate`` on the *search* seed."""
        return self.score(candidate, solver, split="search")

    def held_out(self, candidate: Any, solver: str | Solver | None = None) -> Score:
        """Score ``candidate`` on the *held-out* seed (for reports, never for searching)."""
        return self.score(candidate, solver, split="held_out")

    def reseeded(self, search_seed: int, num_samples: int) -> Objective:
        """This objective on another noise stream: the same source, metric, teacher, cache,
        reference and held-out seed, its search split ``num_samples`` samples of ``search_seed``.
        A search's *selection* seed (it re-scores its best candidates there before picking one);
        ``search_seed`` must differ from both of this objective's seeds."""
        if int(search_seed) in self.seeds.values():
            raise ValueError(
                f"seed {search_seed} is already this objective's "
                f"{next(k for k, v in self.seeds.items() if v == int(search_seed))} seed: "
                "a selection seed must be noise the search and the reports do not use"
            )
        if isinstance(num_samples, bool) or int(num_samples) < 2:
            raise ValueError(f"num_samples must be at least 2, got {num_samples!r}")
        other = copy.copy(self)  # the same source, metric, teacher, cache, reference
        other.num_samples = int(num_samples)
        other.seeds = {"search": int(search_seed), "held_out": self.seeds["held_out"]}
        other.evaluations = 0
        return other

    def score(self, candidate: Any, solver: str | Solver | None = None, *, split: str) -> Score:
        """Score ``candidate`` (a StepSchedule, or a plan ``solver.init`` accepts) on ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        run_solver = self._solver(solver) if solver is not None else self.solver
        if run_solver is None:
            raise ValueError("name a solver: objective(candidate, solver) or Objective(solver=...)")
        schedule = getattr(candidate, "schedule", candidate)
        if not isinstance(schedule, StepSchedule):
            raise TypeError(
                f"a candidate is a StepSchedule or a solver plan, got {type(candidate)}"
            )
        if schedule.noise != self.source.noise:
            raise ValueError(
                "the candidate lives on another noise schedule than the model: "
                f"{schedule.noise!r} vs {self.source.noise!r}"
            )
        start = time.perf_counter()
        samples = self.samples(candidate, run_solver, split)
        # a plan's own evaluations: an analytical first step skips the network
        timed = candidate if isinstance(candidate, SolverPlan) else schedule
        nfe = int(run_solver.evaluation_times(timed).size)
        return self.score_samples(samples, nfe, split=split, started=start)

    def score_samples(
        self, samples: Tensor, nfe: int, *, split: str, started: float | None = None
    ) -> Score:
        """Score samples made elsewhere (a diffusers scheduler's loop, a pipeline) from this
        objective's noise on ``split`` (sample ``i`` from ``sample_generator(seeds[split], i)``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if len(samples) != self._count(split):
            raise ValueError(
                f"{len(samples)} samples for the {split} split, which has {self._count(split)}"
            )
        start = time.perf_counter() if started is None else started
        value, std, per_sample = self._measure(samples, split)
        self.evaluations += 1
        return Score(
            value,
            std,
            self.metric,
            split,
            len(samples),
            int(nfe),
            time.perf_counter() - start,
            per_sample,
        )

    def samples(self, candidate: Any, solver: Solver, split: str = "search") -> Tensor:
        """The (decoded) samples of ``candidate`` on ``split``'s noise."""
        return generate_from_source(
            self.source,
            solver,
            candidate,
            self._count(split),
            seed=self.seeds[split],
            chunk_size=self.chunk_size,
            accelerator=self.accelerator,
            progress=False,
        )

    def teacher(self, split: str = "search") -> Tensor:
        """The converged solutions (decoded) from ``split``'s noise (cached; the one recorder,
        :func:`~stepsearch.models.trajectories.record_trajectories`)."""
        return record_trajectories(
            self.source,
            self.teacher_spec,
            self._count(split),
            seed=self.seeds[split],
            cache=self.cache,
            cache_kind="teacher",
            cache_key=self._teacher_key(split),
            chunk_size=self.chunk_size,
            accelerator=self.accelerator,
            progress="teacher (converged solve)" if self.progress else False,
        )

    def reference_features(self) -> np.ndarray:
        """Features of the source's reference data in its own feature space (cached)."""
        data = self.source.reference_data
        extractor = self.source.features
        assert data is not None and extractor is not None
        key = {
            "features": type(extractor).__qualname__
            + ":"
            + tensor_digest(dict(extractor.state_dict())),
            "data": "sha256:" + tensor_digest({"data": data}),
        }

        def compute() -> dict[str, Tensor]:
            features = ensure_features(data, extractor, progress=self.progress)
            return {"features": torch.as_tensor(features)}

        return self.cache.load_or_compute("features", key, compute)["features"].numpy()

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable settings (for schedule-file provenance)."""
        payload: dict[str, Any] = {
            "metric": self.metric,
            "num_samples": self.num_samples,
            "held_out_samples": self.held_out_samples,
            "seeds": dict(self.seeds),
            "model": self.source.identity.to_json_dict(),
            "source": self.source.describe(),
        }
        if self.metric == "traj":
            payload["teacher"] = self.teacher_spec.to_json_dict()
        if self.solver is not None:
            payload["solver"] = {"name": self.solver.name, "config": self.solver.config()}
        return payload

    def provenance(
        self,
        solver: Solver,
        search_score: Score,
        held_out_score: Score | None,
        family: str,
        settings: dict[str, Any],
        **fields: Any,
    ) -> Provenance:
        """The :class:`~stepsearch.schedule_file.Provenance` of a search result scored by this
        objective; ``fields`` fill the optional ones (``guidance_scale``, ``resolution``, ...).
        ``held_out_score`` ``None``: not scored yet (a search's files written before its held-out
        comparison; ``scores.held_out`` is ``null`` until the runner rewrites them)."""
        described = self.source.describe()
        fields.setdefault("prediction_type", described.get("prediction_type"))
        if described.get("guidance_schedule") is not None:
            # guided by a schedule of weights, not one scale: the schedule is the provenance
            fields.setdefault("guidance_scale", None)
            extra = {"guidance_schedule": described["guidance_schedule"], **fields.get("extra", {})}
            fields["extra"] = extra
        fields.setdefault("guidance_scale", described.get("guidance_scale"))
        scheduler_config = getattr(self.source, "scheduler_config", None)
        if scheduler_config is not None:  # what a drop-in scheduler for the model needs
            extra = {"scheduler_config": _json_data(scheduler_config), **fields.get("extra", {})}
            fields["extra"] = extra
        return Provenance(
            model=self.source.identity.to_json_dict(),
            solver={"name": solver.name, "config": solver.config()},
            nfe=search_score.nfe,
            objective=self.describe(),
            scores={
                "search": search_score.to_json_dict(),
                "held_out": None if held_out_score is None else held_out_score.to_json_dict(),
            },
            seeds=dict(self.seeds),
            search={"family": family, "settings": settings},
            **fields,
        )

    # internals ---------------------------------------------------------------------------------
    @staticmethod
    def _solver(solver: str | Solver) -> Solver:
        return get_solver(solver) if isinstance(solver, str) else solver

    def _count(self, split: str) -> int:
        return self.num_samples if split == "search" else self.held_out_samples

    def _teacher_key(self, split: str) -> dict[str, Any]:
        return teacher_key(
            self.source, self.teacher_spec.to_json_dict(), self.seeds[split], self._count(split)
        )

    def _reference(self) -> FeatureReference:
        """What ``fd`` / ``kid`` / ``fid`` compare with: the source's reference data in its own
        feature space, or ``fid_reference``."""
        if self.metric == "fid":
            return self.fid_reference
        if self._distance_reference is None:
            assert self.source.features is not None
            self._distance_reference = FeatureReference.from_features(
                self.source.features, self.reference_features(), "source reference data"
            )
        return self._distance_reference

    def _measure(
        self, samples: Tensor, split: str
    ) -> tuple[float, float | None, np.ndarray | None]:
        if self.metric == "traj":
            errors = per_sample_rms_error(samples, self.teacher(split)).numpy()
            std = bootstrap_std(errors, np.median, self.bootstrap)
            return float(np.median(errors)), std, errors
        scores = distance_scores(
            samples, {self.metric: self._reference()}, bootstrap=min(self.bootstrap, 20)
        )
        value, std = scores[self.metric]
        return value, std, None


def _json_data(config: Any) -> dict[str, Any]:
    """A model's diffusers scheduler config as plain JSON data (a ``FrozenDict`` in, a ``dict``
    out; tuples become lists)."""
    return json.loads(json.dumps(dict(config), allow_nan=False, default=list))
