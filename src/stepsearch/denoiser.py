"""The one contract solvers see: ``denoise(x, t) -> x0_hat``.

A :class:`Denoiser` is any callable ``(x, t) -> x0_hat`` with a ``noise`` attribute (its
:class:`~stepsearch.noise.NoiseSchedule`); ``t`` is a float (the whole batch at one time) or a 1-D
tensor with one time per sample. The noise estimate follows from ``x = alpha x0 + sigma eps``
(:func:`eps_from_x0`).

:class:`ModelDenoiser` wraps a network by its ``prediction_type`` (epsilon, v_prediction, sample,
flow), with classifier-free guidance under a guidance-weight schedule (Wang et al. 2024,
arXiv 2404.13040) and guidance rescale (Lin et al. 2023, arXiv 2305.08891, eq. 15-16).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

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


@dataclass(frozen=True)
class GuidanceSchedule:
    """A classifier-free guidance weight as a function of noise level.

    ``u = t / t_max`` runs from 1 (pure noise) to 0 (clean). With ``w = scale``:

    - ``constant``: ``w``;
    - ``linear``: ``1 + 2 (w - 1)(1 - u)`` (increasing towards clean data, mean ``w``);
    - ``cosine``: ``1 + (w - 1)(1 + cos(pi u))`` (increasing, mean ``w``);
    - ``clamp_linear``: ``max(minimum, linear(u))``;
    - ``interval``: ``w`` for ``u`` in ``interval``, 1 (no guidance) elsewhere
      (Kynkäänniemi et al. 2024).

    Weights follow diffusers' convention: ``x = uncond + w (cond - uncond)``, ``w = 1`` is no guidance.
    """

    scale: float
    shape: str = "constant"
    minimum: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.shape not in ("constant", "linear", "cosine", "clamp_linear", "interval"):
            raise ValueError(f"unknown guidance shape {self.shape!r}")
        if not math.isfinite(self.scale):
            raise ValueError("guidance scale must be finite")
        low, high = self.interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError("interval must satisfy 0 <= low <= high <= 1 (fractions of t_max)")

    def __call__(self, u: float | np.ndarray) -> float | np.ndarray:
        u = np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0)
        w = self.scale
        if self.shape == "constant":
            weight = np.full_like(u, w)
        elif self.shape == "linear":
            weight = 1.0 + 2.0 * (w - 1.0) * (1.0 - u)
        elif self.shape == "cosine":
            weight = 1.0 + (w - 1.0) * (1.0 + np.cos(np.pi * u))
        elif self.shape == "clamp_linear":
            weight = np.maximum(self.minimum, 1.0 + 2.0 * (w - 1.0) * (1.0 - u))
        else:
            low, high = self.interval
            weight = np.where((u >= low) & (u <= high), w, 1.0)
        return float(weight) if weight.ndim == 0 else weight


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
        guidance: a weight or a :class:`GuidanceSchedule` (used only with ``unconditional``).
        guidance_rescale: ``phi`` of guidance rescale, 0 disables it.
    """

    model: ModelFn
    noise: NoiseSchedule
    prediction_type: str = "epsilon"
    unconditional: ModelFn | None = None
    guidance: GuidanceSchedule | float = 1.0
    guidance_rescale: float = 0.0

    def __post_init__(self) -> None:
        self.prediction_type = prediction_type_name(self.prediction_type)
        if self.prediction_type == "flow" and not isinstance(self.noise, FlowMatching):
            raise ValueError("prediction_type 'flow' needs a FlowMatching noise schedule")

    def _model_time(self, x: Tensor, times: float | np.ndarray) -> Tensor:
        model_time = np.broadcast_to(np.asarray(self.noise.model_time(times)), (x.shape[0],))
        return torch.tensor(model_time, device=x.device, dtype=torch.float32)

    def raw_output(self, x: Tensor, t: float | Tensor) -> Tensor:
        """The (guided) network output before conversion to ``x0``."""
        times = _times_array(t)
        model_time = self._model_time(x, times)
        output = self.model(x, model_time)
        if self.unconditional is None:
            return output
        unconditional = self.unconditional(x, model_time)
        if isinstance(self.guidance, GuidanceSchedule):
            weight = per_sample(self.guidance(np.asarray(times) / self.noise.t_max), x)
        else:
            weight = float(self.guidance)
        return classifier_free_guidance(output, unconditional, weight, self.guidance_rescale)

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        output = self.raw_output(x, t)
        return x0_from_model_output(self.noise, x, t, output.to(x.dtype), self.prediction_type)
