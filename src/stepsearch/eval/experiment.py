"""Side-by-side evaluation of samplers: stepsearch solver x schedule vs diffusers' built-ins.

One model (an :class:`ImageModel`: the bundled digits DDPM or a local diffusers ``UNet2DModel``
directory; or a :class:`~stepsearch.eval.text_to_image.TextToImageModel`, see :class:`EvalModel`),
a list of :class:`Method` s, a list of NFEs and metrics: every method generates the same samples
(same per-index noise) at each NFE, every metric scores them, and :func:`run_experiment` (the one
harness) returns one :class:`~stepsearch.eval.report.ResultTable` per metric. An image model's
stepsearch methods sample through its :class:`~stepsearch.eval.sources.SampleSource`.

Class-conditional models (``digits-cond``): sample ``i`` is conditioned on class label
``i mod num_classes`` (as a pipeline's sample ``i`` gets prompt ``i mod len(prompts)``), guided
with one classifier-free guidance scale ``w`` (``uncond + w (cond - uncond)`` on the network
output; ``w = 1`` is the conditional branch alone), in stepsearch's solvers (through the source's
``denoiser(indices)``) and in diffusers' loop (:meth:`ImageModel.model_fn_for`) alike.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from stepsearch.denoiser import ModelDenoiser, ModelFn, classifier_free_guidance
from stepsearch.eval.features import ensure_features
from stepsearch.eval.fid import FeatureStatistics, frechet_distance, kernel_inception_distance
from stepsearch.eval.generate import generate_with_diffusers_scheduler, steps_for_nfe
from stepsearch.eval.images import iter_image_batches
from stepsearch.eval.report import Cell, ResultTable
from stepsearch.eval.sources import (
    ClassConditionalSource,
    DenoiserSource,
    ModelIdentity,
    generate_from_source,
    module_digest,
)
from stepsearch.eval.trajectory import trajectory_error
from stepsearch.noise import DiscreteVP, NoiseSchedule
from stepsearch.schedule import StepSchedule, loglinear_interpolate, make_schedule
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

METRICS = ("fd", "fid", "kid", "traj", "acc")
"""``fd``: Fréchet distance in the model's own feature space (FD-digits for the bundled model);
``fid``: Fréchet distance in Inception features against a :class:`FeatureReference` (reference
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

REFERENCE_SOLVER = ("dpm_solver_pp_3m", "logsnr_uniform", 100)
"""The reference ODE solution for ``traj``: DPM-Solver++(3M), 100 logSNR-uniform steps."""


@dataclass
class ImageModel:
    """An image diffusion model with what evaluation needs: unconditional, or class-conditional
    with classifier-free guidance (``num_classes`` set; module docstring).

    ``num_classes``: sample ``i`` gets label ``i mod num_classes`` (``class_labels`` of the UNet);
    ``null_label``: the label of the unconditional branch; ``guidance_scale``: ``w``;
    ``classifier``: a network whose argmax is the class of an image (metric ``acc``).
    """

    name: str
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, ...]
    feature_extractor: torch.nn.Module | None = None
    reference_images: Tensor | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    noise_schedule: NoiseSchedule | None = None  # None: DiscreteVP from scheduler_config
    prediction: str | None = None  # None: scheduler_config's prediction_type
    num_classes: int | None = None
    null_label: int | None = None
    guidance_scale: float = 1.0
    classifier: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        if self.num_classes is None:
            if self.guidance_scale != 1.0:
                raise ValueError(
                    f"model {self.name!r} is unconditional: a guidance scale needs a "
                    "class-conditional model (digits-cond)"
                )
            return
        if self.null_label is None and self.guidance_scale != 1.0:
            raise ValueError(f"{self.name}: guidance needs the unconditional branch's null_label")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(
                f"--guidance-scale must be a finite number >= 0, got {self.guidance_scale!r}"
            )

    @cached_property
    def noise(self) -> NoiseSchedule:
        if self.noise_schedule is not None:
            return self.noise_schedule
        return DiscreteVP.from_diffusers_config(self.scheduler_config)

    @property
    def prediction_type(self) -> str:
        if self.prediction is not None:
            return self.prediction
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def conditional(self) -> bool:
        """Whether the model is class-conditional (sample ``i`` gets label ``i mod num_classes``)."""
        return self.num_classes is not None

    def labels_for(self, indices: Sequence[int]) -> Tensor | None:
        """The class label of each sample index (``i mod num_classes``), ``None`` if unconditional."""
        if self.num_classes is None:
            return None
        return torch.tensor([int(i) % self.num_classes for i in indices], dtype=torch.int64)

    def model_fn(self, x: Tensor, timestep: Tensor) -> Tensor:
        """The unconditional network ``(x, timestep) -> output`` (conditional: :meth:`model_fn_for`)."""
        if self.conditional:
            raise ValueError(f"{self.name} is class-conditional: use model_fn_for(indices)")
        return self.unet(x, timestep).sample

    def _branch(self, labels: Tensor) -> ModelFn:
        """The UNet conditioned on ``labels`` (one per sample of the batch)."""

        def network(x: Tensor, timestep: Tensor) -> Tensor:
            if labels.shape[0] != x.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for a batch of {x.shape[0]}")
            return self.unet(x, timestep, class_labels=labels.to(x.device)).sample

        return network

    def _null_labels(self, count: int) -> Tensor:
        assert self.null_label is not None
        return torch.full((count,), int(self.null_label), dtype=torch.int64)

    def model_fn_for(self, indices: Sequence[int]) -> ModelFn:
        """The network of the samples ``indices`` as diffusers' loop calls it: unconditional, or
        conditioned on labels ``i mod num_classes`` and guided on the raw output,
        ``uncond + w (cond - uncond)``, the same operations as the guided :meth:`denoiser`."""
        labels = self.labels_for(indices)
        if labels is None:
            return self.model_fn
        conditional = self._branch(labels)
        if self.guidance_scale == 1.0:
            return conditional
        unconditional = self._branch(self._null_labels(len(labels)))
        weight = float(self.guidance_scale)

        def guided(x: Tensor, timestep: Tensor) -> Tensor:
            return classifier_free_guidance(
                conditional(x, timestep), unconditional(x, timestep), weight
            )

        return guided

    def denoiser(self, indices: Sequence[int] | None = None) -> ModelDenoiser:
        """The ``x0`` denoiser (of the samples ``indices``, for a class-conditional model: their
        labels, classifier-free guided with :attr:`guidance_scale`; ``w = 1`` evaluates the
        conditional branch alone)."""
        labels = None if indices is None else self.labels_for(indices)
        if not self.conditional:
            return ModelDenoiser(self.model_fn, self.noise, self.prediction_type)
        if labels is None:
            raise ValueError(f"{self.name} is class-conditional: pass the sample indices")
        if self.guidance_scale == 1.0:
            return ModelDenoiser(self._branch(labels), self.noise, self.prediction_type)
        return ModelDenoiser(
            self._branch(labels),
            self.noise,
            self.prediction_type,
            unconditional=self._branch(self._null_labels(len(labels))),
            guidance=float(self.guidance_scale),
        )

    @cached_property
    def identity(self) -> ModelIdentity:
        """The model's name and a SHA-256 of its weights (a conditional model's guidance scale is
        in its source's ``describe()``, hence in every cache key and provenance)."""
        return ModelIdentity(self.name, module_digest(self.unet))

    def solver_for(self, method: Method) -> Solver:
        """The solver ``method`` names, with its options."""
        return get_solver(str(method.solver), **method.solver_options)

    def sample_schedule(
        self,
        method: Method,
        schedule: StepSchedule,
        num_samples: int,
        seed: int,
        accelerator: Any | None,
        chunk_size: int,
        progress: bool | str = True,
    ) -> Tensor:
        """Samples along ``schedule`` with ``method``'s solver, from this model as a
        :class:`~stepsearch.eval.sources.SampleSource`."""
        return generate_from_source(
            self.source(),
            self.solver_for(method),
            schedule,
            num_samples,
            seed=seed,
            chunk_size=chunk_size,
            accelerator=accelerator,
            progress=progress,
        )

    def sample_diffusers(
        self,
        scheduler: Any,
        num_steps: int,
        num_samples: int,
        seed: int,
        accelerator: Any | None,
        chunk_size: int,
        progress: bool | str = True,
    ) -> Tensor:
        """Samples of the plain diffusers loop with ``scheduler`` at ``num_steps`` steps (each
        chunk of a class-conditional model with its own labels and guidance)."""
        samples, _ = generate_with_diffusers_scheduler(
            None if self.conditional else self.model_fn,
            scheduler,
            num_steps,
            num_samples,
            self.sample_shape,
            seed=seed,
            chunk_size=chunk_size,
            device=self.device,
            accelerator=accelerator,
            progress=progress,
            conditioned=self.model_fn_for if self.conditional else None,
        )
        return samples

    def prompts_for(self, indices: Sequence[int]) -> None:
        """An image model has no prompts (a class-conditional one has :meth:`labels_for`)."""
        del indices

    def source(self) -> DenoiserSource | ClassConditionalSource:
        """This model as a :class:`~stepsearch.eval.sources.SampleSource`."""
        settings: dict[str, Any] = {
            "prediction_type": self.prediction_type,
            "sample_shape": list(self.sample_shape),
        }
        if self.num_classes is not None:
            return ClassConditionalSource(
                self.denoiser,
                self.noise,
                self.sample_shape,
                self.identity,
                num_classes=self.num_classes,
                guidance_scale=float(self.guidance_scale),
                features=self.feature_extractor,
                reference_data=self.reference_images,
                settings={**settings, "null_label": self.null_label},
                device=self.device,
            )
        return DenoiserSource(
            self.denoiser(),
            self.sample_shape,
            self.identity,
            features=self.feature_extractor,
            reference_data=self.reference_images,
            settings=settings,
            device=self.device,
        )


def _model_directory_files(spec: str) -> tuple[Path, Path]:
    """The UNet directory and the scheduler config file of a local diffusers model directory."""
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(
            f"model {spec!r}: expected a bundled model {sorted(_bundled())} or a local "
            "diffusers model directory"
        )
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    config_path = next(
        (
            p
            for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json")
            if p.is_file()
        ),
        None,
    )
    if config_path is None:
        raise FileNotFoundError(f"{spec}: no scheduler_config.json at its root or in scheduler/")
    return unet_dir, config_path


def _bundled() -> dict[str, Any]:
    from stepsearch.testbeds import digits

    return digits.MODELS


def model_noise(spec: str) -> NoiseSchedule:
    """The noise schedule of ``spec`` (a bundled model name or a local diffusers model directory,
    as for :func:`load_image_model`), read from its scheduler config: what a schedule file for
    that model must be made on."""
    if spec in _bundled():
        from stepsearch.testbeds import digits

        return digits.load(spec).noise
    _, config_path = _model_directory_files(spec)
    return DiscreteVP.from_diffusers_config(json.loads(config_path.read_text()))


def load_image_model(
    spec: str,
    device: str | torch.device = "cpu",
    inception_weights: str | None = None,
    guidance_scale: float | None = None,
) -> ImageModel:
    """A bundled model by name (:data:`stepsearch.testbeds.digits.MODELS`: ``digits``,
    ``digits-flow``, ``digits-cond``; FD-digits features, the real digits, the classifier), or a
    local diffusers directory holding an unconditional ``UNet2DModel`` (at its root or in
    ``unet/``) and a scheduler config (``scheduler_config.json`` at the root or in
    ``scheduler/``).

    ``digits-cond`` is class-conditional: sample ``i`` gets digit ``i mod 10``, guided with
    ``guidance_scale`` (default :data:`~stepsearch.testbeds.digits.GUIDANCE_SCALE`, 2); its
    reference images are the real digits ordered so that row ``j`` is a ``j mod 10`` (174 of each
    digit). ``guidance_scale`` for an unconditional model is a ``ValueError``."""
    device = torch.device(device)
    from stepsearch.testbeds import digits

    if spec in digits.MODELS:
        bundle = digits.load(spec, device=device)
        classifier = digits.load_classifier(device=device)
        conditional = digits.MODELS[spec].conditional
        if guidance_scale is not None and not conditional:
            raise ValueError(
                f"--guidance-scale: model {spec!r} is unconditional; guidance needs a "
                "class-conditional model (--model digits-cond)"
            )
        real = digits.real_images()
        return ImageModel(
            name=spec,
            unet=bundle.unet,
            scheduler_config=dict(bundle.scheduler_config),
            sample_shape=digits.IMAGE_SHAPE,
            feature_extractor=digits.DigitsFeatureExtractor(classifier),
            reference_images=real[digits.label_cycle_indices()] if conditional else real,
            device=device,
            noise_schedule=bundle.noise,
            prediction=bundle.prediction_type,
            num_classes=digits.NUM_CLASSES if conditional else None,
            null_label=digits.NULL_LABEL if conditional else None,
            guidance_scale=(
                (digits.GUIDANCE_SCALE if guidance_scale is None else float(guidance_scale))
                if conditional
                else 1.0
            ),
            classifier=classifier,
        )
    if guidance_scale is not None:
        raise ValueError(
            f"--guidance-scale: {spec} is an unconditional model directory; guidance needs a "
            "class-conditional model (--model digits-cond)"
        )
    from diffusers import UNet2DModel

    root = Path(spec)
    unet_dir, config_path = _model_directory_files(spec)
    unet = UNet2DModel.from_pretrained(unet_dir).to(device).eval().requires_grad_(False)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    extractor = None
    if inception_weights is not None:
        from stepsearch.eval.features import InceptionFeatures

        extractor = InceptionFeatures(inception_weights).to(device)
    return ImageModel(
        name=root.name,
        unet=unet,
        scheduler_config=json.loads(config_path.read_text()),
        sample_shape=(unet.config.in_channels, *size),
        feature_extractor=extractor,
        device=device,
    )


@dataclass(frozen=True)
class Method:
    """A sampler: a stepsearch solver on a schedule (a spacing name or a saved schedule, resampled
    log-linearly to other step counts), or a diffusers scheduler class with options."""

    label: str
    solver: str | None = None
    schedule: str | StepSchedule | None = None
    solver_options: dict[str, Any] = field(default_factory=dict)
    diffusers_scheduler: str | None = None
    diffusers_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def stepsearch(cls, solver: str, schedule: str | StepSchedule, **options: Any) -> Method:
        name = schedule if isinstance(schedule, str) else str(schedule.metadata.get("name", "file"))
        shown = ", ".join(f"{key}={value}" for key, value in options.items())
        label = f"stepsearch {solver}" + (f" ({shown})" if shown else "") + f" / {name}"
        return cls(label, solver=solver, schedule=schedule, solver_options=options)

    @classmethod
    def diffusers(cls, scheduler: str, label: str | None = None, **options: Any) -> Method:
        if label is None:
            spacing = options.get("timestep_spacing")
            label = f"diffusers {scheduler}" + (f" ({spacing})" if spacing else "")
        return cls(label, diffusers_scheduler=scheduler, diffusers_options=options)

    def schedule_for(self, model: ImageModel, num_steps: int) -> StepSchedule:
        """The method's ``num_steps``-step schedule on ``model``'s noise schedule."""
        return self.schedule_on(model.noise, num_steps)

    def schedule_on(self, noise: NoiseSchedule, num_steps: int) -> StepSchedule:
        """The method's ``num_steps``-step schedule on ``noise``: the spacing by name, or the saved
        schedule resampled log-linearly (:func:`~stepsearch.schedule.loglinear_interpolate`)."""
        if isinstance(self.schedule, StepSchedule):
            if self.schedule.noise != noise:
                raise ValueError(
                    f"{self.label}: the schedule file is for another noise schedule: it holds "
                    f"{self.schedule.noise!r}, the model needs {noise!r}. Write one for the model "
                    "with `stepsearch schedule save FILE --model digits` (or --model DIR for a "
                    "local model; --noise PRESET for the presets)"
                )
            if self.schedule.num_steps == num_steps:
                return self.schedule
            return loglinear_interpolate(self.schedule, num_steps)
        return make_schedule(noise, num_steps, str(self.schedule))

    def run(
        self,
        model: EvalModel,
        nfe: int,
        num_samples: int,
        seed: int,
        accelerator: Any | None = None,
        chunk_size: int = 250,
    ) -> tuple[Tensor, int] | None:
        """Samples of ``model`` (an :class:`ImageModel` or a text-to-image model) at exactly
        ``nfe`` model evaluations and the step count, or ``None`` if the method cannot spend
        exactly ``nfe``."""
        progress = f"{self.label} NFE {nfe}"
        if self.diffusers_scheduler is not None:
            found = self.diffusers_scheduler_for(model.scheduler_config, nfe)
            if found is None:
                return None
            scheduler, num_steps = found
            samples = model.sample_diffusers(
                scheduler, num_steps, num_samples, seed, accelerator, chunk_size, progress
            )
            return samples, num_steps
        noise = model.noise
        solver = model.solver_for(self)
        num_steps = steps_for_nfe(solver, lambda n: self.schedule_on(noise, n), nfe)
        if num_steps is None:
            return None
        schedule = self.schedule_on(noise, num_steps)
        samples = model.sample_schedule(
            self, schedule, num_samples, seed, accelerator, chunk_size, progress
        )
        return samples, num_steps

    def diffusers_scheduler_for(self, scheduler_config: Any, nfe: int) -> tuple[Any, int] | None:
        """This method's diffusers scheduler (``from_config`` plus its options) and the
        ``num_inference_steps`` at which it spends exactly ``nfe`` evaluations, or ``None``."""
        import diffusers

        scheduler_class = getattr(diffusers, str(self.diffusers_scheduler), None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise ValueError(f"diffusers has no scheduler class {self.diffusers_scheduler!r}")
        scheduler = scheduler_class.from_config(scheduler_config, **self.diffusers_options)
        for num_steps in range(1, nfe + 1):
            scheduler.set_timesteps(num_steps)
            if len(scheduler.timesteps) == nfe:
                return scheduler, num_steps
            if len(scheduler.timesteps) > nfe:
                break
        return None


def dpm_solver_3m_leading() -> Method:
    """diffusers' DPM-Solver++(3M) on ``leading`` spacing: the strongest diffusers built-in at 5-8
    NFE on the bundled DDPM (``benchmarks/report.py``)."""
    return Method.diffusers(
        "DPMSolverMultistepScheduler",
        "diffusers DPMSolverMultistepScheduler 3M (leading)",
        solver_order=3,
        timestep_spacing="leading",
    )


def default_methods() -> list[Method]:
    """The demo's line-up: diffusers' built-ins with their own default spacings (set explicitly:
    ``from_config`` of a DDPM config would otherwise carry ``leading`` into every class) vs
    stepsearch solvers on stepsearch spacings."""
    return [
        Method.diffusers(
            "DDIMScheduler",
            timestep_spacing="leading",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        ),
        Method.diffusers("DPMSolverMultistepScheduler", timestep_spacing="linspace"),
        dpm_solver_3m_leading(),
        Method.diffusers("UniPCMultistepScheduler", timestep_spacing="linspace"),
        Method.diffusers("EulerDiscreteScheduler", timestep_spacing="linspace"),
        Method.stepsearch("ddim", "trailing"),
        Method.stepsearch("dpm_solver_pp_2m", "trailing"),
        Method.stepsearch("unipc_bh2", "trailing"),
        Method.stepsearch("unipc_bh2", "logsnr_uniform"),
    ]


class EvalModel(Protocol):
    """What :func:`run_experiment` and :meth:`Method.run` need of a model: an
    :class:`ImageModel` (unconditional, sampled as a :class:`~stepsearch.eval.sources.SampleSource`)
    or a :class:`~stepsearch.eval.text_to_image.TextToImageModel` (a pipeline driven through the
    drop-in scheduler)."""

    name: str
    scheduler_config: dict[str, Any]

    @property
    def noise(self) -> NoiseSchedule: ...

    def solver_for(self, method: Method) -> Solver:
        """The solver that runs ``method`` on this model (it counts the NFE)."""
        ...

    def sample_schedule(
        self,
        method: Method,
        schedule: StepSchedule,
        num_samples: int,
        seed: int,
        accelerator: Any | None,
        chunk_size: int,
        progress: bool | str = True,
    ) -> Tensor:
        """Samples ``0 .. num_samples - 1`` along ``schedule`` with ``method``'s solver."""
        ...

    def sample_diffusers(
        self,
        scheduler: Any,
        num_steps: int,
        num_samples: int,
        seed: int,
        accelerator: Any | None,
        chunk_size: int,
        progress: bool | str = True,
    ) -> Tensor:
        """Samples with a diffusers ``scheduler`` at ``num_steps`` inference steps."""
        ...

    def prompts_for(self, indices: Sequence[int]) -> list[str] | None:
        """The prompt of each sample index, or ``None`` for an unconditional model."""
        ...


def reference_solution(
    model: EvalModel,
    num_samples: int,
    seed: int,
    accelerator: Any | None = None,
    chunk_size: int = 250,
    num_steps: int | None = None,
) -> Tensor:
    """Accurate solutions from the same per-index noise (and prompts): :data:`REFERENCE_SOLVER`,
    ``num_steps`` steps (default: its 100)."""
    solver, spacing, default_steps = REFERENCE_SOLVER
    method = Method.stepsearch(solver, spacing)
    schedule = make_schedule(model.noise, num_steps or default_steps, spacing)
    return model.sample_schedule(
        method,
        schedule,
        num_samples,
        seed,
        accelerator,
        chunk_size,
        progress=f"reference solution ({schedule.num_steps} steps)",
    )


def run_experiment(
    model: EvalModel,
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

    ``fid_reference`` (Inception features, see :class:`FeatureReference`) is needed for ``fid``,
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
    for method, nfe in tqdm(cells, desc="methods x NFE", disable=not _is_main(accelerator)):
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


# ----------------------------------------------------------------------------------------------
# Reference images and statistics for fd / fid / kid


@dataclass(frozen=True, eq=False)
class FeatureReference:
    """What ``fd`` / ``fid`` / ``kid`` compare samples with: a feature extractor, the reference
    statistics in its feature space and, when made from images, the reference features (KID needs
    them; an ``.npz`` holds only the mean and covariance)."""

    extractor: nn.Module
    statistics: FeatureStatistics
    features: np.ndarray | None = None
    source: str = ""

    @classmethod
    def from_images(
        cls,
        extractor: nn.Module,
        images: Tensor | Iterator[Tensor],
        *,
        batch_size: int = 250,
        progress: bool = False,
        source: str = "images",
    ) -> FeatureReference:
        """Features and statistics of ``images`` (a tensor or an iterable of batches)."""
        features = ensure_features(
            images, extractor, batch_size, progress, desc="reference features"
        )
        return cls(extractor, FeatureStatistics.from_features(features), features, source)

    @classmethod
    def load(
        cls,
        extractor: nn.Module,
        source: str | os.PathLike[str],
        *,
        batch_size: int = 250,
        progress: bool = True,
    ) -> FeatureReference:
        """From an ``.npz`` of statistics (:meth:`FeatureStatistics.save`, ``stepsearch stats``,
        clean-fid / EDM files) or from reference images (see :func:`iter_image_batches`).

        Raises:
            FileNotFoundError: ``source`` does not exist.
            ValueError: unreadable file, no images, or statistics of another feature dimension.
        """
        path = Path(source)
        if path.suffix == ".npz":
            statistics = FeatureStatistics.load(path)
            expected = getattr(extractor, "num_features", None)
            if expected is not None and statistics.num_features != int(expected):
                raise ValueError(
                    f"{path}: statistics of {statistics.num_features} features, but the feature "
                    f"extractor gives {int(expected)} (made with another extractor?)"
                )
            return cls(extractor, statistics, None, str(path))
        batches = iter_image_batches(path, batch_size, progress)
        return cls.from_images(extractor, batches, batch_size=batch_size, source=str(path))


def distance_scores(
    samples: Tensor, references: dict[str, FeatureReference]
) -> dict[str, tuple[float, float | None]]:
    """``{metric: (value, std)}`` for ``fd`` / ``fid`` (Fréchet distance to the reference
    statistics) and ``kid`` (KID x 1e3, mean and std over 50 subsets of up to 500 samples).
    Features are extracted once per extractor; non-finite samples are clamped first."""
    finite = samples.clamp(-1e4, 1e4).nan_to_num(0.0)
    features_by_extractor: dict[int, np.ndarray] = {}
    scores: dict[str, tuple[float, float | None]] = {}
    for metric, reference in references.items():
        key = id(reference.extractor)
        if key not in features_by_extractor:
            features_by_extractor[key] = ensure_features(
                finite, reference.extractor, progress=False
            )
        features = features_by_extractor[key]
        if metric == "kid":
            if reference.features is None:
                raise ValueError(
                    f"kid needs reference features, not only statistics ({reference.source})"
                )
            mean, std = kernel_inception_distance(
                features, reference.features, subsets=50, subset_size=min(500, len(samples))
            )
            scores[metric] = (mean * 1e3, std * 1e3)
        else:
            statistics = FeatureStatistics.from_features(features)
            scores[metric] = (frechet_distance(statistics, reference.statistics), None)
    return scores


class _Scorer:
    """Metric state computed once per experiment: reference features, the reference solution,
    the prompts of the samples."""

    def __init__(
        self,
        model: EvalModel,
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
    weight = next(classifier.parameters())
    x = samples.nan_to_num(0.0).clamp(-1.0, 1.0).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        predicted = classifier(x).argmax(dim=1).cpu()
    return (predicted == labels.cpu()).double().mean().item()


def _metric_references(
    model: EvalModel,
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
