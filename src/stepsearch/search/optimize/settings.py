"""The settings, constants and shared state of an optimize run."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stepsearch.ays.search import AYSConfig
from stepsearch.cache import TensorCache
from stepsearch.eval.objective import Objective
from stepsearch.models import ImageModel, PipelineModel
from stepsearch.models.source import SampleSource
from stepsearch.search.autodiffusion import AutoDiffusionSettings
from stepsearch.search.dynamic import GITS_COEFF
from stepsearch.search.families.dp import DPSettings  # (registers the built-in families)
from stepsearch.search.family import FAMILIES, family
from stepsearch.search.job import DEFAULT_SPACINGS
from stepsearch.search.s3 import S3Settings

METHODS = ("dp", "ays", "olss", "autodiffusion", "s3")
"""The built-in search families :func:`~stepsearch.search.optimize.optimize` runs by default, in
their order (cheap ones first, AutoDiffusion and S³ last, sharing the time left; S³ is seeded with
the other families' results at the same NFE)."""

RUN_FORMAT = "stepsearch-optimize/1"
SELECT_SEED, REPORT_SEED = 1, 2
"""The judges' seeds: selection (seed 1) and report (seed 2); the searches use seed 0."""

DEFAULT_MAX_TRIALS = 200

Model = ImageModel | PipelineModel
"""A model whose diffusers scheduler directories the report replays in diffusers' own loop."""


@dataclass(frozen=True)
class OptimizeSettings:
    """What an optimize run does besides its model, NFEs and methods (all in its fingerprint).

    ``search_samples`` samples per trial on the search seed; ``select_samples`` /
    ``held_out_samples`` per candidate on the selection / report seeds. ``*_solvers``: the solvers
    each family searches for (OLSS is its own solver). ``baseline_solvers`` x ``spacings`` are the
    stepsearch baselines; ``diffusers_baselines`` adds diffusers' schedulers (image models and
    pipelines, in their own loop).
    ``autodiffusion_trials`` / ``s3_trials``: their trial budgets when time is not short. A family registered
    besides the built-in ones takes its settings from ``families[name]`` and its solvers from
    ``family_solvers[name]`` (:meth:`~stepsearch.search.family.FamilyBase.optimize_settings`). ``grid_rows`` x
    ``grid_cols`` samples per method in the report's grid.
    """

    search_samples: int = 256
    select_samples: int = 1000
    held_out_samples: int = 1000
    dp_solvers: tuple[str, ...] = ("dpm_solver_pp_2m", "unipc_bh2")
    ays_solvers: tuple[str, ...] = ("dpm_solver_pp_2m",)
    autodiffusion_solvers: tuple[str, ...] = ("unipc_bh2",)
    baseline_solvers: tuple[str, ...] = ("ddim", "dpm_solver_pp_2m", "unipc_bh2")
    spacings: tuple[str, ...] = DEFAULT_SPACINGS
    diffusers_baselines: bool = True
    dp: DPSettings = field(default_factory=DPSettings)
    ays: AYSConfig = field(default_factory=AYSConfig)
    olss_samples: int = 64
    autodiffusion: AutoDiffusionSettings = field(default_factory=AutoDiffusionSettings)
    autodiffusion_trials: int = 200
    s3: S3Settings = field(default_factory=lambda: S3Settings(select_plans=0))
    """S³ without its own pick on a selection seed: the run picks among every family's results
    on its selection seed (and searches trajectory error, which ranks plans well on the search
    seed: ``docs/s3.md``)."""
    s3_solvers: tuple[str, ...] = ("plan",)
    s3_trials: int = 200
    grid_rows: int = 3
    grid_cols: int = 8
    chunk_size: int = 256
    families: Mapping[str, Any] = field(default_factory=dict)
    """Settings objects of other registered families, by name (they default to their own)."""
    family_solvers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Solvers of other registered families, by name (default: their ``default_solvers``)."""
    headline_samples: int = 0
    """Samples per fresh seed of the headline (:mod:`~stepsearch.search.optimize.headline`: the
    winners run from their scheduler directories against two converged solves on seeds 3 and 4,
    FD extrapolated to infinitely many samples); 0: none (the main job on digits: 5,000)."""

    def __post_init__(self) -> None:
        for name in ("search_samples", "select_samples", "held_out_samples", "olss_samples"):
            if int(getattr(self, name)) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)!r}")
        if min(self.autodiffusion_trials, self.s3_trials, self.grid_rows, self.grid_cols) < 1:
            raise ValueError(
                "autodiffusion_trials, s3_trials, grid_rows and grid_cols must be positive"
            )
        if isinstance(self.headline_samples, bool) or not (
            self.headline_samples == 0 or int(self.headline_samples) >= 8
        ):
            raise ValueError(
                f"headline_samples must be 0 (none) or >= 8, got {self.headline_samples!r}"
            )
        for name in ("dp_solvers", "ays_solvers", "autodiffusion_solvers", "s3_solvers",
                     "baseline_solvers"):  # fmt: skip
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "spacings", tuple(self.spacings))

    def solvers(self, name: str) -> tuple[str, ...]:
        """The solvers family ``name`` searches for in this run."""
        return tuple(family(name).optimize_solvers(self))

    def settings_of(self, name: str) -> Any:
        """Family ``name``'s settings object in this run."""
        return family(name).optimize_settings(self)

    def max_trials(self, name: str) -> int:
        """The trial cap of an expensive family: ``<name>_trials`` if set, else 200."""
        return int(getattr(self, f"{name}_trials", DEFAULT_MAX_TRIALS))

    def family_settings(self, name: str) -> dict[str, Any]:
        """Family ``name``'s settings as JSON (stage fingerprints; expensive families add their
        trial cap)."""
        payload = self.settings_of(name).to_json_dict()
        if family(name).expensive:
            payload = {**payload, "max_trials": self.max_trials(name)}
        return payload

    def to_json_dict(self) -> dict[str, Any]:
        payload = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
            if key not in FAMILIES and key not in ("families", "family_solvers")
        }
        if not self.headline_samples:  # a run without a headline fingerprints as before
            payload.pop("headline_samples")
        return {**payload, **{name: self.family_settings(name) for name in FAMILIES}}


@dataclass
class OptimizeResult:
    """The report (JSON-ready), its files, and per NFE the winner's scheduler directory."""

    report: dict[str, Any]
    files: dict[str, str]
    scheduler_dirs: dict[int, str]
    partial: bool


@dataclass
class _Run:
    """What every stage of one run shares."""

    source: SampleSource
    """The run's one model object (a sample source; a :data:`Model` also runs diffusers' loop)."""
    settings: OptimizeSettings
    out: Path
    cache: TensorCache
    progress: bool
    deadline: float
    search: Objective
    budget_evals: int | None = None
    """The work budget (:func:`~stepsearch.search.optimize.optimize`): model sample-evaluations
    of the trial-budgeted families' stages; ``None``: their trials are sized from the time left."""
    incomplete: list[dict[str, Any]] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    """Family-specific inputs by family name (Align Your Steps' pairs on a pipeline)."""
    trials: list[dict[str, Any]] = field(default_factory=list)
    """The trial budgets the expensive stages ran with (the report's ``budget.stages``)."""
    timing: dict[str, float] = field(default_factory=dict)
    """Seconds per phase of the run (the report's ``budget.timing``)."""
    guidance: dict[str, Any] | None = None
    """The report's ``guidance`` entry (:mod:`~stepsearch.search.optimize.guidance`)."""

    @property
    def model(self) -> Model | None:
        """The source as a model whose scheduler directories the report replays, else ``None``."""
        return self.source if isinstance(self.source, (ImageModel, PipelineModel)) else None

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, text: str) -> None:
        if self.progress:
            from rich.console import Console

            Console(stderr=True).print(text)


def pipeline_settings() -> OptimizeSettings:
    """Defaults for a text-to-image pipeline, where every sample is a full guided UNet solve and
    a VAE decode: 64 search samples, 128 for selection and report, 16 images per model call, a
    64-sample DP teacher, 32 OLSS trajectories, a 2 x 4 sample grid (made in one pipeline call:
    a replay reproduces it bit for bit with the same batch of 8 prompts)."""
    return OptimizeSettings(
        search_samples=64,
        select_samples=128,
        held_out_samples=128,
        dp=DPSettings(teacher_samples=64),
        olss_samples=32,
        grid_rows=2,
        grid_cols=4,
        chunk_size=16,
    )


DEMO_BUDGET_EVALS = 30_000
"""The demo's work budget (model sample-evaluations of its AutoDiffusion and S³ stages: 5,000 a
stage, 13 / 9 / 7 trials at NFE 4 / 5 / 6 on 64 samples), the same on any machine."""


def demo_settings() -> OptimizeSettings:
    """Small settings for ``stepsearch demo`` (its work is fixed: ``stepsearch optimize --dry-run``
    lists ~200k model evaluations with :data:`DEMO_BUDGET_EVALS`): 64 search samples, 192 for
    selection and report, two built-in spacings, one solver per family, a 40-point DP grid (its
    solver coefficients are the DP's fixed cost: ~10k instead of ~160k on 100 points), a small
    AutoDiffusion population, smaller S³ stages."""
    return OptimizeSettings(
        search_samples=64,
        select_samples=192,
        held_out_samples=192,
        dp_solvers=("dpm_solver_pp_2m",),
        autodiffusion_solvers=("unipc_bh2",),
        baseline_solvers=("dpm_solver_pp_2m", "unipc_bh2"),
        spacings=("logsnr_uniform", "karras"),
        dp=DPSettings(grid_points=40, teacher_samples=128, coeffs=(GITS_COEFF,)),
        olss_samples=64,
        autodiffusion=AutoDiffusionSettings(population=16, mutations=8, crossovers=4, parents=4),
        autodiffusion_trials=60,
        s3=S3Settings(proposals=8, explore=2, generations=4, children=64, select_plans=0),
        s3_trials=60,
    )
