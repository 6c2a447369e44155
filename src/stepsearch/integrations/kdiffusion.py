"""k-diffusion / ComfyUI adapters: run stepsearch solvers on k-diffusion denoisers, export sigmas.

k-diffusion (Karras et al. 2022, EDM) writes every model as a denoiser ``model(x, sigma) -> x0`` in
the variance-exploding space ``x = x0 + sigma n``; its samplers are
``sample_xxx(model, x, sigmas, extra_args=None, callback=None, disable=None)`` with ``sigmas`` a
decreasing tensor that usually ends in 0. That space is stepsearch's :class:`~stepsearch.noise.EDM`
noise schedule (``alpha = 1``, ``sigma = t``), so :class:`KDiffusionDenoiser` is a plain
:class:`~stepsearch.denoiser.Denoiser` there and every stepsearch solver runs on it unchanged.

For variance-preserving models the k-diffusion sigma is ``sigma_t / alpha_t = exp(-lambda_t)``;
:func:`to_kdiffusion_sigmas` / :func:`to_comfyui_sigmas` export a :class:`StepSchedule` on any
noise schedule in those units (the conversion itself lives in :mod:`stepsearch.schedule`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from stepsearch.noise import EDM
from stepsearch.sampling import StepRecord, sample
from stepsearch.schedule import StepSchedule
from stepsearch.solvers import get_solver


class KDiffusionModel(Protocol):
    """A k-diffusion denoiser: ``model(x, sigma, **extra_args) -> x0`` with ``sigma`` of shape
    ``(B,)``; optionally ``sigma_min`` / ``sigma_max`` attributes (k-diffusion's wrappers have
    them)."""

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args: Any) -> Tensor: ...


KDiffusionCallback = Callable[[dict[str, Any]], None]


def _attribute_float(model: Any, name: str) -> float | None:
    value = getattr(model, name, None)
    if value is None:
        return None
    return float(value.item() if isinstance(value, Tensor) else value)


class KDiffusionDenoiser:
    """A k-diffusion denoiser as a stepsearch :class:`~stepsearch.denoiser.Denoiser`.

    Args:
        model: ``model(x, sigma, **extra_args) -> x0`` in EDM space (``x = x0 + sigma n``).
        noise: the :class:`~stepsearch.noise.EDM` schedule the sigmas live on; by default
            ``EDM(model.sigma_min, model.sigma_max)`` when the model has those attributes, else
            EDM's defaults (0.002, 80).
        extra_args: keyword arguments passed to every model call (conditioning, ``cond_scale``).

    ``t`` is the sigma itself; the model gets it as a ``(B,)`` tensor in ``x``'s dtype.
    """

    def __init__(
        self,
        model: KDiffusionModel,
        noise: EDM | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ):
        if noise is None:
            low = _attribute_float(model, "sigma_min")
            high = _attribute_float(model, "sigma_max")
            noise = EDM() if low is None or high is None else EDM(low, high)
        if not isinstance(noise, EDM):
            raise TypeError(f"k-diffusion denoisers live on an EDM schedule, got {noise!r}")
        self.model = model
        self.noise = noise
        self.extra_args = dict(extra_args or {})

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        if isinstance(t, Tensor) and t.ndim > 0:
            sigma = t.to(device=x.device, dtype=x.dtype).reshape(-1)
        else:
            sigma = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        return self.model(x, sigma, **self.extra_args)


def _edm_covering(sigmas: np.ndarray, model: Any) -> EDM:
    """An EDM schedule whose ``[sigma_min, sigma_max]`` holds every nonzero sigma (and the
    model's own range when it declares one)."""
    noisy = sigmas[sigmas > 0]
    if noisy.size == 0:
        raise ValueError("sigmas hold no positive value")
    low, high = float(noisy.min()), float(noisy.max())
    model_low = _attribute_float(model, "sigma_min")
    model_high = _attribute_float(model, "sigma_max")
    if model_low is not None:
        low = min(low, model_low)
    if model_high is not None:
        high = max(high, model_high)
    if low >= high:
        low = high / 2.0
    return EDM(low, high)


def sample_kdiffusion(
    model: KDiffusionModel,
    x: Tensor,
    sigmas: Tensor | np.ndarray | list[float],
    solver: str = "euler",
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: KDiffusionCallback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    solver_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Sample like k-diffusion's ``sample_<name>(model, x, sigmas, extra_args, callback, disable)``
    with any stepsearch solver.

    ``x`` is the start at ``sigmas[0]`` (``sigmas[0] * randn`` as in k-diffusion), ``sigmas`` a
    strictly decreasing grid (usually ending in 0; repeated zeros are an error). ``callback``
    receives k-diffusion's dict ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` after each
    model evaluation (``i`` counts evaluations, so singlestep solvers and Heun report more than
    ``len(sigmas) - 1``). ``disable`` (progress bar) is accepted for signature compatibility.
    """
    del disable
    values = (
        sigmas.detach().cpu().double().numpy()
        if isinstance(sigmas, Tensor)
        else np.asarray(sigmas, dtype=np.float64)
    )
    noise = _edm_covering(values, model)
    schedule = StepSchedule.from_kdiffusion_sigmas(noise, values)
    denoiser = KDiffusionDenoiser(model, noise, extra_args)

    record_callback = None
    if callback is not None:

        def record_callback(record: StepRecord) -> None:
            callback(
                {
                    "x": record.x,
                    "i": record.index,
                    "sigma": record.t,
                    "sigma_hat": record.t,
                    "denoised": record.denoised,
                }
            )

    solver_instance = get_solver(solver, **dict(solver_kwargs or {}))
    return sample(denoiser, x, schedule, solver_instance, record_callback, generator).sample


def kdiffusion_sampler(solver: str, **solver_kwargs: Any) -> Callable[..., Tensor]:
    """A function with k-diffusion's sampler signature ``(model, x, sigmas, extra_args=None,
    callback=None, disable=None)`` running ``solver`` (for code that takes a sampler function,
    e.g. ComfyUI's ``KSAMPLER``)."""
    get_solver(solver, **solver_kwargs)  # fail early on bad names / options

    def sampler(
        model: KDiffusionModel,
        x: Tensor,
        sigmas: Tensor,
        extra_args: Mapping[str, Any] | None = None,
        callback: KDiffusionCallback | None = None,
        disable: bool | None = None,
    ) -> Tensor:
        return sample_kdiffusion(
            model,
            x,
            sigmas,
            solver,
            extra_args=extra_args,
            callback=callback,
            disable=disable,
            solver_kwargs=solver_kwargs,
        )

    sampler.__name__ = f"sample_stepsearch_{solver}"
    return sampler


def to_kdiffusion_sigmas(
    schedule: StepSchedule,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """k-diffusion sigmas ``sigma / alpha`` of ``schedule`` as a tensor (0 at a clean end);
    see :meth:`StepSchedule.to_kdiffusion_sigmas`."""
    return torch.tensor(schedule.to_kdiffusion_sigmas(), dtype=dtype, device=device)


def to_comfyui_sigmas(schedule: StepSchedule) -> Tensor:
    """ComfyUI ``SIGMAS`` (float32, descending, ending in 0); see
    :meth:`StepSchedule.to_comfyui_sigmas`."""
    return schedule.to_comfyui_sigmas()
