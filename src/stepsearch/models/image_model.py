"""Image models: the bundled digits models and local diffusers ``UNet2DModel`` directories
(loaded in one place, :mod:`stepsearch.models.loading`). An :class:`ImageModel` is a
:class:`~stepsearch.models.source.SampleSource` itself (stepsearch's solvers sample it through
``denoiser(indices)``) and runs diffusers' own loop (:meth:`ImageModel.sample_diffusers`).

Class-conditional models (``digits-cond``): sample ``i`` is conditioned on class label
``i mod num_classes`` (as a pipeline's sample ``i`` gets prompt ``i mod len(prompts)``), guided
with one classifier-free guidance scale ``w`` (``uncond + w (cond - uncond)`` on the network
output; ``w = 1`` is the conditional branch alone) or a guidance schedule on the noise level
(:class:`~stepsearch.guidance.GuidanceSchedule`, ``guidance_schedule``; steps at weight 1 skip the
unconditional pass), in stepsearch's solvers (through the source's ``denoiser(indices)``) and in
diffusers' loop (:meth:`ImageModel.model_fn_for`) alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from stepsearch.denoiser import ModelDenoiser, ModelFn
from stepsearch.guidance import GuidanceSchedule, guidance_settings
from stepsearch.models.batches import generate_with_diffusers_scheduler
from stepsearch.models.source import (
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

__all__ = ["ImageModel"]


@dataclass
class ImageModel:
    """An image diffusion model with what evaluation needs: unconditional, or class-conditional
    with classifier-free guidance (``num_classes`` set; module docstring). A
    :class:`~stepsearch.models.source.SampleSource`: ``features`` is ``feature_extractor``,
    ``reference_data`` is ``reference_images``, ``decode`` the identity, samples are float32.

    ``num_classes``: sample ``i`` gets label ``i mod num_classes`` (``class_labels`` of the UNet);
    ``null_label``: the label of the unconditional branch; ``guidance_scale``: ``w``;
    ``guidance_schedule``: a weight per noise level instead of ``w`` (when set, it is used);
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
    guidance_schedule: GuidanceSchedule | None = None

    def __post_init__(self) -> None:
        if self.num_classes is None:
            if self.guided:
                raise ValueError(
                    f"model {self.name!r} is unconditional: a guidance scale needs a "
                    "class-conditional model (digits-cond)"
                )
            return
        if self.null_label is None and self.guided:
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
    def guided(self) -> bool:
        """Whether any step evaluates the unconditional branch (a scale other than 1, or a
        guidance schedule)."""
        return self.guidance_schedule is not None or self.guidance_scale != 1.0

    @property
    def guidance(self) -> GuidanceSchedule | float:
        """The guidance schedule when one is set, else the scale."""
        if self.guidance_schedule is not None:
            return self.guidance_schedule
        return float(self.guidance_scale)

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
        return self._network(x, timestep)

    def _network(self, x: Tensor, timestep: Tensor, **conditioning: Any) -> Tensor:
        """The UNet in its own dtype (``--dtype``), its output cast back to ``x``'s: samples and
        solver maths keep their precision whatever the network runs in."""
        dtype = self.network_dtype
        return self.unet(x.to(dtype), timestep, **conditioning).sample.to(x.dtype)

    def _branch(self, labels: Tensor) -> ModelFn:
        """The UNet conditioned on ``labels`` (one per sample of the batch)."""

        def network(x: Tensor, timestep: Tensor) -> Tensor:
            if labels.shape[0] != x.shape[0]:
                raise ValueError(f"{labels.shape[0]} labels for a batch of {x.shape[0]}")
            return self._network(x, timestep, class_labels=labels.to(x.device))

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
        return self._guided_denoiser(labels).network_output

    def denoiser(self, indices: Sequence[int] | None = None) -> ModelDenoiser:
        """The ``x0`` denoiser (of the samples ``indices``, for a class-conditional model: their
        labels, classifier-free guided with :attr:`guidance`; ``w = 1`` evaluates the
        conditional branch alone)."""
        labels = None if indices is None else self.labels_for(indices)
        if not self.conditional:
            return self._unconditional_denoiser
        if labels is None:
            raise ValueError(f"{self.name} is class-conditional: pass the sample indices")
        return self._guided_denoiser(labels)

    def _guided_denoiser(self, labels: Tensor) -> ModelDenoiser:
        if not self.guided:
            return ModelDenoiser(self._branch(labels), self.noise, self.prediction_type)
        return ModelDenoiser(
            self._branch(labels),
            self.noise,
            self.prediction_type,
            unconditional=self._branch(self._null_labels(len(labels))),
            guidance=self.guidance,
        )

    @cached_property
    def _unconditional_denoiser(self) -> ModelDenoiser:
        return ModelDenoiser(self.model_fn, self.noise, self.prediction_type)

    @property
    def network_dtype(self) -> torch.dtype:
        """What the UNet runs in (its parameters' dtype; ``--dtype``)."""
        parameter = next(self.unet.parameters(), None)
        return torch.float32 if parameter is None else parameter.dtype

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
            self,
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

    # SampleSource ----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def features(self) -> torch.nn.Module | None:
        return self.feature_extractor

    @property
    def reference_data(self) -> Tensor | None:
        return self.reference_images

    def decode(self, x: Tensor) -> Tensor:
        return x

    def describe(self) -> dict[str, Any]:
        """Provenance settings (part of every cache key): prediction type and sample shape, the
        network's dtype unless float32; for a class-conditional model also the null label, the label rule and the guidance scale."""
        described: dict[str, Any] = {
            "sample_shape": list(self.sample_shape),
            "prediction_type": self.prediction_type,
        }
        if self.network_dtype != torch.float32:
            described["network_dtype"] = str(self.network_dtype).removeprefix("torch.")
        if self.num_classes is None:
            return described
        return {
            **described,
            "null_label": self.null_label,
            "kind": "class_conditional",
            "labels": f"index mod {self.num_classes}",
            "guidance_scale": float(self.guidance_scale),
            **guidance_settings(self.guidance_schedule),
        }
