"""Export a step schedule to where it is used: a diffusers scheduler directory, k-diffusion
sigmas, ComfyUI ``SIGMAS``, or diffusers timesteps.

A fitted schedule is data, not scheduler state: the diffusers export writes a drop-in
:class:`~stepsearch.integrations.diffusers.StepsearchScheduler` config that stores the schedule
as ``custom_times``, so ``from_pretrained`` of that directory replays it exactly. The other
targets are JSON lists of numbers:

- ``kdiffusion``: sigmas ``sigma_t / alpha_t`` (float64, ``0`` at a clean end), for
  ``sample_xxx(model, x, torch.tensor(sigmas))``;
- ``comfyui``: the same sigmas rounded to float32, ending in ``0`` (ComfyUI's ``SIGMAS``);
- ``timesteps``: diffusers train-timestep indices of the evaluation times (integers when every
  time sits on a trained step, else fractional), for ``pipe(timesteps=...)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from stepsearch._io import atomic_write_dir, atomic_write_json
from stepsearch.integrations.diffusers import scheduler_for_solver
from stepsearch.noise import DiscreteVP, FlowMatching
from stepsearch.schedule import StepSchedule

EXPORT_TARGETS = ("diffusers", "kdiffusion", "comfyui", "timesteps")
"""What :func:`export_schedule` writes."""

DEFAULT_SOLVER = "dpm_solver_pp_2m"
"""The solver of a diffusers export when neither the caller nor the schedule names one."""


def schedule_values(schedule: StepSchedule, target: str) -> list[float] | list[int]:
    """The numbers of ``schedule`` for ``target`` (``kdiffusion``, ``comfyui`` or
    ``timesteps``; see the module docstring)."""
    if target == "kdiffusion":
        return schedule.to_kdiffusion_sigmas().tolist()
    if target == "comfyui":
        return schedule.to_comfyui_sigmas().tolist()
    if target == "timesteps":
        timesteps = schedule.to_diffusers_timesteps(integer=False)
        rounded = np.rint(timesteps)
        if np.all(np.abs(timesteps - rounded) <= 1e-6):
            return [int(t) for t in rounded]
        return timesteps.tolist()
    raise ValueError(f"unknown export target {target!r}; choose from {', '.join(EXPORT_TARGETS)}")


NO_PREDICTION_TYPE = (
    "the schedule does not record the model's prediction type, and a drop-in scheduler with the "
    "wrong one samples garbage: pass --prediction-type (epsilon, v_prediction, sample, "
    "flow_prediction), or --model NAME|DIR to read it from the model (a schedule written with "
    "`stepsearch schedule save --model ...` or by a search records it)"
)


def diffusers_scheduler(
    schedule: StepSchedule,
    solver: str | None = None,
    prediction_type: str | None = None,
    **config: Any,
) -> Any:
    """The drop-in scheduler of ``solver`` (default: the schedule's ``metadata["solver"]``, else
    :data:`DEFAULT_SOLVER`) that replays ``schedule``. ``prediction_type`` defaults to the
    schedule's ``metadata["prediction_type"]`` (flow matching: ``flow_prediction``); with
    neither it is a ``ValueError`` (:data:`NO_PREDICTION_TYPE`): export does not guess."""
    solver = solver or str(schedule.metadata.get("solver") or DEFAULT_SOLVER)
    prediction_type = prediction_type or schedule.metadata.get("prediction_type")
    if prediction_type is None and isinstance(schedule.noise, FlowMatching):
        prediction_type = "flow_prediction"
    if prediction_type is None and isinstance(schedule.noise, DiscreteVP):
        raise ValueError(NO_PREDICTION_TYPE)
    cls = scheduler_for_solver(solver)
    if prediction_type is not None:
        config["prediction_type"] = str(prediction_type)
    return cls.from_step_schedule(schedule, **config)


def export_schedule(
    schedule: StepSchedule,
    target: str,
    destination: str | os.PathLike[str] | None = None,
    *,
    solver: str | None = None,
    prediction_type: str | None = None,
) -> Any:
    """Export ``schedule`` to ``target`` (:data:`EXPORT_TARGETS`).

    ``diffusers``: ``save_pretrained`` the drop-in scheduler (:func:`diffusers_scheduler`) into
    the directory ``destination`` (required; each file written atomically) and return the
    scheduler. Other targets: return the
    list of numbers (:func:`schedule_values`) and, when ``destination`` is given, write it there
    as JSON (atomically).

    Raises:
        ValueError: unknown target or solver, a diffusers export without a directory or on a
            noise schedule diffusers cannot express, ComfyUI sigmas of a schedule that does not
            end clean, diffusers timesteps on a non-discrete noise schedule.
    """
    if target not in EXPORT_TARGETS:
        raise ValueError(
            f"unknown export target {target!r}; choose from {', '.join(EXPORT_TARGETS)}"
        )
    if target == "diffusers":
        if destination is None:
            raise ValueError("a diffusers export needs a directory to save_pretrained into")
        directory = Path(destination)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"'{directory}' exists and is not a directory")
        scheduler = diffusers_scheduler(schedule, solver, prediction_type)
        atomic_write_dir(directory, scheduler.save_pretrained)  # the whole folder at once
        return scheduler
    if solver is not None or prediction_type is not None:
        raise ValueError(f"solver and prediction_type apply to the diffusers export, not {target}")
    values = schedule_values(schedule, target)
    if destination is not None:
        atomic_write_json(destination, values)
    return values
