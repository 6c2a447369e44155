"""Guidance-schedule search: a guidance weight on the noise level and a step schedule, searched
jointly for a class-conditional model or a text-to-image pipeline at a fixed budget of network
(UNet) passes.

A candidate is a :class:`~stepsearch.guidance.GuidanceSchedule` (constant, linear / cosine
increasing, Wang et al.'s clamp-linear and power-cosine, Kynkäänniemi et al.'s interval) and a
Karras step spacing ``rho``. The budget counts **network passes**, not steps: a step at weight 1
costs one pass, a guided step two, so for each candidate the solver gets the most steps whose
passes fit the budget (:func:`steps_for_budget`): an interval schedule buys extra steps with the
passes it saves.

Two judges at once, on the same samples (common random numbers: sample ``i`` of a split always
starts from the same noise and asks for digit ``i mod 10``, or prompt ``i mod len(prompts)``):

- sample quality, ``fd``: a Fréchet distance, lower is better. For ``digits-cond`` in the model's
  own feature space (FD-digits against the real digits); for a pipeline, FID: Inception features
  against reference statistics or images (``fd_reference``, as ``stepsearch eval`` scores
  ``fid``: ``--inception-weights``, ``--reference-stats``);
- condition adherence, higher is better, by a :class:`ConditionJudge` (:func:`condition_judge`):
  ``accuracy`` for a model with a classifier (the fraction of samples the classifier assigns to
  the requested class, :class:`AccuracyJudge`), ``clip`` for a pipeline (the CLIP score
  ``mean_i 100 max(cos(image_i, prompt_i), 0)`` of a
  :class:`~stepsearch.eval.clip_score.ClipScorer`, :class:`ClipJudge`). Scores, files and
  messages name the judge: the score's key is ``accuracy`` or ``clip``.

Optuna's multi-objective TPE proposes the candidates; every one is a trial of the study (SQLite in
``out`` by default, any database URL), a rerun resumes it. The study opens with constant guidance
over :attr:`GuidanceSearchSettings.constant_weights` at the default spacing (the curve every
result is compared with).

The search seed's scores are noisy (a few hundred samples tell accuracies of 0.99 and 0.995
apart by one or two digits), so the pick is made on a third noise seed, the *selection* seed, with
more samples: the constant curve and the search seed's best non-dominated layers of trials
(:attr:`GuidanceSearchSettings.select_trials` of them) are scored there, each score kept in the
study (a rerun reuses it). The pick rule (:data:`PICK_RULES`): by default, among those whose
selection condition score (accuracy, CLIP score) is at least that of constant guidance at the
model's default weight (its guidance scale), the lowest selection FD; ``margin``: the trial
furthest below the constant curve at its own condition score (the issue's sense of "dominates").
The pick and the constant curve are then scored on held-out
noise. Files: ``guidance.json`` (the guidance schedule with provenance), ``best_schedule.json``
and ``scheduler/`` (the step schedule), ``result.json`` (Pareto front, constant curve, pick,
held-out scores). A pipeline search also records its ``judges`` (the CLIP model's identity, the FD
reference) in the study and the files; a class-conditional search's files keep the keys they
always had (the pick rule and ``objective.judges`` name its judge).

A text-to-image pipeline user runs::

    stepsearch search guidance --pipeline SD_DIR --prompts prompts.txt --clip-model CLIP_DIR \\
        --inception-weights inception-2015-12-05.pt --reference-stats coco.npz --device cuda

(:data:`PIPELINE_SETTINGS`: constant weights 1 to 10 around diffusers' default 7.5); from Python,
:func:`pipeline_judges` loads the two judges and :func:`search_guidance` takes them as
``clip_scorer`` and ``fd_reference``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from stepsearch._io import atomic_write_json
from stepsearch._progress import progress_bar
from stepsearch.eval.clip_score import ClipScorer
from stepsearch.eval.evaluate import check_device, load_clip_scorer, load_inception
from stepsearch.eval.experiment import class_accuracy
from stepsearch.eval.scoring import FeatureReference, distance_scores
from stepsearch.guidance import GuidanceSchedule, noise_range, unet_passes
from stepsearch.models.source import generate_from_source, module_digest
from stepsearch.noise import NoiseSchedule
from stepsearch.schedule import StepSchedule, karras
from stepsearch.schedule_file import Provenance, ScheduleFile
from stepsearch.search.job import output_dir, resolve_storage, write_scheduler_dir
from stepsearch.search.store import storage_url
from stepsearch.solvers import get_solver, solver_to_json
from stepsearch.solvers.base import Solver

__all__ = [
    "CONDITION_JUDGES",
    "PICK_RULES",
    "PIPELINE_SETTINGS",
    "SEARCH_SHAPES",
    "AccuracyJudge",
    "ClipJudge",
    "ConditionJudge",
    "CurvePoint",
    "GuidanceCandidate",
    "GuidanceScore",
    "GuidanceSearchResult",
    "GuidanceSearchSettings",
    "GuidanceTrial",
    "condition_judge",
    "constant_curve_point",
    "evaluate_candidate",
    "feature_matrix",
    "pareto_front",
    "pick_trial",
    "pipeline_judges",
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

CONDITION_JUDGES: Mapping[str, str] = {"accuracy": "accuracy", "clip": "CLIP score"}
"""The condition judges (the key of their scores) and their names in words."""

PICK_RULES: Mapping[str, str] = {
    "default": "lowest FD at {judge} >= constant w={default_weight}'s",
    "margin": "largest FD margin below the constant curve (interpolated in the weight) at the "
    "trial's own {judge}, {judge} >= the curve's smallest weight's",
}
"""The rules that pick a trial on the selection seed (``GuidanceSearchSettings.pick_rule``), in
words with the condition judge (``{judge}``: accuracy, CLIP score) and the default weight to fill
in (:func:`_pick_rule_text`; the margin's curve: :func:`constant_curve_point`)."""


@dataclass(frozen=True)
class GuidanceSearchSettings:
    """What a guidance search explores.

    ``trials``: trials in all (the constant curve included); ``shapes``: the guidance shapes it
    proposes; ``weight_range``: the (mean) weight ``w``; ``constant_weights``: the constant curve;
    ``default_weight``: the constant weight whose condition score (accuracy, CLIP score) a pick
    must reach (``None``: the model's own guidance scale); ``rho``: the Karras spacing of the
    constant curve; ``rho_range``: the spacings searched; ``select_trials``: the searched trials
    (besides the constant curve) scored on the selection seed; ``pick_rule``: how the pick is
    made on the selection seed (:data:`PICK_RULES`). The pick rule and ``select_trials`` choose
    among finished trials only: a study resumes under another one.
    """

    trials: int = 60
    shapes: tuple[str, ...] = SEARCH_SHAPES
    weight_range: tuple[float, float] = (1.0, 5.0)
    constant_weights: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
    default_weight: float | None = None
    rho: float = 7.0
    rho_range: tuple[float, float] = (1.5, 12.0)
    select_trials: int = 12
    pick_rule: str = "default"

    def __post_init__(self) -> None:
        if self.pick_rule not in PICK_RULES:
            raise ValueError(f"pick_rule: choose from {list(PICK_RULES)}, got {self.pick_rule!r}")
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


PIPELINE_SETTINGS = GuidanceSearchSettings(
    weight_range=(1.0, 12.0), constant_weights=(1.0, 3.0, 5.0, 7.5, 10.0)
)
"""The defaults for a text-to-image pipeline: weights up to 12, the constant curve around
diffusers' default guidance scale 7.5 (the default weight a pick must match)."""


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
    """One candidate's samples judged: FD (with its bootstrap standard error) and the condition
    score of ``judge`` (:data:`CONDITION_JUDGES`: ``accuracy`` with its binomial standard error,
    ``clip`` with the standard error of the mean), the steps and network passes it ran.

    In JSON (and in the study) the condition score goes by its judge's name: ``accuracy`` /
    ``accuracy_std``, ``clip`` / ``clip_std``."""

    fd: float
    fd_std: float | None
    condition: float
    condition_std: float
    num_steps: int
    passes: int
    num_samples: int
    split: str
    seconds: float = 0.0
    judge: str = "accuracy"

    def __post_init__(self) -> None:
        if self.judge not in CONDITION_JUDGES:
            raise ValueError(f"judge must be one of {list(CONDITION_JUDGES)}, got {self.judge!r}")

    @property
    def accuracy(self) -> float:
        """The condition score of a classifier-judged search (``judge == "accuracy"``)."""
        self._require("accuracy")
        return self.condition

    @property
    def accuracy_std(self) -> float:
        self._require("accuracy")
        return self.condition_std

    def _require(self, judge: str) -> None:
        if self.judge != judge:
            raise AttributeError(
                f"this score is judged by {self.judge}, not {judge}: see condition"
            )

    def to_record(self) -> dict[str, Any]:
        """The fields as stored in the study, the condition score under its judge's name."""
        return {
            "fd": self.fd,
            "fd_std": self.fd_std,
            self.judge: self.condition,
            f"{self.judge}_std": self.condition_std,
            "num_steps": self.num_steps,
            "passes": self.passes,
            "num_samples": self.num_samples,
            "split": self.split,
            "seconds": self.seconds,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> GuidanceScore:
        """The inverse of :meth:`to_record`."""
        fields = dict(record)
        judge = next((name for name in CONDITION_JUDGES if name in fields), None)
        if judge is None:
            raise ValueError(f"a guidance score needs one of {list(CONDITION_JUDGES)}: {record!r}")
        condition, condition_std = fields.pop(judge), fields.pop(f"{judge}_std")
        return cls(condition=condition, condition_std=condition_std, judge=judge, **fields)

    def to_json_dict(self) -> dict[str, Any]:
        def finite(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else float(value)

        return {
            "fd": finite(self.fd),
            "fd_std": finite(self.fd_std),
            self.judge: self.condition,
            f"{self.judge}_std": self.condition_std,
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
    """Constant guidance at the default weight (the condition score a pick must reach)."""
    trials: list[GuidanceTrial]
    front: list[GuidanceTrial]
    held_out: dict[str, GuidanceScore]
    """Held-out scores: ``pick`` and ``constant w=...`` for every constant weight."""
    selection: dict[int, GuidanceScore] = field(default_factory=dict)
    """Selection-seed scores by trial number (the constant curve and the trials the pick was
    made among)."""
    files: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    condition_judge: str = "accuracy"
    """The condition judge's name (:data:`CONDITION_JUDGES`)."""


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
class ConditionJudge(Protocol):
    """How well samples follow their condition (class label, prompt): higher is better."""

    name: ClassVar[str]
    """The key of its scores (:data:`CONDITION_JUDGES`)."""

    def score(self, source: Any, samples: Tensor) -> tuple[float, float]:
        """``(score, standard error)`` of ``samples`` ``0 .. N-1`` of ``source``."""
        ...

    def describe(self) -> dict[str, Any]:
        """What judged, for provenance (JSON)."""
        ...


@dataclass(frozen=True, eq=False)
class AccuracyJudge:
    """The fraction of samples ``classifier`` assigns to their requested class
    (:func:`~stepsearch.eval.experiment.class_accuracy`), with its binomial standard error."""

    classifier: nn.Module
    name: ClassVar[str] = "accuracy"

    def score(self, source: Any, samples: Tensor) -> tuple[float, float]:
        num_samples = samples.shape[0]
        accuracy = class_accuracy(self.classifier, samples, source.labels_for(range(num_samples)))
        return float(accuracy), math.sqrt(accuracy * (1.0 - accuracy) / num_samples)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "classifier": module_digest(self.classifier)}


@dataclass(frozen=True, eq=False)
class ClipJudge:
    """The CLIP score of each sample and its prompt (``100 max(cos, 0)``, Hessel et al. 2021),
    their mean exactly as ``scorer(samples, prompts)`` gives it, and its standard error."""

    scorer: ClipScorer
    name: ClassVar[str] = "clip"

    def score(self, source: Any, samples: Tensor) -> tuple[float, float]:
        num_samples = samples.shape[0]
        scores = self.scorer.scores(samples, source.prompts_for(range(num_samples)))
        std = float(scores.std()) / math.sqrt(num_samples) if num_samples > 1 else 0.0
        return float(scores.mean()), std

    def describe(self) -> dict[str, Any]:
        path = str(getattr(self.scorer.model.config, "name_or_path", "") or "clip")
        model = {"name": Path(path).name, "digest": module_digest(self.scorer.model)}
        return {"name": self.name, "model": model}


def condition_judge(source: Any, clip_scorer: ClipScorer | None = None) -> ConditionJudge:
    """The condition judge of ``source``: :class:`ClipJudge` with ``clip_scorer`` for a
    text-to-image pipeline (a source with prompts), :class:`AccuracyJudge` for a class-conditional
    model with a classifier.

    Raises:
        ValueError: a pipeline without ``clip_scorer``, ``clip_scorer`` for a source without
            prompts, a source that is neither.
    """
    name = source.identity.name
    prompts_for = getattr(source, "prompts_for", None)
    if prompts_for is not None and prompts_for(range(1)) is not None:
        if clip_scorer is None:
            raise ValueError(
                f"a guidance search on the text-to-image pipeline {name!r} judges prompt adherence "
                "by CLIP score: give a CLIP model (--clip-model DIR)"
            )
        return ClipJudge(clip_scorer)
    labels_for = getattr(source, "labels_for", None)
    classifier = getattr(source, "classifier", None)
    if classifier is None or labels_for is None or labels_for(range(1)) is None:
        raise ValueError(
            "a guidance search needs a class-conditional model with a classifier (--model "
            "digits-cond) or a text-to-image pipeline (--pipeline DIR --prompts FILE); "
            f"{name!r} is neither"
        )
    if clip_scorer is not None:
        raise ValueError(
            f"a CLIP model judges a text-to-image pipeline's prompts; {name!r} is "
            "class-conditional (judged by its classifier's accuracy): leave the CLIP model out"
        )
    return AccuracyJudge(classifier)


def _own_features(source: Any) -> tuple[nn.Module, Tensor]:
    """The source's own feature network and reference data (its FD reference)."""
    features = getattr(source, "features", None)
    data = getattr(source, "reference_data", None)
    if features is None or data is None:
        raise ValueError(
            f"{source.identity.name!r} has no feature network and reference data of its own (fd): "
            "give an FD reference (a pipeline: Inception features against --reference-stats)"
        )
    return features, data


def _fd_reference(source: Any, fd_reference: FeatureReference | None) -> FeatureReference:
    """``fd_reference``, else the source's own feature network and reference data."""
    if fd_reference is not None:
        return fd_reference
    features, data = _own_features(source)
    return FeatureReference.from_images(features, data, source=f"{source.identity.name} data")


def pipeline_judges(
    clip_model: str | os.PathLike[str] | None,
    reference_stats: str | os.PathLike[str] | None,
    inception_weights: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[ClipScorer, FeatureReference]:
    """The judges of a pipeline's guidance search, loaded as ``stepsearch eval`` loads them for
    ``clip`` and ``fid``: a :class:`~stepsearch.eval.clip_score.ClipScorer` from the local CLIP
    directory ``clip_model``, and Inception features (``inception_weights``: the file, a folder
    holding it, or ``None`` to look in the usual places) against ``reference_stats`` (an ``.npz``
    from ``stepsearch stats``, or a folder / ``.safetensors`` of reference images, read with a
    progress bar if ``progress``).

    Raises:
        ValueError: a judge missing or unloadable; the message names the option to pass.
    """
    if clip_model is None:
        raise ValueError(
            "a guidance search on a pipeline judges prompt adherence by CLIP score: pass "
            "--clip-model DIR (a local CLIP model directory)"
        )
    if reference_stats is None:
        raise ValueError(
            "a guidance search on a pipeline judges sample quality by FID: pass --reference-stats "
            "PATH (an .npz made by `stepsearch stats`, or a folder of reference images) and "
            "Inception weights (--inception-weights FILE)"
        )
    torch_device = check_device(str(device))
    weights = None if inception_weights is None else Path(inception_weights)
    inception = load_inception(weights, torch_device)
    reference = FeatureReference.load(inception, reference_stats, progress=progress)
    return load_clip_scorer(Path(clip_model), torch_device), reference


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
    judge: ConditionJudge | None = None,
    chunk_size: int = 250,
) -> GuidanceScore:
    """Sample ``source`` guided by ``candidate`` within ``budget`` passes (seed ``seed``,
    ``chunk_size`` samples per batch) and judge the samples (module docstring): FD against
    ``reference``, condition adherence by ``judge`` (default: the source's classifier);
    ``samples_out`` receives the samples."""
    begin = time.perf_counter()
    judge = judge if judge is not None else condition_judge(source)
    grid, passes = steps_for_budget(candidate.guidance, source.noise, solver, budget, candidate.rho)
    model = dataclasses.replace(source, guidance_schedule=candidate.guidance)
    samples = generate_from_source(
        model, solver, grid, num_samples, seed=seed, chunk_size=chunk_size, progress=False
    )
    if samples_out is not None:
        samples_out.append(samples)
    fd, fd_std = distance_scores(samples, {"fd": reference}, bootstrap=bootstrap)["fd"]
    condition, condition_std = judge.score(source, samples)
    return GuidanceScore(
        fd=float(fd),
        fd_std=fd_std,
        condition=condition,
        condition_std=condition_std,
        num_steps=grid.num_steps,
        passes=passes,
        num_samples=int(num_samples),
        split=split,
        seconds=time.perf_counter() - begin,
        judge=judge.name,
    )


def pareto_front(trials: Sequence[GuidanceTrial]) -> list[GuidanceTrial]:
    """Trials no other trial beats on both judges (lower FD and higher condition score, one
    strictly), by FD."""

    def dominated(a: GuidanceTrial) -> bool:
        return any(
            b.score.fd <= a.score.fd
            and b.score.condition >= a.score.condition
            and (b.score.fd < a.score.fd or b.score.condition > a.score.condition)
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
        score = GuidanceScore.from_record(attrs["score"])
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
    clip_scorer: ClipScorer | None = None,
    fd_reference: FeatureReference | None = None,
    chunk_size: int = 250,
) -> GuidanceSearchResult:
    """Search a guidance schedule and step spacing for ``source`` at ``budget`` network passes
    per sample and write the files under ``out`` (module docstring). Rerun the same call to
    resume (finished trials are kept).

    ``source``: a class-conditional model with a classifier (``digits-cond``: judged by FD-digits
    and accuracy) or a text-to-image :class:`~stepsearch.models.pipeline.PipelineModel`, judged
    by FD against ``fd_reference`` (e.g. Inception features against reference statistics, see
    :func:`pipeline_judges`; default: the source's own features and data) and by the CLIP score
    of ``clip_scorer`` (needed for a pipeline, refused for a class-conditional model).
    ``chunk_size``: samples per batch (the scores do not depend on it).

    Raises:
        ValueError: a source or judges that do not fit (:func:`condition_judge`), bad counts or
            seeds, a default weight off the constant curve, a study made for other settings.
    """
    settings = settings or GuidanceSearchSettings()
    run_solver = get_solver(solver) if isinstance(solver, str) else solver
    judge = condition_judge(source, clip_scorer)
    if fd_reference is None:
        _own_features(source)  # refuses, naming what to give, before any work
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
    reference = _fd_reference(source, fd_reference)
    judges = _judges(judge, reference)
    metadata = {
        "model": source.identity.to_json_dict(),
        "solver": solver_to_json(run_solver),
        "unet_passes": int(budget),
        "num_samples": int(num_samples),
        "search_seed": int(search_seed),
        "select_samples": int(select_samples),
        "select_seed": int(select_seed),
        "settings": _study_settings(settings),
        **judges,
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
                split="search", reference=reference, judge=judge, chunk_size=chunk_size,
            )  # fmt: skip
            trial.set_user_attr("origin", trial.user_attrs.get("origin", "search"))
            for key, value in candidate.to_json_dict().items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("score", score.to_record())
            fd = score.fd if math.isfinite(score.fd) else float("inf")
            study.tell(trial, [fd, score.condition])
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
                split="select", reference=reference, judge=judge, chunk_size=chunk_size,
            )  # fmt: skip
            study.set_user_attr(key, score.to_record())
        else:
            score = GuidanceScore.from_record(stored)
        selection[trial.number] = score
        bar.update(1)
    bar.close()
    pick = pick_trial(pool, selection, constants, default_weight, settings.pick_rule)
    seeds = {"search": int(search_seed), "select": int(select_seed), "held_out": int(held_out_seed)}
    samples = {"search": int(num_samples), "select": int(select_samples),
               "held_out": int(held_out_samples)}  # fmt: skip
    return _report(
        source, run_solver, budget, out_path, settings, trials, constants, default_weight,
        pick, selection, _Judging(reference, judge, judges, chunk_size), seeds, samples, url,
        name,
    )  # fmt: skip


@dataclass(frozen=True, eq=False)
class _Judging:
    """How a search judges: its FD reference, its condition judge, the ``judges`` record of its
    files (empty for a classifier), the batch size."""

    reference: FeatureReference
    judge: ConditionJudge
    record: dict[str, Any]
    chunk_size: int


def _judges(judge: ConditionJudge, reference: FeatureReference) -> dict[str, Any]:
    """``{"judges": ...}``: the condition judge (:meth:`ConditionJudge.describe`) and the FD
    reference, for the study's metadata and the files. Empty for the classifier's accuracy: a
    class-conditional search's studies and files keep the keys they always had (their pick rule
    and ``objective.judges`` name the judge), so earlier studies resume."""
    if judge.name == AccuracyJudge.name:
        return {}
    quality = {
        "name": "fd",
        "features": type(reference.extractor).__name__,
        "reference": reference.source,
    }
    return {"judges": {"quality": quality, "condition": judge.describe()}}


def _study_settings(settings: GuidanceSearchSettings) -> dict[str, Any]:
    """The settings a study is made for: the pick rule chooses among its finished trials (and
    studies made before it existed keep resuming)."""
    record = settings.to_json_dict()
    del record["pick_rule"]
    return record


@dataclass(frozen=True)
class CurvePoint:
    """Constant guidance at a condition score, on the curve interpolated in the weight:
    ``fd`` at ``condition``, ``t`` of the way from weight ``between[0]`` to ``between[1]``
    (equal weights: no pair of neighbouring weights brackets it, the nearest constant)."""

    weight: float
    fd: float
    condition: float
    between: tuple[float, float]
    t: float


def constant_curve_point(
    curve: Mapping[float, tuple[float, float]], condition: float
) -> CurvePoint:
    """Constant guidance at ``condition``. ``curve``: weight -> ``(fd, condition score)``.

    Between neighbouring weights whose condition scores bracket ``condition``, the curve is
    linear in the weight (FD and condition score alike); where several pairs bracket it (the
    condition score rises, then falls at high weights), the crossing with the lowest FD. Outside
    every pair's range, the constant with the nearest condition score (its own FD and score)."""
    weights = sorted(curve)
    if not weights:
        raise ValueError("the constant curve is empty")
    crossings = []
    for low, high in itertools.pairwise(weights):
        (fd_low, c_low), (fd_high, c_high) = curve[low], curve[high]
        if min(c_low, c_high) <= condition <= max(c_low, c_high):
            if c_high == c_low:  # both at this score: the lower FD of the two
                t = 0.0 if fd_low <= fd_high else 1.0
            else:
                t = (condition - c_low) / (c_high - c_low)
            fd = (1.0 - t) * fd_low + t * fd_high
            crossings.append(CurvePoint(low + t * (high - low), fd, condition, (low, high), t))
    if crossings:
        return min(crossings, key=lambda point: point.fd)
    weight = min(weights, key=lambda w: abs(curve[w][1] - condition))
    fd, score = curve[weight]
    return CurvePoint(weight, fd, score, (weight, weight), 0.0)


def pick_trial(
    pool: Sequence[GuidanceTrial],
    selection: Mapping[int, GuidanceScore],
    constants: Mapping[float, GuidanceTrial],
    default_weight: float,
    rule: str = "default",
) -> GuidanceTrial:
    """The pick among ``pool`` by ``rule`` (:data:`PICK_RULES`), on the selection-seed scores
    ``selection`` (by trial number; the constant curve ``constants`` among them).

    ``default``: the lowest FD among trials whose condition score is at least that of constant
    guidance at ``default_weight``. ``margin``: the largest ``FD(curve at the trial's score) -
    FD(trial)`` (:func:`constant_curve_point` on the selection scores of ``constants``) among
    trials whose score is at least that of the constant curve's smallest weight; a point on the
    curve has margin 0. Trials with a non-finite selection FD are never picked. Ties: the higher
    condition score, then the lower trial number."""
    if rule not in PICK_RULES:
        raise ValueError(f"pick rule: choose from {list(PICK_RULES)}, got {rule!r}")

    def tie(t: GuidanceTrial) -> tuple[float, int]:
        return -selection[t.number].condition, t.number

    def at_least(floor: float) -> list[GuidanceTrial]:
        eligible = [
            t
            for t in pool
            if selection[t.number].condition >= floor and math.isfinite(selection[t.number].fd)
        ]
        if not eligible:
            raise ValueError(
                f"no trial with a finite selection FD reaches condition score {floor:g}: every "
                "sample diverged? score more samples (--select-samples) or check the model"
            )
        return eligible

    if rule == "default":
        eligible = at_least(selection[constants[default_weight].number].condition)
        return min(eligible, key=lambda t: (selection[t.number].fd, *tie(t)))
    curve = {
        w: (selection[t.number].fd, selection[t.number].condition) for w, t in constants.items()
    }
    eligible = at_least(curve[min(curve)][1])

    def margin(t: GuidanceTrial) -> float:
        score = selection[t.number]
        return constant_curve_point(curve, score.condition).fd - score.fd

    return min(eligible, key=lambda t: (-margin(t), *tie(t)))


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
    judging: _Judging,
    seeds: dict[str, int],
    samples: dict[str, int],
    url: str,
    name: str,
) -> GuidanceSearchResult:
    """Score the pick and the constant curve on held-out noise, write the files."""
    reference_trial = constants[default_weight]
    held_out_seed = seeds["held_out"]
    num_samples, select_samples = samples["search"], samples["select"]
    held_out_samples = samples["held_out"]
    judge = judging.judge

    def held_out(trial: GuidanceTrial) -> GuidanceScore:
        return evaluate_candidate(
            source, trial.candidate, solver, budget, held_out_samples, seed=held_out_seed,
            split="held_out", reference=judging.reference, judge=judge,
            chunk_size=judging.chunk_size,
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
        "pick_rule": _pick_rule_text(
            settings.pick_rule,
            CONDITION_JUDGES[judge.name],
            default_weight,
            select_samples,
            len(selection) - len(constants),
        ),
        **judging.record,
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
            "judges": ["fd", judge.name],
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
        extra={
            "guidance_schedule": guidance.to_json(),
            "unet_passes": int(budget),
            **judging.record,
        },
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
        pick, reference_trial, trials, front, scores, selection, files, summary, judge.name
    )


def _pick_rule_text(
    rule: str, judge: str, default_weight: float, select_samples: int, searched: int
) -> str:
    """The pick rule in words, for the files."""
    where = (
        f"on the selection seed ({select_samples} samples) among the constant curve and the "
        f"search seed's {searched} best non-dominated trials"
    )
    said = PICK_RULES[rule].format(judge=judge, default_weight=f"{default_weight:g}")
    return f"{said}, {where}"


def feature_matrix(samples: Tensor, reference: FeatureReference) -> np.ndarray:
    """The samples' features in ``reference``'s feature space (for paired bootstraps)."""
    from stepsearch.eval.features import ensure_features
    from stepsearch.eval.scoring import finite_samples

    return ensure_features(finite_samples(samples), reference.extractor, progress=False)
