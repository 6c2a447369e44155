"""Export a step schedule to where it is used: a diffusers scheduler directory, k-diffusion
sigmas, ComfyUI ``SIGMAS``, or diffusers timesteps.

A fitted schedule is data, not scheduler state: the diffusers export writes a drop-in
:class:`~stepsearch.integrations.diffusers.StepsearchScheduler` config that stores the schedule
as ``custom_times``, so ``from_pretrained`` of that directory replays it exactly. A schedule made
for a model records what that scheduler needs (:func:`drop_in_metadata`: the model's prediction
type and diffusers scheduler config; a search's schedule file carries them in its provenance):
the drop-in is built from the model's own scheduler config, and without a recorded prediction
type the export refuses to guess. The other targets are JSON lists of numbers:

- ``kdiffusion``: sigmas ``sigma_t / alpha_t`` (float64, ``0`` at a clean end), for
  ``sample_xxx(model, x, torch.tensor(sigmas))``;
- ``comfyui``: the same sigmas rounded to float32, ending in ``0`` (ComfyUI's ``SIGMAS``);
- ``timesteps``: diffusers train-timestep indices of the evaluation times (integers when every
  time sits on a trained step, else fractional), for ``pipe(timesteps=...)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stepsearch._io import atomic_write_dir, atomic_write_json
from stepsearch.denoiser import PREDICTION_TYPE_ALIASES
from stepsearch.integrations.diffusers import SCHEDULERS, scheduler_for_solver
from stepsearch.integrations.olss import StepsearchOLSSScheduler
from stepsearch.noise import DiscreteVP, FlowMatching
from stepsearch.schedule import StepSchedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.solvers.olss import OLSSCoefficients

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

_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def prediction_type_of(scheduler_config: Mapping[str, Any]) -> str:
    """The prediction type a model's diffusers scheduler config says, in diffusers' spelling
    (``flow_prediction`` for flow-matching schedulers; diffusers' default ``epsilon`` when the
    config does not say)."""
    if (
        scheduler_config.get("_class_name") in _FLOW_CLASSES
        or scheduler_config.get("use_flow_sigmas")
        or scheduler_config.get("prediction_type") in ("flow", "flow_prediction")
    ):
        return "flow_prediction"
    return str(scheduler_config.get("prediction_type") or "epsilon")


def drop_in_metadata(scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """What a schedule made for a model records so that its diffusers export needs no guessing:
    ``prediction_type`` and the model's ``scheduler_config`` (:func:`diffusers_scheduler`)."""
    config = json.loads(json.dumps(dict(scheduler_config), allow_nan=False))  # JSON data only
    return {"prediction_type": prediction_type_of(config), "scheduler_config": config}


def schedule_for_export(loaded: StepSchedule | ScheduleFile) -> StepSchedule:
    """The step schedule to export from a plain schedule file or a search's
    :class:`~stepsearch.schedule_file.ScheduleFile` (``RUN/best_schedule.json``): a schedule
    file's provenance (model, solver and its options, prediction type, the model's scheduler
    config) is folded into the schedule's metadata, where :func:`diffusers_scheduler` reads it."""
    if isinstance(loaded, StepSchedule):
        return loaded
    provenance = loaded.provenance
    fitted = dict(provenance.solver)
    options = dict(fitted.get("config") or {})
    metadata: dict[str, Any] = {
        "model": dict(provenance.model),
        "solver": str(fitted.get("name")),
        "solver_kwargs": {key: value for key, value in options.items() if key != "name"},
    }
    if loaded.is_plan:
        metadata["solver_plan"] = True
    if metadata["solver"] == "olss":  # its scheduler records where it came from
        metadata["provenance"] = provenance.to_json_dict()
    if provenance.prediction_type is not None:
        metadata["prediction_type"] = provenance.prediction_type
    if provenance.extra.get("scheduler_config") is not None:
        metadata["scheduler_config"] = provenance.extra["scheduler_config"]
    return loaded.schedule.with_metadata(**metadata)


def diffusers_scheduler(
    schedule: StepSchedule,
    solver: str | None = None,
    prediction_type: str | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    **config: Any,
) -> Any:
    """The drop-in scheduler of ``solver`` (default: the schedule's ``metadata["solver"]`` with
    its ``solver_kwargs``, else :data:`DEFAULT_SOLVER`) that replays ``schedule``. A schedule
    fitted by OLSS (its coefficients in ``solver_kwargs``) becomes the
    :class:`~stepsearch.integrations.olss.StepsearchOLSSScheduler` of those coefficients; one
    fitted for a solver plan needs ``solver`` (plans have their own scheduler:
    :func:`~stepsearch.integrations.plan_scheduler.export_plan`).

    ``scheduler_config`` (default: the schedule's ``metadata["scheduler_config"]``, the model's
    diffusers scheduler config) is the config the drop-in is built from, with the schedule as
    ``custom_times``: the same scheduler as ``cls.from_config(model_config, solver=...,
    custom_times=...)``. ``prediction_type`` defaults to the schedule's
    ``metadata["prediction_type"]``, else to the scheduler config's (flow matching:
    ``flow_prediction``); with none of them it is a ``ValueError`` (:data:`NO_PREDICTION_TYPE`):
    export does not guess."""
    metadata = schedule.metadata
    fitted = metadata.get("solver")
    olss = fitted == "olss" and solver in (None, "olss") and not metadata.get("solver_plan")
    unreplayable = metadata.get("solver_plan") or (fitted is not None and fitted not in SCHEDULERS)
    if solver is None and not olss and unreplayable:
        what = "a solver plan" if metadata.get("solver_plan") else f"solver {fitted!r}"
        raise ValueError(
            f"the schedule was fitted for {what}, which no one-solver drop-in scheduler replays "
            "(the search's own scheduler/ folder does): pass --solver NAME to export its step "
            "schedule with one solver"
        )
    solver = solver or str(fitted or DEFAULT_SOLVER)
    if solver == fitted and not metadata.get("solver_plan") and metadata.get("solver_kwargs"):
        config.setdefault("solver_kwargs", dict(metadata["solver_kwargs"]))
    if scheduler_config is None and isinstance(metadata.get("scheduler_config"), Mapping):
        scheduler_config = metadata["scheduler_config"]
    prediction_type = _prediction_type(schedule, prediction_type, scheduler_config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    if olss:
        return _olss_scheduler(schedule, config)
    cls = scheduler_for_solver(solver)
    if scheduler_config is None:
        return cls.from_step_schedule(schedule, **config)
    scheduler = cls.from_config(
        dict(scheduler_config), solver=solver, custom_times=schedule.times.tolist(), **config
    )
    if not np.allclose(
        scheduler.noise.alpha(schedule.times), schedule.noise.alpha(schedule.times), rtol=1e-9
    ):
        raise ValueError(
            "the schedule was made on another noise schedule than the model's scheduler config "
            f"describes ({schedule.noise!r}); make it with `stepsearch schedule save --model ...`"
        )
    return scheduler


def _prediction_type(
    schedule: StepSchedule,
    given: str | None,
    scheduler_config: Mapping[str, Any] | None,
) -> str | None:
    """``given``, else the schedule's recorded one, else the model config's, else
    ``flow_prediction`` on flow matching; ``None`` only off diffusers' noise schedules (a
    ``ValueError`` on a DiscreteVP: :data:`NO_PREDICTION_TYPE`)."""
    found = given or schedule.metadata.get("prediction_type")
    if found is None and scheduler_config is not None:
        found = prediction_type_of(scheduler_config)
    if found is None and isinstance(schedule.noise, FlowMatching):
        found = "flow_prediction"
    if found is None and isinstance(schedule.noise, DiscreteVP):
        raise ValueError(NO_PREDICTION_TYPE)
    if found is None:
        return None
    name = PREDICTION_TYPE_ALIASES.get(str(found), str(found))
    return "flow_prediction" if name == "flow" else str(found)


def _olss_scheduler(schedule: StepSchedule, config: dict[str, Any]) -> StepsearchOLSSScheduler:
    """The OLSS scheduler of the coefficients an OLSS schedule file records (its provenance's
    solver config), checked against the file's own step schedule."""
    recorded = dict(schedule.metadata.get("solver_kwargs") or {}).get("coefficients")
    if not isinstance(recorded, Mapping):
        raise ValueError(
            "the schedule was fitted by OLSS but does not record its coefficients: export the "
            "search's olss_schedule.json, or pass --solver NAME to export its step schedule"
        )
    coefficients = OLSSCoefficients.from_json_dict(recorded)
    if not np.array_equal(coefficients.schedule.times, schedule.times):
        raise ValueError(
            "the OLSS coefficients were fitted for other times than the file's schedule "
            "(the file was edited): run the search again"
        )
    options = {"prediction_type": config["prediction_type"]} if "prediction_type" in config else {}
    provenance = schedule.metadata.get("provenance")
    return StepsearchOLSSScheduler.from_fit(coefficients, options, provenance=provenance)


def export_schedule(
    schedule: StepSchedule,
    target: str,
    destination: str | os.PathLike[str] | None = None,
    *,
    solver: str | None = None,
    prediction_type: str | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
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
        scheduler = diffusers_scheduler(schedule, solver, prediction_type, scheduler_config)
        atomic_write_dir(directory, scheduler.save_pretrained)  # the whole folder at once
        return scheduler
    if solver is not None or prediction_type is not None or scheduler_config is not None:
        raise ValueError(
            f"solver, prediction_type and the model apply to the diffusers export, not {target}"
        )
    values = schedule_values(schedule, target)
    if destination is not None:
        atomic_write_json(destination, values)
    return values
