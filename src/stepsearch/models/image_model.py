"""Image models: the bundled digits models and local diffusers ``UNet2DModel`` directories, loaded
in one place (:func:`load_image_model`), sampled by stepsearch solvers (through their
:class:`~stepsearch.models.source.SampleSource`) and in diffusers' own loop alike.

Class-conditional models (``digits-cond``): sample ``i`` is conditioned on class label
``i mod num_classes`` (as a pipeline's sample ``i`` gets prompt ``i mod len(prompts)``), guided
with one classifier-free guidance scale ``w`` (``uncond + w (cond - uncond)`` on the network
output; ``w = 1`` is the conditional branch alone), in stepsearch's solvers (through the source's
``denoiser(indices)``) and in diffusers' loop (:meth:`ImageModel.model_fn_for`) alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from stepsearch.denoiser import ModelDenoiser, ModelFn, classifier_free_guidance
from stepsearch.models.batches import generate_with_diffusers_scheduler
from stepsearch.models.source import (
    ClassConditionalSource,
    DenoiserSource,
    ModelIdentity,
    generate_from_source,
    module_digest,
)
from stepsearch.noise import DiscreteVP, NoiseSchedule
from stepsearch.schedule import StepSchedule
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

if TYPE_CHECKING:
    from stepsearch.models.method import Method

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
        :class:`~stepsearch.models.source.SampleSource`."""
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
        """This model as a :class:`~stepsearch.models.source.SampleSource`."""
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


def load_source(
    spec: str, device: str | torch.device = "cpu", guidance_scale: float | None = None
) -> DenoiserSource | ClassConditionalSource:
    """The source of a model spec: a bundled model (``digits``, ``digits-flow``, ``digits-cond``
    with its ``guidance_scale``) or a local diffusers ``UNet2DModel`` directory (see
    :func:`~stepsearch.eval.experiment.load_image_model`)."""
    return load_image_model(spec, device=device, guidance_scale=guidance_scale).source()
