"""The one contract solvers see: ``denoise(x, t) -> x0_hat``.

A :class:`Denoiser` is any callable ``(x, t) -> x0_hat`` with a ``noise`` attribute (its
:class:`~stepsearch.noise.NoiseSchedule`); ``t`` is a float (the whole batch at one time) or a 1-D
tensor with one time per sample. The noise estimate follows from ``x = alpha x0 + sigma eps``
(:func:`eps_from_x0`).

:class:`ModelDenoiser` wraps a network by its ``prediction_type`` (epsilon, v_prediction, sample,
flow), with classifier-free guidance under a weight or a guidance schedule on the noise level
(:class:`~stepsearch.guidance.GuidanceSchedule`) and guidance rescale (Lin et al. 2023, arXiv
2305.08891, eq. 15-16). Where the weight is 1 for the whole batch the unconditional branch is not
evaluated; :attr:`ModelDenoiser.passes` counts network passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from stepsearch.guidance import GuidanceSchedule
from stepsearch.noise import FlowMatching, NoiseSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""A network ``model(x, model_time) -> raw output``; ``model_time`` is a (B,) float tensor."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

PREDICTION_TYPE_ALIASES = {"flow_prediction": "flow"}
"""diffusers' names for prediction types that stepsearch spells differently."""


def prediction_type_name(prediction_type: str) -> str:
    """The stepsearch name of a prediction type (diffusers' ``flow_prediction`` is ``flow``);
    unknown names raise ``ValueError``."""
    name = PREDICTION_TYPE_ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        known = (*PREDICTION_TYPES, *PREDICTION_TYPE_ALIASES)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {known}")
    return name


@runtime_checkable
class Denoiser(Protocol):
    """``denoise(x, t) -> x0_hat`` on a noise schedule."""

    noise: NoiseSchedule

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor: ...


def per_sample(values: float | np.ndarray | Tensor, x: Tensor) -> float | Tensor:
    """A float (or a single value) stays a float; per-sample values become a tensor of ``x``'s
    dtype shaped ``(B, 1, ..., 1)``, cast on the CPU first (some devices have no float64)."""
    if isinstance(values, (float, int)) or np.size(values) == 1:
        return float(np.asarray(values, dtype=np.float64).reshape(-1)[0])
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float64).reshape(-1))
    if array.shape[0] != x.shape[0]:
        raise ValueError(f"got {array.shape[0]} times for a batch of {x.shape[0]}")
    tensor = torch.from_numpy(array).to(x.dtype).to(x.device)
    return tensor.reshape(-1, *([1] * (x.ndim - 1)))


def _times_array(t: float | Tensor) -> float | np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().cpu().double().numpy() if t.ndim else float(t)
    return float(t)


def eps_from_x0(noise: NoiseSchedule, x: Tensor, t: float | Tensor, x0: Tensor) -> Tensor:
    """The noise estimate implied by ``x0``: ``eps = (x - alpha x0) / sigma`` (``sigma > 0``)."""
    times = _times_array(t)
    alpha, sigma = per_sample(noise.alpha(times), x), per_sample(noise.sigma(times), x)
    return (x - alpha * x0) / sigma


def x0_from_model_output(
    noise: NoiseSchedule, x: Tensor, t: float | Tensor, output: Tensor, prediction_type: str
) -> Tensor:
    """Convert a raw network output to ``x0_hat``.

    ``epsilon``: ``(x - sigma eps) / alpha``; ``v_prediction`` (Salimans & Ho 2022,
    ``v = alpha eps - sigma x0``): ``(alpha x - sigma v) / (alpha^2 + sigma^2)``; ``sample``: the
    output itself; ``flow`` (``u = eps - x0`` for ``x = (1 - t) x0 + t eps``): ``x - t u``.
    """
    times = _times_array(t)
    alpha, sigma = per_sample(noise.alpha(times), x), per_sample(noise.sigma(times), x)
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return (alpha * x - sigma * output) / (alpha * alpha + sigma * sigma)
    if prediction_type == "sample":
        return output
    if prediction_type_name(prediction_type) == "flow":
        if not isinstance(noise, FlowMatching):
            raise ValueError("prediction_type 'flow' needs a FlowMatching noise schedule")
        return x - sigma * output
    raise AssertionError("unreachable")


def classifier_free_guidance(
    conditional: Tensor, unconditional: Tensor, weight: float | Tensor, rescale: float = 0.0
) -> Tensor:
    """``uncond + w (cond - uncond)``, then optionally rescaled towards the conditional output's
    standard deviation: ``phi * x_cfg std(cond)/std(x_cfg) + (1 - phi) x_cfg`` (Lin et al. 2023)."""
    guided = unconditional + weight * (conditional - unconditional)
    if rescale == 0.0:
        return guided
    if not 0.0 <= rescale <= 1.0:
        raise ValueError("guidance rescale must lie in [0, 1]")
    dims = list(range(1, guided.ndim))
    ratio = conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return rescale * guided * ratio + (1.0 - rescale) * guided


@dataclass
class ModelDenoiser:
    """Turn a network into a :class:`Denoiser`.

    Args:
        model: ``model(x, model_time) -> output``; ``model_time`` is ``noise.model_time(t)`` as a
            (B,) float32 tensor (diffusers' timestep for discrete VP, ``1000 t`` for flow, ...).
        noise: the noise schedule the network was trained on.
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``.
        unconditional: the unconditional branch for classifier-free guidance (optional).
        guidance: a weight, or a :class:`~stepsearch.guidance.GuidanceSchedule` evaluated at each
            sample's k-diffusion sigma (used only with ``unconditional``). Where every sample's
            weight is 1 the unconditional branch is skipped (one pass instead of two).
        guidance_rescale: ``phi`` of guidance rescale, 0 disables it.

    ``passes`` counts network passes (one per branch evaluated on a batch) since creation.
    """

    model: ModelFn
    noise: NoiseSchedule
    prediction_type: str = "epsilon"
    unconditional: ModelFn | None = None
    guidance: GuidanceSchedule | float = 1.0
    guidance_rescale: float = 0.0
    passes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.prediction_type = prediction_type_name(self.prediction_type)
        if self.prediction_type == "flow" and not isinstance(self.noise, FlowMatching):
            raise ValueError("prediction_type 'flow' needs a FlowMatching noise schedule")
        if not isinstance(self.guidance, GuidanceSchedule):
            self.guidance = float(self.guidance)

    def _model_time(self, x: Tensor, times: float | np.ndarray) -> Tensor:
        model_time = np.broadcast_to(np.asarray(self.noise.model_time(times)), (x.shape[0],))
        return torch.tensor(model_time, device=x.device, dtype=torch.float32)

    def weights(self, t: float | np.ndarray) -> float | np.ndarray:
        """The guidance weight at time(s) ``t`` (a schedule is read at k-diffusion sigma)."""
        if isinstance(self.guidance, GuidanceSchedule):
            return self.guidance.weight(self.noise.kdiffusion_sigma(t))
        return float(self.guidance)

    def raw_output(self, x: Tensor, t: float | Tensor) -> Tensor:
        """The (guided) network output before conversion to ``x0``."""
        times = _times_array(t)
        return self._guided(x, self._model_time(x, times), times)

    def network_output(self, x: Tensor, model_time: Tensor) -> Tensor:
        """The guided output at the network's own time input (diffusers' loop calls a model
        with its timestep): the same operations as :meth:`raw_output`."""
        times = _times_array(model_time.detach().cpu().double())
        return self._guided(x, model_time, self.noise.t_from_model_time(times))

    def _guided(self, x: Tensor, model_time: Tensor, times: float | np.ndarray) -> Tensor:
        output = self.model(x, model_time)
        self.passes += 1
        if self.unconditional is None:
            return output
        weights = self.weights(times)
        if np.all(np.asarray(weights) == 1.0):
            return output
        unconditional = self.unconditional(x, model_time)
        self.passes += 1
        weight = per_sample(weights, x)
        return classifier_free_guidance(output, unconditional, weight, self.guidance_rescale)

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        output = self.raw_output(x, t)
        return x0_from_model_output(self.noise, x, t, output.to(x.dtype), self.prediction_type)
