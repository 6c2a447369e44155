"""Side-by-side evaluation of samplers: stepsearch solver x schedule vs diffusers' built-ins.

One model (a :class:`~stepsearch.models.method.DiffusionModel`: an
:class:`~stepsearch.models.image_model.ImageModel`, the bundled digits DDPM or a local diffusers
``UNet2DModel`` directory, or a :class:`~stepsearch.models.pipeline.PipelineModel`), a list of
:class:`Method` s, a list of NFEs and metrics: every method generates the same samples (same
per-index noise) at each NFE, every metric scores them, and :func:`run_experiment` (the one
harness) returns one :class:`~stepsearch.eval.report.ResultTable` per metric. ``fd`` / ``fid`` /
``kid`` are scored by :mod:`stepsearch.eval.scoring` (as in the search objective).

Class-conditional models (``digits-cond``): sample ``i`` is conditioned on class label
``i mod num_classes`` (as a pipeline's sample ``i`` gets prompt ``i mod len(prompts)``), guided
with one classifier-free guidance scale ``w`` (``uncond + w (cond - uncond)`` on the network
output; ``w = 1`` is the conditional branch alone), in stepsearch's solvers (through the source's
``denoiser(indices)``) and in diffusers' loop (:meth:`ImageModel.model_fn_for`) alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stepsearch._progress import progress_bar
from stepsearch.eval.report import Cell, ResultTable
from stepsearch.eval.scoring import FeatureReference, distance_scores
from stepsearch.eval.trajectory import trajectory_error
from stepsearch.models.method import DiffusionModel, Method, reference_solution

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "TEXT_TO_IMAGE_METRICS",
    "class_accuracy",
    "run_experiment",
]

METRICS = ("fd", "fid", "kid", "traj", "acc")
"""``fd``: Fréchet distance in the model's own feature space (FD-digits for the bundled model);
``fid``: Fréchet distance in Inception features against a :class:`~stepsearch.eval.scoring.FeatureReference` (reference
statistics or images); ``kid``: kernel distance in the model's own feature space, or in Inception
features against reference images when the model has none; ``traj``: median RMS error to a
reference ODE solution from the same noise; ``acc`` (class-conditional models with a classifier):
the fraction of samples the classifier assigns to the requested class (higher is better)."""

TEXT_TO_IMAGE_METRICS = ("clip", "fid", "kid", "traj")
"""For text-to-image pipelines: ``clip``: CLIP score ``mean_i 100 max(cos, 0)`` of image i and its
prompt (higher is better); ``fid`` / ``kid``: Inception features against reference statistics /
images; ``traj``: median RMS error (decoded images in ``[-1, 1]``) to a reference solution from
the same noise and prompt."""

HIGHER_IS_BETTER = frozenset({"clip", "acc"})
"""Metrics whose result tables rank the largest value first."""


def run_experiment(
    model: DiffusionModel,
    methods: Sequence[Method],
    nfes: Sequence[int],
    metrics: Sequence[str] = ("fd", "traj"),
    num_samples: int = 1000,
    seed: int = 0,
    accelerator: Any | None = None,
    chunk_size: int = 250,
    on_samples: Callable[[Method, int, Tensor], None] | None = None,
    fid_reference: FeatureReference | None = None,
    clip_scorer: Any | None = None,
    reference_steps: int | None = None,
) -> dict[str, ResultTable]:
    """Evaluate every method at every NFE on every metric: the one harness for unconditional
    models and text-to-image pipelines (:data:`METRICS`, plus ``clip`` for pipelines).

    ``fid_reference`` (Inception features, see :class:`~stepsearch.eval.scoring.FeatureReference`) is needed for ``fid``,
    and for ``kid`` when the model has no feature space of its own; ``clip`` needs
    ``clip_scorer`` (a :class:`~stepsearch.eval.clip_score.ClipScorer`) and prompts; ``traj``
    generates the reference solution first (:func:`reference_solution`, ``reference_steps``).
    A (method, NFE) cell that no step count reaches exactly is left out. ``clip`` tables have
    ``lower_is_better=False``.
    """
    scorer = _Scorer(
        model, metrics, num_samples, seed, accelerator, chunk_size, fid_reference, clip_scorer,
        reference_steps,
    )  # fmt: skip
    tables = {
        metric: ResultTable(metric, lower_is_better=metric not in HIGHER_IS_BETTER)
        for metric in metrics
    }
    cells = [(method, nfe) for method in methods for nfe in nfes]
    for method, nfe in progress_bar(cells, desc="methods x NFE", disable=not _is_main(accelerator)):
        start = time.perf_counter()
        result = method.run(model, nfe, num_samples, seed, accelerator, chunk_size)
        if result is None:
            continue
        samples, num_steps = result
        seconds = time.perf_counter() - start
        if on_samples is not None:
            on_samples(method, nfe, samples)
        scores = scorer.score(samples)
        for metric in metrics:
            value, std = scores[metric]
            tables[metric].add(
                Cell(method.label, nfe, metric, value, std, num_steps, round(seconds, 3))
            )
    return tables


def _is_main(accelerator: Any | None) -> bool:
    return accelerator is None or bool(accelerator.is_main_process)


class _Scorer:
    """Metric state computed once per experiment: reference features, the reference solution,
    the prompts of the samples. ``fd`` / ``fid`` / ``kid`` are the one distance scorer's
    (:func:`~stepsearch.eval.scoring.distance_scores`, as in the search objective)."""

    def __init__(
        self,
        model: DiffusionModel,
        metrics: Sequence[str],
        num_samples: int,
        seed: int,
        accelerator: Any | None,
        chunk_size: int,
        fid_reference: FeatureReference | None = None,
        clip_scorer: Any | None = None,
        reference_steps: int | None = None,
    ):
        self.metrics = tuple(metrics)
        self.prompts = model.prompts_for(range(num_samples))
        labels_for = getattr(model, "labels_for", None)
        self.labels = labels_for(range(num_samples)) if labels_for is not None else None
        self.classifier = getattr(model, "classifier", None)
        self.references = _metric_references(model, self.metrics, fid_reference, clip_scorer)
        self.clip_scorer = clip_scorer
        self.reference = (
            reference_solution(model, num_samples, seed, accelerator, chunk_size, reference_steps)
            if "traj" in metrics
            else None
        )

    def score(self, samples: Tensor) -> dict[str, tuple[float, float | None]]:
        scores = distance_scores(samples, self.references)
        if "clip" in self.metrics:
            scores["clip"] = (self.clip_scorer(samples, self.prompts), None)
        if "acc" in self.metrics:
            scores["acc"] = (class_accuracy(self.classifier, samples, self.labels), None)
        if self.reference is not None:
            scores["traj"] = (trajectory_error(samples, self.reference), None)
        return scores


def class_accuracy(classifier: nn.Module, samples: Tensor, labels: Tensor) -> float:
    """The fraction of ``samples`` (clamped to ``[-1, 1]``, non-finite values zeroed) that
    ``classifier``'s argmax assigns to ``labels``."""
    return class_correct(classifier, samples, labels).double().mean().item()


def class_correct(classifier: nn.Module, samples: Tensor, labels: Tensor) -> Tensor:
    """Per sample, whether ``classifier``'s argmax assigns it to its label (a bool tensor on the
    CPU; the samples prepared as :func:`class_accuracy` prepares them)."""
    weight = next(classifier.parameters())
    x = samples.nan_to_num(0.0).clamp(-1.0, 1.0).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        predicted = classifier(x).argmax(dim=1).cpu()
    return predicted == labels.cpu()


def _metric_references(
    model: DiffusionModel,
    metrics: Sequence[str],
    fid_reference: FeatureReference | None,
    clip_scorer: Any | None,
) -> dict[str, FeatureReference]:
    """Check ``metrics`` against what the run has and return the reference of each of ``fd`` /
    ``fid`` / ``kid`` in them (``fd`` and ``kid`` in the model's own feature space when it has
    one, else ``kid`` in Inception features): the one metric check of every experiment."""
    conditional = model.prompts_for(range(1)) is not None
    known = TEXT_TO_IMAGE_METRICS if conditional else METRICS
    unknown = sorted(set(metrics) - set(known))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {known}")
    labels_for = getattr(model, "labels_for", None)
    if "acc" in metrics and (
        labels_for is None
        or labels_for(range(1)) is None
        or getattr(model, "classifier", None) is None
    ):
        raise ValueError(
            f"metric acc (classifier accuracy on the requested class) needs a class-conditional "
            f"model with a classifier (--model digits-cond); {model.name!r} is not one"
        )
    if "clip" in metrics and clip_scorer is None:
        raise ValueError("metric clip needs a CLIP model (--clip-model)")
    features = getattr(model, "feature_extractor", None)
    data = getattr(model, "reference_images", None)
    own = None
    if features is not None and data is not None:
        if {"fd", "kid"} & set(metrics):
            own = FeatureReference.from_images(features, data, source=f"{model.name} data")
    elif "fd" in metrics:
        raise ValueError(
            f"fd for model {model.name!r} needs a feature extractor and reference images of its "
            "own; use fid (Inception features against --reference-stats) instead"
        )
    references: dict[str, FeatureReference] = {}
    for metric in metrics:
        if metric in ("fd", "kid") and own is not None:
            references[metric] = own
        elif metric in ("fid", "kid"):
            if fid_reference is None:
                raise ValueError(
                    f"metric {metric} for model {model.name!r} needs Inception features "
                    "(--inception-weights) and a reference (--reference-stats)"
                )
            if metric == "kid" and fid_reference.features is None:
                raise ValueError(
                    "metric kid needs reference images (a folder or .safetensors for "
                    "--reference-stats): an .npz holds only the mean and covariance"
                )
            references[metric] = fid_reference
    return references
