"""Guidance-schedule search: a guidance weight on the noise level and a step schedule, searched
jointly for a class-conditional model at a fixed budget of network (UNet) passes.

A candidate is a :class:`~stepsearch.guidance.GuidanceSchedule` (constant, linear / cosine
increasing, Wang et al.'s clamp-linear and power-cosine, Kynkäänniemi et al.'s interval) and a
Karras step spacing ``rho``. The budget counts **network passes**, not steps: a step at weight 1
costs one pass, a guided step two, so for each candidate the solver gets the most steps whose
passes fit the budget (:func:`steps_for_budget`): an interval schedule buys extra steps with the
passes it saves.

Two judges at once, on the same samples (common random numbers: sample ``i`` of a split always
starts from the same noise and asks for digit ``i mod 10``): sample quality, ``fd`` (Fréchet
distance in the model's own feature space, FD-digits for ``digits-cond``, lower is better), and
condition adherence, ``accuracy`` (the model's classifier assigns sample ``i`` to its requested
class, higher is better). Optuna's multi-objective TPE proposes the candidates; every one is a
trial of the study (SQLite in ``out`` by default, any database URL), a rerun resumes it. The study
opens with constant guidance over :attr:`GuidanceSearchSettings.constant_weights` at the default
spacing (the curve every result is compared with).

The search seed's scores are noisy (a few hundred samples tell accuracies of 0.99 and 0.995
apart by one or two digits), so the pick is made on a third noise seed, the *selection* seed, with
more samples: the constant curve and the search seed's best non-dominated layers of trials
(:attr:`GuidanceSearchSettings.select_trials` of them) are scored there, each score kept in the
study (a rerun reuses it). The pick rule: among those whose selection accuracy is at least that of
constant guidance at the model's default weight, the lowest selection FD. The pick and the constant
curve are then scored on held-out noise. Files: ``guidance.json`` (the guidance schedule with provenance), ``best_schedule.json``
and ``scheduler/`` (the step schedule), ``result.json`` (Pareto front, constant curve, pick,
held-out scores).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from stepsearch._io import atomic_write_json
from stepsearch._progress import progress_bar
from stepsearch.eval.experiment import class_accuracy
from stepsearch.eval.scoring import FeatureReference, distance_scores
from stepsearch.guidance import GuidanceSchedule, noise_range, unet_passes
from stepsearch.models.source import generate_from_source
from stepsearch.noise import NoiseSchedule
from stepsearch.schedule import StepSchedule, karras
from stepsearch.schedule_file import Provenance, ScheduleFile
from stepsearch.search.job import output_dir, resolve_storage, write_scheduler_dir
from stepsearch.search.store import storage_url
from stepsearch.solvers import get_solver, solver_to_json
from stepsearch.solvers.base import Solver

__all__ = [
    "SEARCH_SHAPES",
    "GuidanceCandidate",
    "GuidanceScore",
    "GuidanceSearchResult",
    "GuidanceSearchSettings",
    "GuidanceTrial",
    "evaluate_candidate",
    "feature_matrix",
    "pareto_front",
    "search_guidance",
    "selection_pool",
    "steps_for_budget",
]

SEARCH_SHAPES = (
    "constant",
    "linear_increasing",
    "cosine_increasing",
    "clamp_linear",
    "power_cosine",
    "interval",
)
"""The shapes a search proposes by default."""


@dataclass(frozen=True)
class GuidanceSearchSettings:
    """What a guidance search explores.

    ``trials``: trials in all (the constant curve included); ``shapes``: the guidance shapes it
    proposes; ``weight_range``: the (mean) weight ``w``; ``constant_weights``: the constant curve;
    ``default_weight``: the constant weight whose accuracy a pick must reach (``None``: the
    model's own guidance scale); ``rho``: the Karras spacing of the constant curve;
    ``rho_range``: the spacings searched; ``select_trials``: the searched trials (besides the
    constant curve) scored on the selection seed.
    """

    trials: int = 60
    shapes: tuple[str, ...] = SEARCH_SHAPES
    weight_range: tuple[float, float] = (1.0, 5.0)
    constant_weights: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
    default_weight: float | None = None
    rho: float = 7.0
    rho_range: tuple[float, float] = (1.5, 12.0)
    select_trials: int = 12

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "constant_weights", tuple(float(w) for w in self.constant_weights))
        unknown = [shape for shape in self.shapes if shape not in SEARCH_SHAPES]
        if not self.shapes or unknown:
            raise ValueError(f"shapes: choose from {SEARCH_SHAPES}, got {list(self.shapes)}")
        if "constant" not in self.shapes:
            raise ValueError("shapes must include 'constant' (the curve every result is judged on)")
        low, high = (float(v) for v in self.weight_range)
        if not 1.0 <= low < high or not math.isfinite(high):
            raise ValueError(f"weight_range: need 1 <= low < high, got {self.weight_range!r}")
        if any(not low <= w <= high for w in self.constant_weights):
            raise ValueError(
                f"constant_weights {list(self.constant_weights)} must lie in weight_range "
                f"{self.weight_range!r}"
            )
        rho_low, rho_high = (float(v) for v in self.rho_range)
        if not 0.0 < rho_low < rho_high or not rho_low <= self.rho <= rho_high:
            raise ValueError(
                f"rho_range: need 0 < low <= rho <= high, got {self.rho_range!r}, rho={self.rho}"
            )
        if isinstance(self.select_trials, bool) or int(self.select_trials) < 1:
            raise ValueError(f"select_trials must be at least 1, got {self.select_trials!r}")
        if int(self.trials) < len(self.constant_weights) + 1:
            raise ValueError(
                f"trials: {self.trials} leaves no room to search after the "
                f"{len(self.constant_weights)} constant weights"
            )

    def to_json_dict(self) -> dict[str, Any]:
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }


@dataclass(frozen=True)
class GuidanceCandidate:
    """A guidance schedule with the Karras ``rho`` of its step schedule."""

    guidance: GuidanceSchedule
    rho: float

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "shape": self.guidance.shape,
            "parameters": dict(self.guidance.parameters),
            "rho": self.rho,
        }


@dataclass(frozen=True)
class GuidanceScore:
    """One candidate's samples judged: FD (with its bootstrap standard error) and accuracy
    (with its binomial standard error), the steps and network passes it ran."""

    fd: float
    fd_std: float | None
    accuracy: float
    accuracy_std: float
    num_steps: int
    passes: int
    num_samples: int
    split: str
    seconds: float = 0.0

    def to_json_dict(self) -> dict[str, Any]:
        def finite(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else float(value)

        return {
            "fd": finite(self.fd),
            "fd_std": finite(self.fd_std),
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "num_steps": self.num_steps,
            "unet_passes": self.passes,
            "num_samples": self.num_samples,
            "split": self.split,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class GuidanceTrial:
    """A finished trial of the study."""

    number: int
    origin: str
    """``constant`` (the curve) or ``search``."""
    candidate: GuidanceCandidate
    score: GuidanceScore

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number,
            "origin": self.origin,
            **self.candidate.to_json_dict(),
            **self.score.to_json_dict(),
        }


@dataclass
class GuidanceSearchResult:
    """What :func:`search_guidance` found, scored and wrote."""

    pick: GuidanceTrial
    reference: GuidanceTrial
    """Constant guidance at the default weight (the accuracy a pick must reach)."""
    trials: list[GuidanceTrial]
    front: list[GuidanceTrial]
    held_out: dict[str, GuidanceScore]
    """Held-out scores: ``pick`` and ``constant w=...`` for every constant weight."""
    selection: dict[int, GuidanceScore] = field(default_factory=dict)
    """Selection-seed scores by trial number (the constant curve and the trials the pick was
    made among)."""
    files: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


# budget ------------------------------------------------------------------------------------------
def steps_for_budget(
    guidance: GuidanceSchedule,
    noise: NoiseSchedule,
    solver: Solver,
    budget: int,
    rho: float,
) -> tuple[StepSchedule, int]:
    """The Karras-``rho`` schedule with the most steps whose network passes (one at weight 1, two
    elsewhere, at the solver's evaluation sigmas) fit ``budget``, and its passes."""
    if isinstance(budget, bool) or int(budget) < 1:
        raise ValueError(f"budget of network passes must be >= 1, got {budget!r}")
    for num_steps in range(int(budget), 0, -1):
        try:
            grid = karras(noise, num_steps, rho=rho)
            times = solver.evaluation_times(grid)
        except ValueError:
            continue
        passes = unet_passes(guidance(noise.kdiffusion_sigma(times)))
        if passes <= budget:
            return grid, passes
    raise ValueError(f"no step schedule of {solver.name} fits {budget} network passes")


# judging -----------------------------------------------------------------------------------------
def evaluate_candidate(
    source: Any,
    candidate: GuidanceCandidate,
    solver: Solver,
    budget: int,
    num_samples: int,
    *,
    seed: int,
    split: str,
    reference: FeatureReference,
    bootstrap: int = 20,
    samples_out: list[Tensor] | None = None,
) -> GuidanceScore:
    """Sample ``source`` guided by ``candidate`` within ``budget`` passes (seed ``seed``) and
    judge the samples (module docstring); ``samples_out`` receives the samples."""
    begin = time.perf_counter()
    grid, passes = steps_for_budget(candidate.guidance, source.noise, solver, budget, candidate.rho)
    model = dataclasses.replace(source, guidance_schedule=candidate.guidance)
    samples = generate_from_source(model, solver, grid, num_samples, seed=seed, progress=False)
    if samples_out is not None:
        samples_out.append(samples)
    fd, fd_std = distance_scores(samples, {"fd": reference}, bootstrap=bootstrap)["fd"]
    accuracy = class_accuracy(source.classifier, samples, source.labels_for(range(num_samples)))
    return GuidanceScore(
        fd=float(fd),
        fd_std=fd_std,
        accuracy=float(accuracy),
        accuracy_std=math.sqrt(accuracy * (1.0 - accuracy) / num_samples),
        num_steps=grid.num_steps,
        passes=passes,
        num_samples=int(num_samples),
        split=split,
        seconds=time.perf_counter() - begin,
    )


def pareto_front(trials: Sequence[GuidanceTrial]) -> list[GuidanceTrial]:
    """Trials no other trial beats on both judges (lower FD and higher accuracy, one strictly),
    by FD."""

    def dominated(a: GuidanceTrial) -> bool:
        return any(
            b.score.fd <= a.score.fd
            and b.score.accuracy >= a.score.accuracy
            and (b.score.fd < a.score.fd or b.score.accuracy > a.score.accuracy)
            for b in trials
        )

    finite = [t for t in trials if math.isfinite(t.score.fd)]
    return sorted((t for t in finite if not dominated(t)), key=lambda t: t.score.fd)


# the search --------------------------------------------------------------------------------------
def _suggest(trial: Any, settings: GuidanceSearchSettings, noise: NoiseSchedule) -> Any:
    """A candidate from an Optuna trial (parameters named per shape where they differ)."""
    shape = trial.suggest_categorical("shape", list(settings.shapes))
    low, high = settings.weight_range
    weight = trial.suggest_float("weight", low, high)
    rho = trial.suggest_float("rho", *settings.rho_range)
    sigma_min, sigma_max = noise_range(noise)
    if shape == "constant":
        guidance = GuidanceSchedule.constant(weight)
    elif shape in ("linear_increasing", "cosine_increasing"):
        guidance = GuidanceSchedule(
            shape, {"weight": weight, "sigma_min": sigma_min, "sigma_max": sigma_max}
        )
    elif shape == "clamp_linear":
        c = trial.suggest_float("c", 1.0, 2.0 * high - 1.0)
        guidance = GuidanceSchedule.clamp_linear(weight, c, sigma_min, sigma_max)
    elif shape == "power_cosine":
        s = trial.suggest_float("s", 0.25, 4.0, log=True)
        guidance = GuidanceSchedule.power_cosine(weight, s, sigma_min, sigma_max)
    else:  # interval: its upper edge and width as fractions of the log-sigma range
        span = math.log(sigma_max) - math.log(sigma_min)
        top = trial.suggest_float("interval_top", 0.0, 1.0)
        width = trial.suggest_float("interval_width", 0.05, 1.0)
        sigma_hi = sigma_max * math.exp(-top * span)
        sigma_lo = sigma_hi * math.exp(-width * span)
        guidance = GuidanceSchedule.interval(weight, sigma_lo, sigma_hi)
    return GuidanceCandidate(guidance, rho)


def _open_study(url: str, name: str, metadata: dict[str, Any], seed: int) -> Any:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    study = optuna.create_study(
        storage=url,
        study_name=name,
        directions=["minimize", "maximize"],
        sampler=sampler,
        load_if_exists=True,
    )
    stored = study.user_attrs.get("metadata")
    if stored is None:
        study.set_user_attr("metadata", metadata)
    elif stored != metadata:
        differing = sorted(
            k for k in set(stored) | set(metadata) if stored.get(k) != metadata.get(k)
        )
        raise ValueError(
            f"study {name!r} in {url} was made for other settings ({', '.join(differing)} "
            "differ): give another --study-name or --out"
        )
    return study


def _finished(study: Any) -> list[GuidanceTrial]:
    import optuna

    trials = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        candidate = GuidanceCandidate(
            GuidanceSchedule(attrs["shape"], attrs["parameters"]), float(attrs["rho"])
        )
        score = GuidanceScore(**attrs["score"])
        trials.append(GuidanceTrial(trial.number, attrs["origin"], candidate, score))
    return trials


def search_guidance(
    source: Any,
    solver: str | Solver,
    budget: int,
    out: str | Path,
    *,
    settings: GuidanceSearchSettings | None = None,
    num_samples: int = 256,
    held_out_samples: int = 1000,
    select_samples: int = 1000,
    search_seed: int = 0,
    held_out_seed: int = 1,
    select_seed: int = 2,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    progress: bool = False,
) -> GuidanceSearchResult:
    """Search a guidance schedule and step spacing for the class-conditional ``source`` at
    ``budget`` network passes per sample and write the files under ``out`` (module docstring).
    Rerun the same call to resume (finished trials are kept)."""
    settings = settings or GuidanceSearchSettings()
    run_solver = get_solver(solver) if isinstance(solver, str) else solver
    if getattr(source, "classifier", None) is None or source.labels_for(range(1)) is None:
        raise ValueError(
            f"a guidance search needs a class-conditional model with a classifier "
            f"(--model digits-cond); {source.identity.name!r} is not one"
        )
    if source.feature_extractor is None or source.reference_images is None:
        raise ValueError(f"{source.identity.name!r} has no feature network and reference data (fd)")
    if len({int(search_seed), int(held_out_seed), int(select_seed)}) < 3:
        raise ValueError(
            "search_seed, select_seed and held_out_seed must differ (held-out noise), got "
            f"{search_seed}, {select_seed}, {held_out_seed}"
        )
    counts = (
        ("num_samples", num_samples),
        ("select_samples", select_samples),
        ("held_out_samples", held_out_samples),
    )
    for name, count in counts:
        if isinstance(count, bool) or int(count) < 2:
            raise ValueError(f"{name} must be at least 2, got {count!r}")
    default_weight = (
        float(source.guidance_scale) if settings.default_weight is None else settings.default_weight
    )
    if default_weight not in settings.constant_weights:
        raise ValueError(
            f"default_weight {default_weight:g} must be one of constant_weights "
            f"{list(settings.constant_weights)}"
        )
    steps_for_budget(GuidanceSchedule.constant(1.0), source.noise, run_solver, budget, 7.0)
    out_path = output_dir(out)
    reference = FeatureReference.from_images(
        source.feature_extractor, source.reference_images, source=f"{source.identity.name} data"
    )
    metadata = {
        "model": source.identity.to_json_dict(),
        "solver": solver_to_json(run_solver),
        "unet_passes": int(budget),
        "num_samples": int(num_samples),
        "search_seed": int(search_seed),
        "select_samples": int(select_samples),
        "select_seed": int(select_seed),
        "settings": settings.to_json_dict(),
    }
    name = study_name or f"guidance-{source.identity.name}-{run_solver.name}-passes{budget}"
    url = storage_url(resolve_storage(storage, out_path))
    study = _open_study(url, name, metadata, seed)
    if not study.trials:  # the constant curve first, at the default spacing
        for weight in settings.constant_weights:
            study.enqueue_trial(
                {"shape": "constant", "weight": weight, "rho": settings.rho},
                user_attrs={"origin": "constant"},
                skip_if_exists=True,
            )
    done = len(_finished(study))
    bar = progress_bar(total=settings.trials, desc="guidance search", disable=not progress)
    bar.update(done)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental-feature notes
        while done < settings.trials:
            trial = study.ask()
            candidate = _suggest(trial, settings, source.noise)
            score = evaluate_candidate(
                source, candidate, run_solver, budget, num_samples, seed=search_seed,
                split="search", reference=reference,
            )  # fmt: skip
            trial.set_user_attr("origin", trial.user_attrs.get("origin", "search"))
            for key, value in candidate.to_json_dict().items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("score", dataclasses.asdict(score))
            fd = score.fd if math.isfinite(score.fd) else float("inf")
            study.tell(trial, [fd, score.accuracy])
            done += 1
            bar.update(1)
    bar.close()
    trials = _finished(study)
    constants = {
        t.candidate.guidance.parameters["weight"]: t
        for t in trials
        if t.origin == "constant" and t.candidate.rho == settings.rho
    }
    pool = selection_pool(trials, list(constants.values()), settings.select_trials)
    bar = progress_bar(total=len(pool), desc="selection", disable=not progress)
    selection = {}
    for trial in pool:
        key = f"select:{trial.number}"
        stored = study.user_attrs.get(key)
        if stored is None:
            score = evaluate_candidate(
                source, trial.candidate, run_solver, budget, select_samples, seed=select_seed,
                split="select", reference=reference,
            )  # fmt: skip
            study.set_user_attr(key, dataclasses.asdict(score))
        else:
            score = GuidanceScore(**stored)
        selection[trial.number] = score
        bar.update(1)
    bar.close()
    floor = selection[constants[default_weight].number].accuracy
    eligible = [t for t in pool if selection[t.number].accuracy >= floor]
    pick = min(
        eligible,
        key=lambda t: (selection[t.number].fd, -selection[t.number].accuracy, t.number),
    )
    seeds = {"search": int(search_seed), "select": int(select_seed), "held_out": int(held_out_seed)}
    return _report(
        source, run_solver, budget, out_path, settings, trials, constants, default_weight,
        pick, selection, reference, held_out_samples, seeds, num_samples, select_samples, url,
        name,
    )  # fmt: skip


def selection_pool(
    trials: Sequence[GuidanceTrial], constants: Sequence[GuidanceTrial], size: int
) -> list[GuidanceTrial]:
    """The trials scored on the selection seed: the constant curve and the search seed's
    non-dominated layers (the Pareto front, then the front of the rest, ...) until ``size``
    searched trials are in (the last layer whole), by trial number."""
    pool = {t.number: t for t in constants}
    rest = [t for t in trials if t.number not in pool]
    searched = 0
    while rest and searched < size:
        layer = pareto_front(rest)
        if not layer:  # only non-finite FDs left
            break
        pool.update((t.number, t) for t in layer)
        searched += len(layer)
        rest = [t for t in rest if t.number not in pool]
    return sorted(pool.values(), key=lambda t: t.number)


def _report(
    source: Any,
    solver: Solver,
    budget: int,
    out: Path,
    settings: GuidanceSearchSettings,
    trials: list[GuidanceTrial],
    constants: dict[float, GuidanceTrial],
    default_weight: float,
    pick: GuidanceTrial,
    selection: dict[int, GuidanceScore],
    reference: FeatureReference,
    held_out_samples: int,
    seeds: dict[str, int],
    num_samples: int,
    select_samples: int,
    url: str,
    name: str,
) -> GuidanceSearchResult:
    """Score the pick and the constant curve on held-out noise, write the files."""
    reference_trial = constants[default_weight]
    held_out_seed = seeds["held_out"]

    def held_out(trial: GuidanceTrial) -> GuidanceScore:
        return evaluate_candidate(
            source, trial.candidate, solver, budget, held_out_samples, seed=held_out_seed,
            split="held_out", reference=reference,
        )  # fmt: skip

    scores = {f"constant w={w:g}": held_out(t) for w, t in sorted(constants.items())}
    scores["pick"] = held_out(pick)
    front = pareto_front(trials)
    grid, _ = steps_for_budget(
        pick.candidate.guidance, source.noise, solver, budget, pick.candidate.rho
    )
    common = {
        "model": source.identity.to_json_dict(),
        "solver": solver_to_json(solver),
        "unet_passes": int(budget),
        "num_steps": pick.score.num_steps,
        "rho": pick.candidate.rho,
        "seeds": seeds,
        "search": {"family": "guidance", "settings": settings.to_json_dict()},
        "study": {"storage": url, "name": name, "trials": len(trials)},
        "pick_rule": (
            f"lowest FD at accuracy >= constant w={default_weight:g}'s, on the selection seed "
            f"({select_samples} samples) among the constant curve and the search seed's "
            f"{len(selection) - len(constants)} best non-dominated trials"
        ),
    }
    guidance = pick.candidate.guidance.with_provenance(
        **common,
        scores={
            "search": pick.score.to_json_dict(),
            "select": selection[pick.number].to_json_dict(),
            "held_out": scores["pick"].to_json_dict(),
        },
    )
    guidance.save(out / "guidance.json")
    provenance = Provenance(
        model=source.identity.to_json_dict(),
        solver={"name": solver.name, "config": solver.config()},
        nfe=int(solver.evaluation_times(grid).size),
        objective={
            "metric": "fd",
            "judges": ["fd", "accuracy"],
            "num_samples": int(num_samples),
            "select_samples": int(select_samples),
            "held_out_samples": int(held_out_samples),
        },
        scores={
            "search": pick.score.to_json_dict(),
            "select": selection[pick.number].to_json_dict(),
            "held_out": scores["pick"].to_json_dict(),
        },
        seeds=seeds,
        search={"family": "guidance", "settings": settings.to_json_dict()},
        prediction_type=source.prediction_type,
        extra={"guidance_schedule": guidance.to_json(), "unet_passes": int(budget)},
    )
    ScheduleFile(grid, provenance).save(out / "best_schedule.json")
    files = {"guidance": str(out / "guidance.json"), "schedule": str(out / "best_schedule.json")}
    scheduler_dir = write_scheduler_dir(
        out / "scheduler", grid, solver, prediction_type=source.prediction_type
    )
    if scheduler_dir is not None:
        files["scheduler"] = str(scheduler_dir)
    files["summary"] = str(out / "result.json")
    summary = {
        "family": "guidance",
        **common,
        "pick": pick.to_json_dict(),
        "reference": reference_trial.to_json_dict(),
        "held_out": {key: score.to_json_dict() for key, score in scores.items()},
        "selection": {str(n): score.to_json_dict() for n, score in selection.items()},
        "front": [t.to_json_dict() for t in front],
        "trials": [t.to_json_dict() for t in trials],
        "files": files,
    }
    atomic_write_json(out / "result.json", summary)
    return GuidanceSearchResult(
        pick, reference_trial, trials, front, scores, selection, files, summary
    )


def feature_matrix(samples: Tensor, reference: FeatureReference) -> np.ndarray:
    """The samples' features in ``reference``'s feature space (for paired bootstraps)."""
    from stepsearch.eval.features import ensure_features
    from stepsearch.eval.scoring import finite_samples

    return ensure_features(finite_samples(samples), reference.extractor, progress=False)
