"""OLSS as a diffusers drop-in scheduler, and the recording scheduler that feeds its fit.

:class:`StepsearchOLSSScheduler` runs fitted OLSS coefficients (:mod:`stepsearch.solvers.olss`)
inside any diffusers pipeline. Unlike the official OLSS scheduler, whose fitted state lives in
Python objects that cannot be saved (diffusers issue 7802), everything it needs is in its config:
the fitted times (``custom_times``), the coefficients and their basis (``olss_coefficients``,
exact float64 JSON) and the fit's provenance (``olss_provenance``: model identity, guidance scale,
NFE, noise schedule, scores), so ``save_pretrained`` / ``from_pretrained`` round-trip it exactly::

    scheduler = StepsearchOLSSScheduler.from_fit(fit, pipe.scheduler.config, provenance=...)
    pipe.scheduler = scheduler
    image = pipe(prompt, num_inference_steps=scheduler.num_fitted_steps).images[0]

It runs only what it was fitted for: ``set_timesteps`` with another step count, or with
``timesteps=`` / ``sigmas=`` other than the fitted ones, raises ``ValueError``; img2img starts
(``set_begin_index`` > 0) are refused, since the coefficients combine the initial noise ``x_T``.

:class:`RecordingScheduler` is the drop-in scheduler of any stepsearch solver that also hands each
pipeline call's trajectory (the samples it was stepped with, the *guided* model output's ``x0``
estimate, the final sample) to ``on_trajectory``: the teacher recorder of text-to-image OLSS.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from numpy.typing import ArrayLike

from stepsearch.integrations.diffusers import (
    StepsearchScheduler,
    StepsearchSchedulerOutput,
    _checked_custom_times,
)
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.olss import OLSSCoefficients, OLSSSolver

__all__ = ["RecordingScheduler", "RolloutFitScheduler", "StepsearchOLSSScheduler"]

_MATCH_RTOL = 1e-5
"""Relative tolerance for ``sigmas`` that name the fitted schedule (float32 lists)."""
_TIMESTEP_TOLERANCE = 1e-3
"""Largest difference, in train-step units, of ``timesteps`` that name the fitted schedule."""


class RecordingScheduler(StepsearchScheduler):
    """A :class:`StepsearchScheduler` (``solver`` from the config) that records each run and
    calls ``on_trajectory(x (K + 1, B, ...), denoised (K, B, ...))`` at its end (float32, CPU)."""

    on_trajectory: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    def set_schedule(self, schedule: StepSchedule, device: Any = None) -> None:
        super().set_schedule(schedule, device=device)
        self._recorded: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        output = super().step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        xs, denoised = self._recorded
        xs.append(sample.detach().to("cpu", torch.float32, copy=True))
        denoised.append(output.pred_original_sample.detach().to("cpu", torch.float32, copy=True))
        if self.step_index == len(self.timesteps):
            xs.append(output.prev_sample.detach().to("cpu", torch.float32, copy=True))
            if self.on_trajectory is not None:
                self.on_trajectory(torch.stack(xs), torch.stack(denoised))
            self._recorded = ([], [])
        return output if return_dict else (output.prev_sample, output.pred_original_sample)


class RolloutFitScheduler(StepsearchScheduler):
    """Fits OLSS along its own points inside a pipeline call: ``fitter`` (a
    :class:`~stepsearch.olss.fit.RolloutFitter`) turns each step's sample and guided ``x0``
    estimate into the next sample. The call must hold every sample the fit pools (one batch)."""

    fitter: Any = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if self.fitter is None:
            raise RuntimeError("set `fitter` before running the pipeline")
        i = self._step_index or 0
        if not self._matches(self._timestep_value(timestep), i):
            raise ValueError(f"timestep {timestep!r} is not step {i} of the fitted path")
        c_x, c_out = self._coefficients[i]
        denoised = sample.double() * c_x + model_output.double() * c_out
        x_next = self.fitter.advance(sample, denoised)
        self._step_index = i + 1
        if kwargs.get("return_dict", True):
            return StepsearchSchedulerOutput(
                prev_sample=x_next, pred_original_sample=denoised.to(sample.dtype)
            )
        return (x_next, denoised.to(sample.dtype))


def _with_base_parameters(init: Callable[..., None]) -> Callable[..., None]:
    """Give ``init`` the signature ``(self, <its own keyword arguments>, <the base's>, **kwargs)``.

    diffusers reads the config keys a class accepts off its ``__init__`` signature
    (``ConfigMixin.extract_init_dict``, ``register_to_config``); spelling the base's keys out here
    would copy them, so the signature is derived from the base's instead."""
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is p.KEYWORD_ONLY]
    base = inspect.signature(StepsearchScheduler.__init__)
    parameters = list(base.parameters.values())
    named = [p for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    rest = [p for p in parameters if p.kind is p.VAR_KEYWORD]
    init.__signature__ = base.replace(parameters=[*named, *own, *rest])  # type: ignore[attr-defined]
    return init


class StepsearchOLSSScheduler(StepsearchScheduler):
    """Fitted OLSS coefficients as a drop-in scheduler (module docstring).

    Args:
        olss_coefficients: :meth:`OLSSCoefficients.to_json_dict` of the fit (its times become
            ``custom_times``).
        olss_provenance: JSON provenance of the fit (model identity, guidance scale, NFE, noise,
            objective scores, ...).
        kwargs: the keys of :class:`StepsearchScheduler` (noise schedule, prediction type).
    """

    _default_solver = "ddim"  # built by the base and replaced by the OLSS solver

    @register_to_config
    @_with_base_parameters
    def __init__(
        self,
        *,
        olss_coefficients: dict[str, Any] | None = None,
        olss_provenance: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if olss_coefficients is None:
            raise ValueError(
                "StepsearchOLSSScheduler needs fitted coefficients: use "
                "StepsearchOLSSScheduler.from_fit(...) or from_pretrained of a saved one"
            )
        fitted = OLSSCoefficients.from_json_dict(olss_coefficients)
        given = kwargs.get("custom_times")
        given = None if given is None else _checked_custom_times(given)
        fitted_times = fitted.schedule.times.tolist()
        if given is not None and (
            len(given) != len(fitted_times)
            or not np.allclose(np.asarray(given, dtype=np.float64), fitted_times, rtol=1e-12, atol=0)
        ):
            raise ValueError(
                f"custom_times {given!r:.120} disagree with the times olss_coefficients were "
                f"fitted for ({fitted_times}); an OLSS scheduler runs only its fitted times "
                "(edit neither by hand: refit instead)"
            )
        kwargs.update(solver=None, solver_kwargs=None, custom_times=fitted_times)
        super().__init__(**kwargs)
        noise, times = self.noise, fitted.schedule.times
        if not np.allclose(noise.alpha(times), fitted.schedule.noise.alpha(times), rtol=1e-9):
            raise ValueError(
                "the OLSS coefficients were fitted on another noise schedule than this config's "
                f"({fitted.schedule.noise!r} vs {noise!r})"
            )
        schedule = StepSchedule(times, noise, fitted.schedule.metadata)
        self._solver = OLSSSolver(
            OLSSCoefficients(schedule, fitted.coefficients, fitted.basis, fitted.metadata)
        )
        self.register_to_config(solver="olss", solver_kwargs={})

    @classmethod
    def from_fit(
        cls,
        coefficients: OLSSCoefficients | Any,
        base_config: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> StepsearchOLSSScheduler:
        """A scheduler running ``coefficients`` (or an :class:`~stepsearch.olss.fit.OLSSFit`) on
        the noise schedule they were fitted on; ``base_config`` (the pipeline scheduler's config)
        supplies the other keys (``prediction_type``, ...)."""
        if not isinstance(coefficients, OLSSCoefficients):  # an OLSSFit
            coefficients = coefficients.coefficients
        keys = {
            "olss_coefficients": coefficients.to_json_dict(),
            "olss_provenance": dict(provenance or {}),
        }
        config = dict(base_config or {})
        if "prediction_type" in config:
            keys["prediction_type"] = config["prediction_type"]
        return cls.from_step_schedule(coefficients.schedule, **keys)

    @property
    def num_fitted_steps(self) -> int:
        return self._solver.schedule.num_steps

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.config.olss_provenance or {})

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: ArrayLike | torch.Tensor | None = None,
        sigmas: ArrayLike | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Use the fitted schedule. ``num_inference_steps`` must be the fitted step count;
        ``timesteps`` / ``sigmas`` are accepted only when they name the fitted schedule."""
        fitted = self._solver.schedule
        if mu is not None:
            raise ValueError("OLSS runs the schedule it was fitted on; `mu` cannot shift it")
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass only one of `timesteps` or `sigmas`")
        if num_inference_steps is not None and int(num_inference_steps) != fitted.num_steps:
            raise ValueError(
                f"these OLSS coefficients were fitted for {fitted.num_steps} steps, not "
                f"{num_inference_steps}; fit OLSS for that step count (stepsearch search olss --nfe "
                f"{num_inference_steps})"
            )
        if timesteps is not None or sigmas is not None:
            what = "timesteps" if timesteps is not None else "sigmas"
            if not self._names_fitted(timesteps, sigmas):
                shown = np.round(np.asarray(fitted.noise.model_time(fitted.times[:-1])), 3)
                raise ValueError(
                    f"OLSS cannot honour these {what}: its coefficients were fitted for the "
                    f"{fitted.num_steps}-step schedule with timesteps {shown.tolist()}"
                )
        self.set_schedule(fitted, device=device)

    def _names_fitted(
        self, timesteps: ArrayLike | torch.Tensor | None, sigmas: ArrayLike | torch.Tensor | None
    ) -> bool:
        """Whether ``timesteps`` (the evaluations, diffusers units) or ``sigmas`` (this
        scheduler's ``sigmas``, with or without the final entry) are the fitted schedule's."""
        fitted = self._solver.schedule
        if timesteps is not None:
            given = self._as_float_array(timesteps)
            expected = np.asarray(self.noise.model_time(fitted.times[:-1]))
            return given.shape == expected.shape and bool(
                np.allclose(given, expected, rtol=0, atol=_TIMESTEP_TOLERANCE)
            )
        given = self._as_float_array(sigmas)
        expected = self._pipeline_sigmas(fitted)
        if given.size == expected.size - 1:
            expected = expected[:-1]
        return given.shape == expected.shape and bool(
            np.allclose(given, expected, rtol=_MATCH_RTOL, atol=1e-9)
        )

    def _step_starts(self) -> dict[int, int]:
        """Runs start at the first evaluation only (the coefficients combine ``x_T``)."""
        return {0: 0}
