"""A solver plan as a diffusers drop-in scheduler: :class:`StepsearchPlanScheduler`.

A :class:`~stepsearch.plan.SolverPlan` (S3's per-step rules, orders, predictions, estimation
points, relaxations, correctors, analytical first step; :mod:`stepsearch.plan`) is data; this
scheduler replays it inside diffusers' own loop exactly as stepsearch's
``sample(denoiser, x_T, plan, PlanSolver(...))`` runs it, bit for bit for the same model outputs.
Everything it needs is in its config, so ``save_pretrained`` / ``from_pretrained`` round-trip it:

- ``solver_plan``: the plan's versioned JSON (``SolverPlan.to_json_dict()``, format
  ``stepsearch.SolverPlan``), validated field by field on load (errors name the file and field);
- ``solver_kwargs``: the ``plan`` solver's options: ``variant`` and, for ``first_step
  "data_mean"``, ``data_mean`` (float64 values, shaped like one sample);
- ``plan_checksum``: ``sha256`` of the plan and the data mean, so a hand-edited directory is
  refused rather than sampling with a plan its scores do not describe;
- ``custom_times``: the plan's times (they must agree); ``plan_provenance``: the search's
  provenance (JSON, informational).

Use::

    from stepsearch.integrations.plan_scheduler import StepsearchPlanScheduler

    pipe.scheduler = StepsearchPlanScheduler.from_pretrained("runs/s3/scheduler")
    image = pipe(prompt, num_inference_steps=pipe.scheduler.num_plan_steps).images[0]

Rules (``ValueError`` otherwise): ``num_inference_steps`` is the plan's step count ``n``
(``timesteps=`` / ``sigmas=`` only when they name the plan's own); the x0 estimate is
``stepsearch.denoiser.x0_from_model_output`` of the model output at the plan's evaluation time, as
stepsearch's model denoisers compute it; runs start at the first evaluation (no img2img starts:
the plan's steps combine earlier points).

**Analytical first step** (``first_step`` ``"zero_x0"`` / ``"data_mean"``): step 0 calls no
model, so ``timesteps`` has ``n - 1`` entries (the model evaluations, from ``t_1``; the NFE is
``plan.nfe``). The step from ``t_0`` to ``t_1`` happens in :meth:`scale_model_input` at the first
timestep: it returns ``x_1`` (computed from whatever it is given, element by element, so a
classifier-free-guidance batch ``cat([x_T, x_T])`` works), which the model sees at ``t_1``;
:meth:`step` is then given ``x_T`` (the loop's latents, unscaled, as every diffusers pipeline
passes them), recomputes ``x_1`` from it and continues. So **the loop must call
``scheduler.scale_model_input(x, t)`` and feed its result to the model**: Stable Diffusion-style
pipelines and stepsearch's own loops do; loops that skip it (``DDPMPipeline``) get a
``RuntimeError`` at the first ``step()`` instead of wrong samples. Plans with ``first_step
"model"`` need nothing of the kind (``scale_model_input`` is the identity).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from numpy.typing import ArrayLike

from stepsearch._io import atomic_write_dir
from stepsearch.denoiser import prediction_type_name, x0_from_model_output
from stepsearch.integrations.diffusers import (
    StepsearchScheduler,
    StepsearchSchedulerOutput,
    _checked_custom_times,
)
from stepsearch.integrations.olss import _with_base_parameters
from stepsearch.noise import DiscreteVP, FlowMatching
from stepsearch.plan import SolverPlan
from stepsearch.schedule import StepSchedule
from stepsearch.schedule_file import Provenance
from stepsearch.solvers import get_solver, solver_from_json
from stepsearch.solvers.base import Solver
from stepsearch.solvers.plan_solver import PlanSolver

__all__ = [
    "StepsearchPlanScheduler",
    "export_plan",
    "plan_solver_of",
    "solver_plan_checksum",
    "write_plan_scheduler_dir",
]

CONFIG_NAME = "scheduler_config.json"
_TIMESTEP_TOLERANCE = 1e-3
"""Largest difference, in train-step units, of ``timesteps`` that name the plan's evaluations."""
_SIGMA_RTOL = 1e-5
"""Relative tolerance for ``sigmas`` that name the plan's grid (float32 lists)."""
_NOISE_RTOL = 1e-9


def solver_plan_checksum(plan_payload: Mapping[str, Any], data_mean: torch.Tensor | None) -> str:
    """``sha256:<hex>`` of a plan's canonical JSON and its data mean (``None`` without one)."""
    mean = None
    if data_mean is not None:
        values = data_mean.detach().to("cpu", torch.float64).reshape(-1).tolist()
        mean = {"shape": list(data_mean.shape), "values": [float(v).hex() for v in values]}
    canonical = SolverPlan.from_json_dict(plan_payload).to_json_dict()
    text = json.dumps({"plan": canonical, "data_mean": mean}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _checked_plan(payload: Any) -> SolverPlan:
    """The plan of a config's ``solver_plan``; ``ValueError`` naming the field."""
    if not isinstance(payload, Mapping):
        raise ValueError(
            f"solver_plan must be a solver plan JSON object, got {type(payload).__name__}"
        )
    try:
        return SolverPlan.from_json_dict(payload)
    except ValueError as error:
        raise ValueError(f"solver_plan: {error}") from None


class StepsearchPlanScheduler(StepsearchScheduler):
    """A :class:`~stepsearch.plan.SolverPlan` replayed as a diffusers scheduler (module docstring).

    Args:
        solver_plan: ``SolverPlan.to_json_dict()`` of the plan (its times become
            ``custom_times``).
        plan_checksum: :func:`solver_plan_checksum` of the plan and data mean (written on save; a
            mismatch on load is refused, an absent one is computed).
        plan_provenance: JSON provenance of the search that found the plan.
        kwargs: the keys of :class:`StepsearchScheduler` (noise schedule, prediction type,
            ``solver_kwargs``: the ``plan`` solver's ``variant`` and ``data_mean``).
    """

    _default_solver = "plan"

    @register_to_config
    @_with_base_parameters
    def __init__(
        self,
        *,
        solver_plan: dict[str, Any] | None = None,
        plan_checksum: str | None = None,
        plan_provenance: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if solver_plan is None:
            raise ValueError(
                "StepsearchPlanScheduler needs a solver plan: use "
                "StepsearchPlanScheduler.from_plan(...) or from_pretrained of a saved one"
            )
        plan = _checked_plan(solver_plan)
        if kwargs.get("solver") not in (None, "plan"):
            raise ValueError(
                f"solver: a plan scheduler runs solver 'plan', got {kwargs['solver']!r}"
            )
        solver_kwargs = kwargs.get("solver_kwargs") or {}
        if not isinstance(solver_kwargs, Mapping):
            raise ValueError(f"solver_kwargs must be an object, got {solver_kwargs!r:.80}")
        given = kwargs.get("custom_times")
        given = None if given is None else _checked_custom_times(given)
        times = plan.schedule.times.tolist()
        if given is not None and (
            len(given) != len(times)
            or not np.allclose(np.asarray(given, dtype=np.float64), times, rtol=1e-12, atol=0)
        ):
            raise ValueError(
                f"custom_times {given!r:.120} disagree with the times of solver_plan ({times}); "
                "a plan scheduler runs its plan's times (edit neither by hand: re-export the plan)"
            )
        try:
            get_solver("plan", **solver_kwargs)
        except ValueError as error:
            raise ValueError(f"solver_kwargs: {error}") from None
        kwargs.update(solver="plan", solver_kwargs=dict(solver_kwargs), custom_times=times)
        super().__init__(**kwargs)
        solver = self._solver
        assert isinstance(solver, PlanSolver)
        try:
            solver.check_plan(plan)
        except ValueError as error:
            raise ValueError(f"solver_kwargs.data_mean: {error}") from None
        noise = self.noise
        if not np.allclose(noise.alpha(times), plan.schedule.noise.alpha(times), rtol=_NOISE_RTOL):
            raise ValueError(
                "solver_plan.schedule.noise: the plan was made on another noise schedule than "
                f"this config's ({plan.schedule.noise!r} vs {noise!r})"
            )
        computed = solver_plan_checksum(solver_plan, solver.data_mean)
        if plan_checksum is not None and plan_checksum != computed:
            raise ValueError(
                "plan_checksum: solver_plan or solver_kwargs.data_mean were edited after the plan "
                "was written (they no longer match the checksum); the scores it was chosen for no "
                "longer describe it: re-export the plan file (`stepsearch export PLAN --to "
                "diffusers DIR`) instead of editing the directory"
            )
        self._plan = plan
        self._prediction = prediction_type_name(self.config.prediction_type)
        self._scaled = False
        self.register_to_config(solver="plan", plan_checksum=computed)

    # construction ---------------------------------------------------------------------------
    @classmethod
    def from_plan(
        cls,
        plan: SolverPlan,
        solver: PlanSolver | None = None,
        *,
        prediction_type: str | None = None,
        provenance: Mapping[str, Any] | None = None,
        **config: Any,
    ) -> StepsearchPlanScheduler:
        """The scheduler replaying ``plan`` with ``solver`` (default ``PlanSolver()``; its
        ``variant`` and ``data_mean`` are stored) on the plan's noise schedule (a DiscreteVP or
        FlowMatching); ``config`` adds other keys."""
        solver = PlanSolver() if solver is None else solver
        if not isinstance(solver, PlanSolver):
            raise ValueError(
                f"a solver plan is replayed by the 'plan' solver, got {solver.name!r} (its "
                "multistep rules are not the plan solver's bit for bit)"
            )
        solver.check_plan(plan)
        keys: dict[str, Any] = {
            "solver_plan": plan.to_json_dict(),
            "plan_provenance": json.loads(json.dumps(dict(provenance or {}), allow_nan=False)),
            "solver_kwargs": solver.config(),
        }
        if prediction_type is not None:
            keys["prediction_type"] = prediction_type
        scheduler = cls.from_step_schedule(plan.schedule, **keys, **config)
        assert isinstance(scheduler, StepsearchPlanScheduler)
        return scheduler

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str] | None = None,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``SchedulerMixin.from_pretrained``; a bad plan's ``ValueError`` names the config file."""
        try:
            return super().from_pretrained(
                pretrained_model_name_or_path,
                subfolder=subfolder,
                return_unused_kwargs=return_unused_kwargs,
                **kwargs,
            )
        except ValueError as error:
            where = Path(str(pretrained_model_name_or_path), subfolder or "", CONFIG_NAME)
            raise ValueError(f"{where}: {error}") from None

    # read-only views ------------------------------------------------------------------------
    @property
    def plan(self) -> SolverPlan:
        """The solver plan this scheduler replays."""
        return self._plan

    @property
    def num_plan_steps(self) -> int:
        """The plan's step count: the ``num_inference_steps`` to pass."""
        return self._plan.num_steps

    @property
    def nfe(self) -> int:
        """Model evaluations per run (``len(timesteps)``): ``plan.nfe``."""
        return self._plan.nfe

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.config.plan_provenance or {})

    # set_timesteps --------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: ArrayLike | torch.Tensor | None = None,
        sigmas: ArrayLike | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Use the plan's schedule. ``num_inference_steps`` must be the plan's step count;
        ``timesteps`` (the model evaluations) / ``sigmas`` (the grid's k-diffusion sigmas, with or
        without the final entry) only when they name the plan's."""
        plan = self._plan
        if mu is not None:
            raise ValueError("a solver plan runs its own times; `mu` cannot shift them")
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass only one of `timesteps` or `sigmas`")
        if num_inference_steps is not None and (
            isinstance(num_inference_steps, bool) or num_inference_steps != plan.num_steps
        ):
            raise ValueError(
                f"this scheduler replays a {plan.num_steps}-step solver plan (NFE {plan.nfe}), "
                f"not num_inference_steps={num_inference_steps!r}: pass "
                f"num_inference_steps={plan.num_steps} (a plan is searched for one step count; "
                "search one for another NFE)"
            )
        if timesteps is not None or sigmas is not None:
            what = "timesteps" if timesteps is not None else "sigmas"
            if not self._names_plan(timesteps, sigmas):
                raise ValueError(
                    f"a solver plan cannot honour these {what}: it runs its own "
                    f"{plan.num_steps}-step schedule, whose model evaluations are at timesteps "
                    f"{np.round(self._plan_model_times(), 3).tolist()}"
                )
        self.set_schedule(plan.schedule, device=device)

    def _plan_model_times(self) -> np.ndarray:
        evaluations = np.asarray(self._solver.evaluation_times(self._plan), dtype=np.float64)
        return np.asarray(self._plan.schedule.noise.model_time(evaluations), dtype=np.float64)

    def _names_plan(
        self, timesteps: ArrayLike | torch.Tensor | None, sigmas: ArrayLike | torch.Tensor | None
    ) -> bool:
        if timesteps is not None:
            given = self._as_float_array(timesteps)
            expected = self._plan_model_times()
            return given.shape == expected.shape and bool(
                np.allclose(given, expected, rtol=0, atol=_TIMESTEP_TOLERANCE)
            )
        given = self._as_float_array(sigmas)
        expected = self._pipeline_sigmas(self._plan.schedule)
        if given.size == expected.size - 1:
            expected = expected[:-1]
        return given.shape == expected.shape and bool(
            np.allclose(given, expected, rtol=_SIGMA_RTOL, atol=1e-9)
        )

    def set_schedule(
        self, schedule: StepSchedule, device: str | torch.device | None = None
    ) -> None:
        """Use the plan's schedule (``schedule`` must be it) and reset the run state: one
        ``timesteps`` entry per model evaluation of the plan."""
        plan_schedule = self._plan.schedule
        if schedule.times.shape != plan_schedule.times.shape or not np.allclose(
            schedule.times, plan_schedule.times, rtol=1e-12, atol=0
        ):
            raise ValueError(
                f"a plan scheduler runs its plan's times {plan_schedule.times.tolist()}, got "
                f"{schedule.times.tolist()}"
            )
        evaluation_times = np.asarray(self._solver.evaluation_times(self._plan), dtype=np.float64)
        model_times = self._plan_model_times()
        rounded = np.rint(model_times)
        if np.all(np.abs(model_times - rounded) <= 1e-6):
            timesteps = torch.from_numpy(rounded.astype(np.int64))
        else:
            timesteps = torch.from_numpy(model_times.astype(np.float32))
        self.timesteps = timesteps.to(device) if device is not None else timesteps
        self.sigmas = torch.from_numpy(self._pipeline_sigmas(plan_schedule).astype(np.float32))
        self.num_inference_steps = plan_schedule.num_steps
        self._schedule = plan_schedule
        self._evaluation_times = evaluation_times
        self._model_times = model_times
        # x_T as stepsearch samples the plan (1 for variance-preserving schedules)
        self.init_noise_sigma = plan_schedule.noise.initial_noise_scale(
            float(plan_schedule.times[0])
        )
        self._reset_run_state()
        self._scaled = False

    # runs -----------------------------------------------------------------------------------
    def _step_starts(self) -> dict[int, int]:
        """Runs start at the first evaluation only (the plan's steps combine earlier points)."""
        return {0: 0}

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Only ``0``: a plan cannot start mid-way (img2img), its steps combine earlier points."""
        if int(begin_index) != 0:
            raise ValueError(
                f"begin_index {begin_index}: a solver plan runs from its first step only (its "
                "steps use earlier points, and an analytical first step starts from pure noise); "
                "img2img needs a plan searched for the shorter schedule"
            )
        super().set_begin_index(0)

    def _at_run_start(self) -> bool:
        return self._step_index is None or self._step_index >= len(self._evaluation_times)

    def scale_model_input(
        self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The identity, except at the first timestep of a plan with an analytical first step:
        there it takes that step (``t_0 -> t_1``, no model call) from ``sample`` and returns
        ``x_1``, the sample the model is evaluated at (module docstring)."""
        if not self._plan.analytical_first_step or self._schedule is None:
            return sample
        if not self._at_run_start():
            return sample
        if timestep is not None and not self._matches(self._timestep_value(timestep), 0):
            raise ValueError(
                f"timestep {self._timestep_value(timestep)!r} is not the plan's first model "
                f"timestep {float(self._model_times[0])!r} (its first step is analytical: the "
                "run starts at t_1)"
            )
        state = self._solver.init(sample, self._plan)
        x_first, _ = self._solver.start(state, sample)
        self._scaled = True
        return x_first

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> StepsearchSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Advance one model evaluation of the plan, as stepsearch's ``sample()`` does: the x0
        estimate of ``model_output`` at the sample the model saw (``sample``; after an analytical
        first step, at the first evaluation, ``x_1`` recomputed from ``sample = x_T``), then one
        ``PlanSolver.step``. Returns the next sample and the x0 estimate."""
        del kwargs  # diffusers' eta, variance_noise, ...: the plan decides
        self._require_schedule()
        value = self._timestep_value(timestep)
        i = 0 if self._at_run_start() else self._step_index
        assert i is not None
        if not self._matches(value, i):
            if i == 0:
                raise ValueError(
                    f"timestep {value!r} is not the plan's first model timestep "
                    f"{float(self._model_times[0])!r}: a plan runs from its start"
                )
            raise ValueError(
                f"timestep {value!r} is not the next timestep of the plan: expected "
                f"{float(self._model_times[i])!r} at index {i} of {self._shown_timesteps()}; "
                "call `set_timesteps` to start over"
            )
        x, state = sample, self._state
        if i == 0:
            state = self._solver.init(sample, self._plan)
            if self._plan.analytical_first_step:
                self._check_scaled()
                x, state = self._solver.start(state, sample)
        assert state is not None
        output = model_output.to(x.dtype)
        time = float(self._evaluation_times[i])
        denoised = x0_from_model_output(
            self._plan.schedule.noise, x, time, output, self._prediction
        )
        denoised = self._postprocess_x0(denoised)
        x_next, self._state = self._solver.step(state, x, denoised, i, generator=generator)
        self._step_index = i + 1
        if self._step_index == len(self._evaluation_times):
            self._scaled = False  # the next run takes its analytical step afresh
        if not return_dict:
            return (x_next, denoised)
        return StepsearchSchedulerOutput(prev_sample=x_next, pred_original_sample=denoised)

    def _check_scaled(self) -> None:
        if not self._scaled:
            raise RuntimeError(
                f"this solver plan's first step is analytical (first_step "
                f"{self._plan.first_step!r}, no model call at t_0): the model's first evaluation "
                "is at t_1, on the sample scheduler.scale_model_input(x_T, timesteps[0]) returns, "
                "but this loop called step() without calling scale_model_input first. Feed the "
                "model `scheduler.scale_model_input(x, t)` (Stable Diffusion-style pipelines do; "
                "DDPMPipeline does not), or use a plan with first_step 'model'"
            )


def write_plan_scheduler_dir(
    path: str | os.PathLike[str],
    plan: SolverPlan,
    solver: Solver,
    *,
    provenance: Mapping[str, Any] | None = None,
    **config: Any,
) -> Path | None:
    """A :class:`StepsearchPlanScheduler` directory replaying ``plan`` with ``solver`` (the
    ``plan`` solver), written at once (:func:`stepsearch._io.atomic_write_dir`); ``None`` when the
    noise schedule has no diffusers form (EDM, continuous VP)."""
    if not isinstance(plan.schedule.noise, (DiscreteVP, FlowMatching)):
        return None
    if not isinstance(solver, PlanSolver):
        raise ValueError(
            f"a solver plan's scheduler replays the 'plan' solver, got {solver.name!r}"
        )
    scheduler = StepsearchPlanScheduler.from_plan(plan, solver, provenance=provenance, **config)
    return atomic_write_dir(path, scheduler.save_pretrained)


NO_PLAN_PREDICTION_TYPE = (
    "the plan does not record the model's prediction type, and a drop-in scheduler with the "
    "wrong one samples garbage: pass --prediction-type (epsilon, v_prediction, sample, "
    "flow_prediction), or export the search's best_schedule.json, whose provenance records it"
)


def plan_solver_of(provenance: Provenance | None, solver: str | None = None) -> PlanSolver:
    """The ``plan`` solver a plan was scored with (its provenance's, with its ``variant`` and
    ``data_mean``), else ``PlanSolver()``; ``solver`` may only name ``plan``."""
    if solver not in (None, "plan"):
        raise ValueError(
            f"--solver {solver!r}: a solver plan is replayed by the 'plan' solver it was "
            "searched with (drop --solver, or export the plan's step schedule from a plain "
            "schedule file)"
        )
    if provenance is None or provenance.solver.get("name") != "plan":
        return PlanSolver()
    found = solver_from_json(provenance.solver)
    assert isinstance(found, PlanSolver)
    return found


def export_plan(
    plan: SolverPlan,
    destination: str | os.PathLike[str],
    *,
    provenance: Provenance | None = None,
    solver: str | None = None,
    prediction_type: str | None = None,
) -> StepsearchPlanScheduler:
    """Write the :class:`StepsearchPlanScheduler` of ``plan`` into the directory ``destination``
    (at once) and return it. The solver (``variant``, ``data_mean``) and the prediction type come
    from ``provenance`` (a search's schedule file) unless given; a ``"data_mean"`` first step
    without a recorded data mean, or no prediction type at all, is a ``ValueError``."""
    directory = Path(destination)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"'{directory}' exists and is not a directory")
    plan_solver = plan_solver_of(provenance, solver)
    if plan.first_step == "data_mean" and plan_solver.data_mean is None:
        raise ValueError(
            "step 0: first_step 'data_mean' needs the data mean, which this file does not "
            "record: export the search's best_schedule.json (its provenance records the plan "
            "solver's data mean)"
        )
    prediction_type = (
        prediction_type
        or (provenance.prediction_type if provenance is not None else None)
        or plan.schedule.metadata.get("prediction_type")
    )
    if prediction_type is None and isinstance(plan.schedule.noise, FlowMatching):
        prediction_type = "flow_prediction"
    if prediction_type is None:
        raise ValueError(NO_PLAN_PREDICTION_TYPE)
    if not isinstance(plan.schedule.noise, (DiscreteVP, FlowMatching)):
        raise ValueError(
            "diffusers schedulers need a DiscreteVP or FlowMatching schedule, got "
            f"{plan.schedule.noise!r}"
        )
    scheduler = StepsearchPlanScheduler.from_plan(
        plan,
        plan_solver,
        prediction_type=str(prediction_type),
        provenance=provenance.to_json_dict() if provenance is not None else None,
    )
    atomic_write_dir(directory, scheduler.save_pretrained)
    return scheduler
