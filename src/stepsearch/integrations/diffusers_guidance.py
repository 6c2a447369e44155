"""A guidance schedule inside an unmodified diffusers pipeline: a ready ``callback_on_step_end``.

diffusers' text-to-image pipelines (Stable Diffusion 1.x / 2.x, SDXL, SD3, ...) guide with one
``guidance_scale`` read at every step as ``pipe._guidance_scale``, and call
``callback_on_step_end(pipe, i, t, tensors)`` after step ``i``, taking back the tensors it returns.
:class:`GuidanceCallback` uses exactly that (as diffusers' own ``SDCFGCutoffCallback`` does):

- after step ``i`` it reads the noise level of step ``i + 1`` from the pipeline's scheduler
  (timestep -> time on the scheduler's noise schedule -> k-diffusion sigma) and sets
  ``pipe._guidance_scale`` to the schedule's weight there;
- where the weight is 1 (outside a guidance interval) it drops the unconditional half of the
  batched conditioning (``prompt_embeds``; SDXL's ``add_text_embeds`` / ``add_time_ids``; SD3's
  ``pooled_prompt_embeds``), so the pipeline runs one network pass per step, and puts it back when
  guidance resumes. A run that starts unguided (weight 1 at the first step) never had the
  unconditional half: the callback encodes it with the pipeline's own ``encode_prompt`` (the empty,
  or ``negative_prompt``, prompt; SDXL's zeroed negatives when its config says so), or takes
  ``negative_embeddings`` given up front (pipelines without text encoders).

diffusers calls the callback only after a step, so the first step runs at the call's
``guidance_scale``: :meth:`GuidanceCallback.call_options` computes it from a copy of the
scheduler, and the callback checks it after the first step. Three lines::

    from stepsearch.integrations.diffusers_guidance import GuidanceCallback
    guidance = GuidanceCallback.from_file("guidance.json", pipe)
    image = pipe(prompt, **guidance.call_options(num_inference_steps=20)).images[0]

The noise level of a step is read from the scheduler's (float32) timesteps: an interval edge placed
exactly on a grid point may fall on either side of it. Weights below 1 cannot be expressed in a
diffusers pipeline (it guides only above 1): such schedules are refused.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch.guidance import GuidanceSchedule, load_guidance
from stepsearch.noise import DiscreteVP, FlowMatching, NoiseSchedule

__all__ = ["GuidanceCallback", "scheduler_noise"]

_CONDITIONING = ("prompt_embeds", "add_text_embeds", "add_time_ids", "pooled_prompt_embeds")
"""Batched conditioning tensors a pipeline concatenates as ``[unconditional, conditional]``."""

_STEP_ARGUMENTS = ("num_inference_steps", "timesteps", "sigmas")


def scheduler_noise(scheduler: Any) -> NoiseSchedule:
    """The noise schedule behind a diffusers scheduler: a stepsearch drop-in's own, a discrete VP
    from ``beta_schedule`` / ``trained_betas``, else flow matching (``x = (1 - s) x0 + s eps``)."""
    noise = getattr(scheduler, "noise", None)
    if isinstance(noise, NoiseSchedule):
        return noise
    config = scheduler.config
    if "beta_schedule" in config or "trained_betas" in config:
        return DiscreteVP.from_diffusers_config(config)
    return FlowMatching(num_train_timesteps=int(config.get("num_train_timesteps", 1000)))


class GuidanceCallback:
    """A ``callback_on_step_end`` that applies a :class:`~stepsearch.guidance.GuidanceSchedule`
    in an unmodified diffusers pipeline (module docstring).

    Args:
        schedule: the guidance schedule (weights >= 1).
        pipeline: the pipeline it will run in (its ``_callback_tensor_inputs`` say which
            conditioning tensors it batches).
        negative_prompt: the unconditional branch's prompt when the callback must encode it
            (pass the same one to the pipeline when it starts guided).
        negative_embeddings: the unconditional conditioning tensors, one row (broadcast to the
            batch) or one per image, by name (``prompt_embeds``, ``pooled_prompt_embeds``,
            ``add_text_embeds``, ``add_time_ids``): used instead of encoding.

    ``passes`` counts the network passes the pipeline ran in the last call (2 on guided steps),
    as reported by the callback (the last step is counted from its weight).
    """

    def __init__(
        self,
        schedule: GuidanceSchedule,
        pipeline: Any,
        *,
        negative_prompt: str | None = None,
        negative_embeddings: Mapping[str, Tensor] | None = None,
    ) -> None:
        low, _ = schedule.bounds()
        if low < 1.0:
            raise ValueError(
                f"guidance schedule {schedule.describe()} reaches weight {low:g} < 1: diffusers "
                "pipelines guide only above 1"
            )
        available = set(getattr(pipeline, "_callback_tensor_inputs", ()))
        self.keys = [key for key in _CONDITIONING if key in available]
        if "prompt_embeds" not in self.keys:
            raise ValueError(
                f"{type(pipeline).__name__} does not pass prompt_embeds to step-end callbacks"
            )
        self.schedule = schedule
        self.pipeline = pipeline
        self.negative_prompt = negative_prompt
        self.negative_embeddings = dict(negative_embeddings or {})
        self.weights: list[float] = []
        self._stash: dict[str, Tensor] = {}

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], pipeline: Any, **options: Any
    ) -> GuidanceCallback:
        """The callback of a guidance schedule file (:func:`~stepsearch.guidance.load_guidance`)."""
        return cls(load_guidance(path), pipeline, **options)

    @property
    def tensor_inputs(self) -> list[str]:
        """What the pipeline must hand the callback (diffusers reads this from callback objects
        only for its own ``PipelineCallback`` class; :meth:`call_options` passes it)."""
        return list(self.keys)

    @property
    def passes(self) -> int:
        """Network passes of the last run: 1 per step at weight 1, 2 elsewhere."""
        return sum(1 if weight == 1.0 else 2 for weight in self.weights)

    # noise levels ----------------------------------------------------------------------------
    def sigma_at(self, timestep: float | Tensor, scheduler: Any | None = None) -> float:
        """The k-diffusion sigma of a network timestep of ``scheduler`` (default: the pipeline's)."""
        noise = scheduler_noise(self.pipeline.scheduler if scheduler is None else scheduler)
        value = float(timestep.item() if isinstance(timestep, Tensor) else timestep)
        return float(noise.kdiffusion_sigma(noise.t_from_model_time(np.float64(value))))

    def weight_at(self, timestep: float | Tensor, scheduler: Any | None = None) -> float:
        """The schedule's weight at a network timestep."""
        return float(self.schedule.weight(self.sigma_at(timestep, scheduler)))

    def first_guidance_scale(self, **set_timesteps: Any) -> float:
        """The weight of the first step (``set_timesteps`` arguments as the pipeline will pass
        them: ``num_inference_steps``, ``timesteps``, ``sigmas``, ``mu``, ...), found on a twin
        of the pipeline's scheduler built from its config."""
        original = self.pipeline.scheduler
        scheduler = type(original).from_config(original.config)
        accepted = inspect.signature(scheduler.set_timesteps).parameters
        scheduler.set_timesteps(
            **{key: value for key, value in set_timesteps.items() if value is not None},
            **({"device": "cpu"} if "device" in accepted else {}),
        )
        return self.weight_at(scheduler.timesteps[0], scheduler)

    def call_options(self, **set_timesteps: Any) -> dict[str, Any]:
        """Keyword arguments for the pipeline call: the step arguments given, the first step's
        ``guidance_scale``, this callback and its tensor inputs."""
        options = {key: value for key, value in set_timesteps.items() if key in _STEP_ARGUMENTS}
        return {
            **options,
            "guidance_scale": self.first_guidance_scale(**set_timesteps),
            "callback_on_step_end": self,
            "callback_on_step_end_tensor_inputs": self.tensor_inputs,
        }

    # the callback ----------------------------------------------------------------------------
    def __call__(
        self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        guided = bool(pipeline.do_classifier_free_guidance)
        if step_index == 0:
            self._start(pipeline, timestep, guided)
        timesteps = pipeline.scheduler.timesteps
        following = len(timesteps) - pipeline.num_timesteps + step_index + 1
        if following >= len(timesteps):
            return callback_kwargs
        weight = self.weight_at(timesteps[following])
        self.weights.append(weight)
        if weight == 1.0 and guided:
            self._drop(callback_kwargs)
        elif weight != 1.0 and not guided:
            self._restore(pipeline, callback_kwargs)
        pipeline._guidance_scale = weight
        return callback_kwargs

    def _start(self, pipeline: Any, timestep: Any, guided: bool) -> None:
        """Check the first step's weight (the call's ``guidance_scale``) and reset the state."""
        self._stash = {}
        expected = self.weight_at(timestep)
        used = float(pipeline._guidance_scale) if guided else 1.0
        if not math.isclose(used, expected, rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(
                f"the first step ran at guidance_scale {used:g}, the schedule's weight there is "
                f"{expected:g}: call the pipeline with **callback.call_options(...)"
            )
        self.weights = [expected]

    def _drop(self, tensors: dict[str, Any]) -> None:
        for key in self.keys:
            value = tensors[key]
            half = value.shape[0] // 2
            self._stash[key] = value[:half]
            tensors[key] = value[half:]

    def _restore(self, pipeline: Any, tensors: dict[str, Any]) -> None:
        if not self._stash:
            self._stash = self._negatives(pipeline, tensors)
        for key in self.keys:
            tensors[key] = torch.cat([self._stash[key].to(tensors[key]), tensors[key]])

    def _negatives(self, pipeline: Any, tensors: dict[str, Any]) -> dict[str, Tensor]:
        """The unconditional halves of a run that started unguided (module docstring)."""
        batch = tensors["prompt_embeds"].shape[0]
        if self.negative_embeddings:
            missing = [key for key in self.keys if key not in self.negative_embeddings]
            if missing:
                raise ValueError(f"negative_embeddings lacks {missing}")
            return {key: _rows(self.negative_embeddings[key], batch, key) for key in self.keys}
        pooled = tensors.get("add_text_embeds", tensors.get("pooled_prompt_embeds"))
        arguments = {
            "prompt": None,
            "prompt_2": None,
            "prompt_3": None,
            "device": tensors["prompt_embeds"].device,
            "num_images_per_prompt": 1,
            "do_classifier_free_guidance": True,
            "negative_prompt": self.negative_prompt,
            "prompt_embeds": tensors["prompt_embeds"],
            "pooled_prompt_embeds": pooled,
        }
        accepted = inspect.signature(pipeline.encode_prompt).parameters
        outputs = pipeline.encode_prompt(
            **{key: value for key, value in arguments.items() if key in accepted}
        )
        negatives = {"prompt_embeds": outputs[1]}
        if pooled is not None:
            pooled_key = (
                "add_text_embeds" if "add_text_embeds" in self.keys else "pooled_prompt_embeds"
            )
            negatives[pooled_key] = outputs[3]
        if "add_time_ids" in self.keys:  # SDXL: no negative size / crop given, as in its call
            negatives["add_time_ids"] = tensors["add_time_ids"]
        return negatives


def _rows(value: Tensor, batch: int, key: str) -> Tensor:
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(
        f"negative_embeddings[{key!r}] has {value.shape[0]} rows for a batch of {batch}"
    )
