"""Sample sources: the one thing evaluation, the objective and every search draw samples from.

A :class:`SampleSource` is a model seen as the searches need it:

- ``noise``: its :class:`~stepsearch.noise.NoiseSchedule` (every schedule and plan lives on it);
- ``denoiser(indices)``: a :class:`~stepsearch.denoiser.Denoiser` ``(x, t) -> x0`` for the batch of
  sample indices ``indices`` (an unconditional model ignores them; a conditional one uses each index's
  prompt or class label, with its guidance), so a search can call the model directly;
- ``sample_shape`` of one sample in the space the solver integrates (pixels or latents), and
  ``decode`` from that space to what metrics see (identity, or a VAE decode);
- ``identity``: a :class:`ModelIdentity` (a hash of the weights) that keys caches and provenance;
- ``conditional`` (not part of the protocol; ``False`` when absent): whether samples are conditioned
  on their index (class labels, prompts);
- optionally ``features`` (a feature network for Fréchet / kernel distances in the model's own
  domain) and ``reference_data`` (real samples: FD reference, Align Your Steps' data).

Common random numbers: sample ``i`` under ``seed`` always starts from the unit noise of
:func:`~stepsearch.models.batches.sample_generator` ``(seed, i)``, scaled to the schedule's first
time (:func:`~stepsearch.sampling.initial_noise_scale`), whatever the batch, the process count or the
candidate. :func:`generate_from_source` is the one loop over chunks of indices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from stepsearch.cache import tensor_digest
from stepsearch.denoiser import Denoiser
from stepsearch.models.batches import generate_chunks, sample_generator, unit_noise
from stepsearch.noise import NoiseSchedule
from stepsearch.sampling import StepRecord, initial_noise_scale, sample
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import Solver

__all__ = [
    "ClassConditionalSource",
    "DenoiserSource",
    "ModelIdentity",
    "SampleSource",
    "generate",
    "generate_from_source",
    "initial_noise_for",
    "module_digest",
]


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a result belongs to: a display ``name`` and a ``digest`` that changes whenever
    the weights do (``sha256:<hex>`` of the state dict, or ``hub:<id>@<revision>``)."""

    name: str
    digest: str

    def to_json_dict(self) -> dict[str, str]:
        return {"name": self.name, "digest": self.digest}

    def cache_json(self) -> dict[str, str]:
        """The part of the identity that keys caches: the weights digest alone. The name is for
        display (a directory's name for a local model), so a copy of the same weights in another
        directory, or the bundled model loaded by name, finds the same teacher entries."""
        return {"digest": self.digest}

    @classmethod
    def from_json_dict(cls, payload: Mapping[str, Any]) -> ModelIdentity:
        if not isinstance(payload, Mapping) or not {"name", "digest"} <= set(payload):
            raise ValueError(f"a model identity needs 'name' and 'digest', got {payload!r}")
        return cls(str(payload["name"]), str(payload["digest"]))

    def __str__(self) -> str:
        return f"{self.name} ({self.digest[:19]})"


def module_digest(module: nn.Module) -> str:
    """``sha256:<hex>`` of a module's state dict (names, dtypes, shapes, bytes)."""
    return "sha256:" + tensor_digest(dict(module.state_dict()))


def array_digest(*arrays: np.ndarray | Tensor) -> str:
    """``sha256:<hex>`` of a few arrays (for models given as parameters, e.g. test beds)."""
    tensors = {str(k): torch.as_tensor(np.asarray(a)) for k, a in enumerate(arrays)}
    return "sha256:" + tensor_digest(tensors)


@runtime_checkable
class SampleSource(Protocol):
    """A model as evaluation and search see it (module docstring)."""

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def noise(self) -> NoiseSchedule: ...

    @property
    def sample_shape(self) -> tuple[int, ...]: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype samples are made in (float32 for networks, float64 for test beds)."""
        ...

    def denoiser(self, indices: Sequence[int]) -> Denoiser:
        """The denoiser for the samples ``indices`` (their conditioning, if any)."""
        ...

    def decode(self, x: Tensor) -> Tensor:
        """Samples in the solver's space -> what metrics compare (images, data)."""
        ...

    @property
    def features(self) -> nn.Module | None:
        """A feature network for ``fd`` / ``kid`` in the model's own domain, or ``None``."""
        ...

    @property
    def reference_data(self) -> Tensor | None:
        """Real data (decoded space), or ``None``."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable settings for provenance (prediction type, guidance, resolution, ...)."""
        ...


@dataclass(eq=False)
class DenoiserSource:
    """A source from one unconditional :class:`~stepsearch.denoiser.Denoiser` (the bundled
    digits model, a local ``UNet2DModel``, a Gaussian-mixture test bed).

    Args:
        model: the denoiser; its ``noise`` attribute is the noise schedule.
        sample_shape: shape of one sample.
        identity: the model's identity (see :func:`module_digest`, :func:`array_digest`).
        features: optional feature network for ``fd`` / ``kid``.
        reference_data: optional real data for ``fd`` references and data-driven searches.
        settings: provenance extras (``prediction_type``, ...).
        device: where samples are made.
        dtype: the dtype samples are made in.
    """

    model: Denoiser
    sample_shape: tuple[int, ...]
    identity: ModelIdentity
    features: nn.Module | None = None
    reference_data: Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.sample_shape = tuple(int(s) for s in self.sample_shape)
        self.device = torch.device(self.device)

    @property
    def noise(self) -> NoiseSchedule:
        return self.model.noise

    @property
    def conditional(self) -> bool:
        """An unconditional model: every sample shares one denoiser."""
        return False

    def denoiser(self, indices: Sequence[int]) -> Denoiser:
        del indices
        return self.model

    def decode(self, x: Tensor) -> Tensor:
        return x

    def describe(self) -> dict[str, Any]:
        return {"sample_shape": list(self.sample_shape), **self.settings}

    @classmethod
    def of_mixture(
        cls, mixture: Any, name: str = "gaussian-mixture", num_reference: int = 4096, seed: int = 0
    ) -> DenoiserSource:
        """A float64 source from a :class:`~stepsearch.testbeds.gaussian_mixture.GaussianMixture`:
        identity from its parameters, ``num_reference`` exact data samples as reference data and
        the identity map as feature network (so ``fd`` is the exact-data Fréchet distance)."""
        generator = torch.Generator().manual_seed(seed)
        identity = ModelIdentity(
            name, array_digest(mixture.weights, mixture.means, mixture.covariances)
        )
        return cls(
            mixture,
            mixture.shape,
            identity,
            features=_Flatten(),
            reference_data=mixture.sample(num_reference, generator=generator),
            settings={"kind": "gaussian_mixture", "num_components": mixture.num_components},
            dtype=torch.float64,
        )


@dataclass(eq=False)
class ClassConditionalSource:
    """A class-conditional model with classifier-free guidance as a source (``digits-cond``):
    sample ``i`` is conditioned on class label ``i mod num_classes``, as a pipeline's sample ``i``
    gets prompt ``i mod len(prompts)``; the conditioning is a function of the index alone, so
    common random numbers hold for labels as for noise.

    Args:
        conditioned: ``conditioned(indices)`` -> the (guided) denoiser of those samples.
        noise: the noise schedule.
        sample_shape, identity, features, device, dtype: as for :class:`DenoiserSource`.
        reference_data: real data, row ``j`` of label ``j mod num_classes`` (so data-driven
            searches, Align Your Steps' KL bound, see each row under its own label).
        num_classes: labels cycle through ``0 .. num_classes - 1``.
        guidance_scale: the classifier-free guidance weight ``w`` of ``uncond + w (cond -
            uncond)`` (``w = 1``: the conditional branch alone); part of :meth:`describe`, so of
            every cache key and provenance.
        settings: provenance extras (``prediction_type``, the null label, ...).
    """

    conditioned: Callable[[Sequence[int]], Denoiser]
    noise: NoiseSchedule
    sample_shape: tuple[int, ...]
    identity: ModelIdentity
    num_classes: int
    guidance_scale: float
    features: nn.Module | None = None
    reference_data: Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.sample_shape = tuple(int(s) for s in self.sample_shape)
        self.device = torch.device(self.device)

    @property
    def conditional(self) -> bool:
        """Sample ``i`` is conditioned on label ``i mod num_classes``."""
        return True

    def labels_for(self, indices: Sequence[int]) -> list[int]:
        """The class label of each sample index: ``i mod num_classes``."""
        return [int(i) % self.num_classes for i in indices]

    def denoiser(self, indices: Sequence[int]) -> Denoiser:
        return self.conditioned(indices)

    def decode(self, x: Tensor) -> Tensor:
        return x

    def describe(self) -> dict[str, Any]:
        return {
            "sample_shape": list(self.sample_shape),
            **self.settings,
            "kind": "class_conditional",
            "labels": f"index mod {self.num_classes}",
            "guidance_scale": float(self.guidance_scale),
        }


class _Flatten(nn.Module):
    """Identity features: each sample flattened, float64 (``num_features`` unknown up front)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).double()


def initial_noise_for(
    source: SampleSource,
    indices: Sequence[int],
    seed: int,
    schedule: StepSchedule,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``x_T`` of the samples ``indices``: their unit noise times the schedule's starting scale."""
    scale = initial_noise_scale(schedule)
    dtype = dtype or source.dtype
    return scale * unit_noise(indices, source.sample_shape, seed, dtype).to(source.device)


def generate_from_source(
    source: SampleSource,
    solver: Solver,
    schedule: Any,
    num_samples: int,
    *,
    seed: int = 0,
    chunk_size: int = 250,
    dtype: torch.dtype | None = None,
    accelerator: Any | None = None,
    progress: bool | str = False,
    decode: bool = True,
    on_step: Callable[[range, StepRecord], None] | None = None,
) -> Tensor:
    """Samples ``0 .. num_samples - 1`` of ``source`` along ``schedule`` (a StepSchedule, or
    whatever ``solver.init`` accepts) with ``solver``, decoded unless ``decode=False``.

    ``on_step(indices, record)`` sees every model evaluation of every chunk (teacher recording).
    Stochastic solvers draw their step noise from ``sample_generator(seed + 1, first index)``.
    """
    times = getattr(schedule, "schedule", schedule)  # a plan carries its StepSchedule

    def make_chunk(indices: range) -> Tensor:
        x_T = initial_noise_for(source, indices, seed, times, dtype)
        generator = (
            sample_generator(seed + 1, indices.start, source.device) if solver.stochastic else None
        )
        callback = None if on_step is None else (lambda record: on_step(indices, record))
        with torch.inference_mode():
            result = sample(
                source.denoiser(indices),
                x_T,
                schedule,
                solver,
                callback=callback,
                generator=generator,
            )
            return source.decode(result.sample) if decode else result.sample

    return generate_chunks(make_chunk, num_samples, chunk_size, accelerator, progress)


def digest_text(text: str) -> str:
    """``sha256:<hex>`` of a string (hub ids, prompt lists)."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def generate(
    denoiser: Denoiser,
    schedule: StepSchedule,
    solver: Solver,
    num_samples: int,
    sample_shape: Sequence[int],
    *,
    seed: int = 0,
    chunk_size: int = 250,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    accelerator: Any | None = None,
    progress: bool | str = True,
) -> Tensor:
    """``num_samples`` samples of ``sample_shape`` along ``schedule`` with ``solver``.

    Initial noise follows :func:`stepsearch.sampling.initial_noise`'s scaling with per-index
    generators. Deterministic solvers give results independent of ``chunk_size`` up to float
    reduction order; stochastic ones draw step noise from a per-chunk generator.
    """
    source = DenoiserSource(
        denoiser, tuple(sample_shape), ModelIdentity("anonymous", "unhashed"), device=device
    )
    return generate_from_source(
        source,
        solver,
        schedule,
        num_samples,
        seed=seed,
        chunk_size=chunk_size,
        dtype=dtype,
        accelerator=accelerator,
        progress=progress,
    )
