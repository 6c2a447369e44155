"""Drop-in diffusers schedulers backed by stepsearch solvers and step schedules.

:class:`StepsearchScheduler` is a ``SchedulerMixin, ConfigMixin`` class: it builds a
:class:`~stepsearch.noise.DiscreteVP` (or :class:`~stepsearch.noise.FlowMatching`) from the usual
diffusers keys, turns ``set_timesteps`` into a validated :class:`~stepsearch.schedule.StepSchedule`,
and maps each ``step()`` onto exactly one ``solver.step`` (one model evaluation). The per-solver
subclasses (:class:`StepsearchDDIMScheduler`, :class:`StepsearchDPMSolverMultistepScheduler`, ...)
only set a default solver and the timestep-grid convention of their diffusers namesake, so::

    pipe.scheduler = StepsearchDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

swaps a scheduler in place, and an optimized schedule travels in the config (``custom_times``)
through ``save_pretrained`` / ``from_pretrained``.

Conventions:

- Samples live in x-space (``x = alpha x0 + sigma eps``): ``init_noise_sigma = 1`` and
  ``scale_model_input`` is the identity, for every solver (Euler and Heun included, unlike
  ``EulerDiscreteScheduler``, which works on ``x / alpha``). One exception keeps parity: the
  Euler / Heun twins on ``linspace`` / ``trailing`` spacing start where diffusers' do,
  ``init_noise_sigma = sigma(t_0)`` (diffusers' ``sigma~_max`` in ``x / alpha`` space).
- ``timesteps`` holds one entry per *model evaluation* in diffusers units (train-step index
  ``t N - 1`` for discrete VP models, ``t N`` for flow models): int64 when every evaluation is on a
  trained step, float32 otherwise (Heun, singlestep DPM-Solver, Karras spacing, ...).
- ``set_timesteps(sigmas=...)`` takes k-diffusion sigmas ``sigma / alpha`` for VP models, the whole
  grid including its end (as ``EulerDiscreteScheduler``: diffusers' AYS lists end in ``0``); for
  flow models it takes the flow times of the evaluations, shifted by ``shift`` (or ``exp(mu)``)
  and followed by a final ``0``, as ``FlowMatchEulerDiscreteScheduler`` does.
- Schedules are data: non-monotonic or duplicated timesteps / sigmas, ``num_inference_steps``
  outside ``1 .. num_train_timesteps`` and a ``step()`` at a timestep other than the next one of
  the schedule raise ``ValueError``.
- ``float16`` / ``bfloat16`` samples are stepped in float32 and cast back.

Schedulers are stateful (one run at a time): use one instance per pipeline call or a copy per
thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from numpy.typing import ArrayLike

from stepsearch.denoiser import (
    PREDICTION_TYPE_ALIASES,
    per_sample,
    prediction_type_name,
    x0_from_model_output,
)
from stepsearch.denoiser import PREDICTION_TYPES as _CORE_PREDICTION_TYPES
from stepsearch.integrations.diffusers_keys import RULES, TWINS, check_options, warn_method_once
from stepsearch.noise import (
    DiscreteVP,
    FloatArray,
    FlowMatching,
    NoiseSchedule,
    dynamic_flow_shift,
    flow_shift,
    stretch_to_terminal,
)
from stepsearch.schedule import (
    DIFFUSERS_SPACINGS,
    GRID_CONVENTIONS,  # noqa: F401 (public name)
    StepSchedule,
    diffusers_timesteps,
    loglinear_interpolate,
    make_schedule,
    sigma_spacing,
)
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver, SolverState, compute_dtype
from stepsearch.solvers.ddim import DDIM

logger = logging.getLogger(__name__)

_DIFFUSERS_NAMES = {core: name for name, core in PREDICTION_TYPE_ALIASES.items()}
PREDICTION_TYPES = tuple(_DIFFUSERS_NAMES.get(name, name) for name in _CORE_PREDICTION_TYPES)
"""Prediction types in diffusers' spelling (``flow_prediction`` for stepsearch's ``flow``)."""
FINALS = ("clean", "t_min")

diffusers_grid_timesteps = diffusers_timesteps
"""Kept name: :func:`stepsearch.schedule.diffusers_timesteps`."""

_TIMESTEP_TOLERANCE = 1e-3
"""Largest difference (in train-step units) between a ``step()`` timestep and the schedule's."""

_OWN_KEYS = (
    "solver", "solver_kwargs", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
    "trained_betas", "rescale_betas_zero_snr", "prediction_type", "timestep_spacing",
    "steps_offset", "final", "custom_times", "shift",
)  # fmt: skip
"""The stepsearch scheduler's own config keys (``__init__`` parameters)."""

DIFFUSERS_KEYS = tuple(key for key in RULES if key not in _OWN_KEYS)
"""diffusers keys the drop-in classes read (see :mod:`stepsearch.integrations.diffusers_keys`)."""

_DERIVED_KEYS = (
    "set_alpha_to_one",
    "final_sigmas_type",
    "use_karras_sigmas",
    "use_lu_lambdas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_flow_sigmas",
    "flow_shift",
    "solver_order",
    "skip_prk_steps",
)
"""diffusers keys a stepsearch config carries so that ``DDIMScheduler.from_config(ours)`` and
friends reproduce its choices; derived from the stepsearch keys, never read back."""

_METHOD_KEYS = ("solver_order", "solver_type", "algorithm_type")
"""Derived keys that name the method the class runs: they override given values (a
``StepsearchDPMSolver1Scheduler`` built from a 2M config says ``solver_order: 1``), so the twin
rebuilt from a stepsearch config runs the same method."""

_SOLVER_FOR_DIFFUSERS_CLASS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "HeunDiscreteScheduler": "heun",
    "UniPCMultistepScheduler": "unipc_bh2",
    "DPMSolverSinglestepScheduler": "dpm_solver_pp_2s",
    "DPMSolverMultistepScheduler": "dpm_solver_pp_2m",
    "FlowMatchEulerDiscreteScheduler": "euler",
}

_SIGMA_MAX_START_TWINS = frozenset({"EulerDiscreteScheduler", "HeunDiscreteScheduler"})
"""diffusers schedulers whose ``init_noise_sigma`` is ``sigma~_max`` on linspace / trailing."""

_SIGMA_SPACINGS = ("karras", "logsnr_uniform", "beta")
"""stepsearch spacings that diffusers' ``use_karras / exponential / beta_sigmas`` translate to."""

_NOISE_PREDICTION_SOLVERS = frozenset(
    {"dpm_solver_2", "dpm_solver_3", "dpm_solver_2m", "dpm_solver_3m"}
)
"""Solvers written to diffusers configs as ``algorithm_type: "dpmsolver"``."""

_SOLVER_ORDER = {
    "dpm_solver_1": 1,
    "dpm_solver_2": 2,
    "dpm_solver_3": 3,
    "dpm_solver_pp_2m": 2,
    "dpm_solver_pp_3m": 3,
    "dpm_solver_pp_2s": 2,
    "dpm_solver_2m": 2,
    "dpm_solver_3m": 3,
}


def _make_solver(name: str, kwargs: Mapping[str, Any]) -> Solver:
    return get_solver(name, **dict(kwargs))


def _solver_options(name: str) -> set[str]:
    return set(_make_solver(name, {}).config())


@dataclass
class StepsearchSchedulerOutput(BaseOutput):
    """Output of :meth:`StepsearchScheduler.step`.

    Args:
        prev_sample: the sample at the next evaluation time (the final sample after the last step),
            the next model input of the denoising loop.
        pred_original_sample: the model's clean-data estimate ``x0_hat`` at this evaluation.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# config translation (diffusers keys -> stepsearch keys), one path for __init__ and from_config
# --------------------------------------------------------------------------------------------


def _checked_custom_times(value: Any) -> list[float]:
    """``custom_times`` as a flat list of floats; anything else (a string, a nested list, a
    non-number) is a ``ValueError`` naming the field (a hand-edited config, say)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise ValueError(
            f"custom_times must be a list of times (numbers in [0, 1]), got {type(value).__name__} "
            f"{value!r:.80}"
        )
    times: list[float] = []
    for index, entry in enumerate(value):
        if isinstance(entry, bool) or not isinstance(entry, (int, float, np.floating, np.integer)):
            raise ValueError(
                f"custom_times[{index}] must be a number (a time in [0, 1]), got {entry!r:.80}"
            )
        times.append(float(entry))
    return times


def _final_from_diffusers(config: Mapping[str, Any], final_key: str | None = None) -> str | None:
    """``final`` from ``final_sigmas_type`` (DPM-Solver, UniPC, Euler, ...) or
    ``set_alpha_to_one`` (DDIM, PNDM); ``final_key`` restricts to the key the target class's
    diffusers namesake reads (Stable Diffusion configs carry ``set_alpha_to_one: false``, which
    ``DPMSolverMultistepScheduler`` ignores)."""
    if "final_sigmas_type" in config and final_key in (None, "final_sigmas_type"):
        return "t_min" if config["final_sigmas_type"] == "sigma_min" else "clean"
    if "set_alpha_to_one" in config and final_key in (None, "set_alpha_to_one"):
        return "clean" if config["set_alpha_to_one"] else "t_min"
    return None


_SIGMA_SPACING_KEYS: dict[str, str] = {
    "use_karras_sigmas": "karras",
    "use_exponential_sigmas": "logsnr_uniform",  # uniform in log k-diffusion sigma
    "use_lu_lambdas": "logsnr_uniform",
    "use_beta_sigmas": "beta",
}
"""diffusers' sigma-spacing switches and the stepsearch spacing each one names."""


def _spacing_from_diffusers(config: Mapping[str, Any]) -> str | None:
    chosen = [name for key, name in _SIGMA_SPACING_KEYS.items() if config.get(key)]
    if len(chosen) > 1:
        raise ValueError(
            "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, "
            f"use_lu_lambdas may be set; got {chosen}"
        )
    return chosen[0] if chosen else None


def _refuse_flow_with_sigma_spacing(
    where: str,
    options: Mapping[str, Any],
    timestep_spacing: str | None,
    flow: FlowMatching,
    vp: Callable[[], NoiseSchedule],
) -> None:
    """``use_flow_sigmas`` together with ``use_karras_sigmas`` (or the exponential / beta / Lu
    switch) is a ``ValueError`` naming both options and both ranges. diffusers' DPM-Solver and
    UniPC schedulers test the spacing switch first and space the sigmas of the *VP* schedule
    their betas define, which a flow model never saw (DPM-Solver then steps a flow model from
    sigma 157); no stepsearch behaviour can match that, so it is refused rather than differ
    silently. Karras spacing in flow time stays available as stepsearch's own
    ``timestep_spacing="karras"`` (what a stepsearch config saved with it names, so it loads)
    and as diffusers' own rule in ``StepsearchFlowMatchEulerDiscreteScheduler``."""
    if not options.get("use_flow_sigmas"):
        return
    for key, spacing in _SIGMA_SPACING_KEYS.items():
        if not options.get(key) or timestep_spacing == spacing:
            continue
        betas = vp()  # built only to name its range
        low = float(betas.kdiffusion_sigma(betas.t_min))
        high = float(betas.kdiffusion_sigma(betas.t_max))
        raise ValueError(
            f"{where}: {key}=True with use_flow_sigmas=True: diffusers' multistep schedulers "
            f"space the sigmas of the VP schedule their betas define (k-diffusion sigma range "
            f"[{low:.6g}, {high:.6g}]), not the flow model's time range "
            f"[{flow.t_min:.6g}, {flow.t_max:.6g}], so the flow model would be stepped at noise "
            f"levels it never saw; set one of the two options, or for {spacing} spacing in flow "
            f"time pass timestep_spacing={spacing!r} (stepsearch's spacing) instead of {key}"
        )


def _diffusers_class_name(config: Mapping[str, Any]) -> str | None:
    """The diffusers scheduler a config came from: ``_class_name`` when saved to disk, else
    guessed from keys only that class has (in-memory ``scheduler.config`` lacks the name)."""
    name = config.get("_class_name")
    if isinstance(name, str) and not name.startswith("Stepsearch"):
        return name
    if isinstance(name, str):
        return TWINS.get(name)
    signatures = (
        ("skip_prk_steps", "PNDMScheduler"),
        ("set_alpha_to_one", "DDIMScheduler"),
        ("euler_at_final", "DPMSolverMultistepScheduler"),
        ("disable_corrector", "UniPCMultistepScheduler"),
        ("algorithm_type", "DPMSolverSinglestepScheduler"),
        ("interpolation_type", "EulerDiscreteScheduler"),
        ("variance_type", "DDPMScheduler"),
        ("use_dynamic_shifting", "FlowMatchEulerDiscreteScheduler"),
    )
    return next((name for key, name in signatures if key in config), None)


def _solver_from_diffusers(config: Mapping[str, Any], class_name: str | None) -> str | None:
    """The stepsearch solver that is the method of a diffusers scheduler config."""
    order = int(config.get("solver_order", 2))
    noise_prediction = config.get("algorithm_type") == "dpmsolver"
    if class_name == "DPMSolverMultistepScheduler":
        if noise_prediction:
            return {1: "dpm_solver_1", 2: "dpm_solver_2m"}.get(order, "dpm_solver_3m")
        return {1: "dpm_solver_1", 2: "dpm_solver_pp_2m"}.get(order, "dpm_solver_pp_3m")
    if class_name == "DPMSolverSinglestepScheduler":
        if order == 1:
            return "dpm_solver_1"
        return f"dpm_solver_{order}" if noise_prediction else "dpm_solver_pp_2s"
    if class_name == "UniPCMultistepScheduler":
        return "unipc_bh1" if config.get("solver_type") == "bh1" else "unipc_bh2"
    return _SOLVER_FOR_DIFFUSERS_CLASS.get(class_name or "")


def _solver_kwargs_from_diffusers(
    solver: str, config: Mapping[str, Any], class_name: str | None
) -> dict[str, Any]:
    """Solver options a diffusers config implies (only options the solver has)."""
    options = _solver_options(solver)
    kwargs: dict[str, Any] = {}
    if solver == "pndm" and "skip_prk_steps" in config:
        kwargs["warmup"] = "lower_order" if config["skip_prk_steps"] else "prk"
    if class_name == "UniPCMultistepScheduler" and solver.startswith("unipc"):
        kwargs["order"] = int(config.get("solver_order", 2))
        # diffusers' UniPC lowers the last orders on every schedule (no 15-step rule)
        kwargs["lower_order_final"] = bool(config.get("lower_order_final", True))
        kwargs["lower_order_final_below"] = None
    if class_name == "DPMSolverMultistepScheduler" and "lower_order_final" in options:
        kwargs["lower_order_final"] = bool(config.get("lower_order_final", True))
        if config.get("euler_at_final"):  # last step first order on every schedule
            kwargs["lower_order_final"], kwargs["lower_order_final_below"] = True, None
        if "legacy_3m" in options and config.get("solver_order") == 3:
            kwargs["legacy_3m"] = True  # diffusers' 3M coefficient (see DPMSolverPP)
    return {key: value for key, value in kwargs.items() if key in options}


# --------------------------------------------------------------------------------------------
# the scheduler
# --------------------------------------------------------------------------------------------


class StepsearchScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs any stepsearch solver on any step schedule.

    Args:
        solver: a name from ``stepsearch.solvers.SOLVERS`` (default: the class's own).
        solver_kwargs: keyword arguments for the solver (JSON-serialisable).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        rescale_betas_zero_snr: the diffusers noise-schedule keys (ignored for flow models).
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow_prediction``
            (rectified flow ``x = (1 - t) x0 + t eps``, model output ``eps - x0``).
        timestep_spacing: ``leading`` / ``linspace`` / ``trailing`` (computed like the diffusers
            namesake of the class, see :func:`diffusers_grid_timesteps`) or any name of
            :data:`stepsearch.schedule.SPACINGS` (``karras``, ``logsnr_uniform``,
            ``time_uniform``, ``ays_gaussian``, ``flow_shifted``). Flow models use
            ``flow_shifted`` for the three diffusers names.
        steps_offset: added to ``leading`` timesteps (Stable Diffusion configs use 1).
        final: where the last step lands: ``clean`` (``t = 0``, diffusers' ``set_alpha_to_one`` /
            ``final_sigmas_type="zero"``) or ``t_min`` (the first trained step).
        custom_times: an optimized schedule (``StepSchedule.times``, times on ``[0, 1]``,
            strictly decreasing) used instead of ``timestep_spacing``; resampled by log-linear
            interpolation of k-diffusion sigma when another step count is asked for.
        shift: flow models' resolution shift ``s t / (1 + (s - 1) t)``.
        kwargs: other diffusers keys; ``set_alpha_to_one``, ``final_sigmas_type``,
            ``use_karras_sigmas``, ``use_lu_lambdas``, ``use_exponential_sigmas``,
            ``use_flow_sigmas`` and ``flow_shift`` are translated, the rest ignored.
    """

    _compatibles: ClassVar[list[str]] = [
        *(e.name for e in KarrasDiffusionSchedulers),
        "FlowMatchEulerDiscreteScheduler",
    ]
    _deprecated_kwargs: ClassVar[list[str]] = list(DIFFUSERS_KEYS)
    """diffusers keys that ``from_config`` passes on to ``__init__`` (which reads them)."""
    ignore_for_config: ClassVar[list[str]] = ["kwargs"]
    _default_solver: ClassVar[str] = "dpm_solver_pp_2m"
    _default_spacing: ClassVar[str] = "linspace"
    _default_prediction_type: ClassVar[str] = "epsilon"
    _grid_convention: ClassVar[str] = "dpm"
    closest_method: ClassVar[str | None] = None
    """Set on classes whose method is the closest stepsearch has to their diffusers twin's, not
    the same one: how they differ (warned once per class, listed in docs/schedulers.md)."""

    @register_to_config
    def __init__(
        self,
        solver: str | None = None,
        solver_kwargs: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | np.ndarray | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str | None = None,
        timestep_spacing: str | None = None,
        steps_offset: int = 0,
        final: str | None = None,
        custom_times: list[float] | None = None,
        shift: float = 1.0,
        **kwargs: Any,
    ):
        diffusers_options = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        unknown = sorted(set(diffusers_options) - set(RULES))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown keyword arguments {unknown}")
        class_name = self._twin_of(kwargs)
        if self.closest_method is not None:
            warn_method_once(type(self).__name__, self.closest_method)
        prediction_type = prediction_type or self._default_prediction_type
        check_options(
            {
                **diffusers_options,
                "prediction_type": prediction_type,
                "timestep_spacing": timestep_spacing,
                "_twin": class_name,
            },
            type(self).__name__,
        )
        translated = self._translate(diffusers_options, class_name)
        given_spacing = timestep_spacing
        solver = solver or translated.get("solver") or self._default_solver
        timestep_spacing = (
            timestep_spacing or translated.get("timestep_spacing") or self._default_spacing
        )
        final = final or translated.get("final") or "clean"
        prediction_type = _DIFFUSERS_NAMES.get(prediction_type, prediction_type)
        if translated.get("prediction_type") == "flow_prediction":
            prediction_type = "flow_prediction"
            shift = translated.get("shift", shift)
        prediction_type_name(prediction_type)  # validates
        if final not in FINALS:
            raise ValueError(f"final must be one of {FINALS}, got {final!r}")
        implied = _solver_kwargs_from_diffusers(solver, diffusers_options, class_name)
        solver_kwargs = {**implied, **(solver_kwargs or {})}
        self._solver = _make_solver(solver, solver_kwargs)
        self._noise = self._noise_from_config(
            prediction_type, num_train_timesteps, beta_start, beta_end, beta_schedule,
            trained_betas, rescale_betas_zero_snr, shift,
        )  # fmt: skip
        if isinstance(self._noise, FlowMatching):
            _refuse_flow_with_sigma_spacing(
                type(self).__name__, diffusers_options, given_spacing, self._noise,
                lambda: self._noise_from_config(
                    "epsilon", num_train_timesteps, beta_start, beta_end, beta_schedule,
                    trained_betas, rescale_betas_zero_snr, shift,
                ),
            )  # fmt: skip
        if custom_times is not None:
            custom_times = _checked_custom_times(custom_times)
            try:
                StepSchedule(np.asarray(custom_times), self._noise)
            except ValueError as error:
                raise ValueError(f"custom_times: {error}") from None
        resolved = {
            "solver": solver,
            "solver_kwargs": solver_kwargs,
            "timestep_spacing": timestep_spacing,
            "final": final,
            "prediction_type": prediction_type,
            "shift": float(shift),
            "custom_times": custom_times,
        }
        derived = self._derived_keys(resolved)
        if class_name == "FlowMatchEulerDiscreteScheduler":
            # DPM-Solver / UniPC keys: Flux pipelines drop their own sigmas when a scheduler's
            # config says use_flow_sigmas, which FlowMatchEulerDiscreteScheduler's never does
            derived.pop("use_flow_sigmas")
            derived.pop("flow_shift")
        if solver == "pndm":
            derived["skip_prk_steps"] = self._solver.config().get("warmup") != "prk"
        # what was given wins over what is derived: the config stays equal to the input; except
        # the keys naming the method the class runs (_METHOD_KEYS)
        method = {key: derived[key] for key in _METHOD_KEYS if key in derived}
        self.register_to_config(**resolved, **{**derived, **diffusers_options, **method})
        self._options = {**derived, **diffusers_options}
        # DDIMScheduler keeps the model's eps when it clips x0 (see _keep_model_noise)
        self._keeps_model_noise = class_name == "DDIMScheduler"
        # read once: step() skips _postprocess_x0 when neither is set
        self._processes_x0 = bool(self._option("thresholding", False)) or bool(
            self._option("clip_sample", False)
        )

        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.sigmas: torch.Tensor | None = None
        if isinstance(self._noise, DiscreteVP):  # pipelines and user code read these
            self.betas = torch.from_numpy(self._noise.betas).to(torch.float32)
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = torch.tensor(self._noise.alphas_cumprod, dtype=torch.float32)
        self._schedule: StepSchedule | None = None
        self._warned_resample: tuple[int, int] | None = None
        self._reset_run_state()

    # construction helpers -------------------------------------------------------------------
    @classmethod
    def _twin_of(cls, config: Mapping[str, Any]) -> str | None:
        """The diffusers scheduler whose keys ``config`` holds: the config's own origin when it
        names one, else the class's twin."""
        return _diffusers_class_name(config) or TWINS.get(cls.__name__)

    @classmethod
    def _translate(cls, options: Mapping[str, Any], class_name: str | None) -> dict[str, Any]:
        """stepsearch keys implied by diffusers keys (only those they determine)."""
        translated: dict[str, Any] = {}
        final = _final_from_diffusers(options, cls._final_key())
        if final is not None:
            translated["final"] = final
        spacing = _spacing_from_diffusers(options)
        if spacing is not None:
            translated["timestep_spacing"] = spacing
        flow_twin = TWINS.get(cls.__name__) == "FlowMatchEulerDiscreteScheduler"
        if (
            options.get("use_flow_sigmas")
            or class_name == "FlowMatchEulerDiscreteScheduler"
            or (flow_twin)
        ):
            translated["prediction_type"] = "flow_prediction"
            if "flow_shift" in options:
                translated["shift"] = float(options["flow_shift"])
        solver = cls._solver_from_diffusers_config(options, class_name)
        if solver is not None:
            translated["solver"] = solver
        return translated

    @staticmethod
    def _noise_from_config(
        prediction_type: str,
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        beta_schedule: str,
        trained_betas: ArrayLike | None,
        rescale_betas_zero_snr: bool,
        shift: float,
    ) -> NoiseSchedule:
        if prediction_type == "flow_prediction":
            total = int(num_train_timesteps)
            # t_min below 1 / N: dynamic shifts move the last grid point under it
            return FlowMatching(shift=float(shift), t_min=1e-6, num_train_timesteps=total)
        return DiscreteVP.from_diffusers_config(
            {
                "num_train_timesteps": num_train_timesteps,
                "beta_start": beta_start,
                "beta_end": beta_end,
                "beta_schedule": beta_schedule,
                "trained_betas": None if trained_betas is None else list(trained_betas),
                "rescale_betas_zero_snr": rescale_betas_zero_snr,
            }
        )

    @staticmethod
    def _derived_keys(resolved: Mapping[str, Any]) -> dict[str, Any]:
        clean = resolved["final"] == "clean"
        spacing = resolved["timestep_spacing"]
        noise_prediction = resolved["solver"] in _NOISE_PREDICTION_SOLVERS
        derived: dict[str, Any] = {
            "set_alpha_to_one": clean,
            # diffusers' DPM-Solver schedulers refuse final_sigmas_type "zero" with noise
            # prediction (algorithm_type "dpmsolver"); their only legal final sigma is sigma_min
            "final_sigmas_type": "zero" if clean and not noise_prediction else "sigma_min",
            "clip_sample": False,
            "thresholding": False,
            "use_karras_sigmas": spacing == "karras",
            "use_lu_lambdas": spacing == "logsnr_uniform",
            "use_exponential_sigmas": False,
            "use_beta_sigmas": spacing == "beta",
            "use_flow_sigmas": resolved["prediction_type"] == "flow_prediction",
            "flow_shift": resolved["shift"],
        }
        if resolved["solver"] in _SOLVER_ORDER:
            derived["solver_order"] = _SOLVER_ORDER[resolved["solver"]]
        elif resolved["solver"].startswith("unipc"):
            derived["solver_order"] = int(resolved["solver_kwargs"].get("order", 2))
            derived["solver_type"] = resolved["solver"].removeprefix("unipc_")
        if resolved["solver"].startswith("dpm_solver_pp"):
            derived["algorithm_type"] = "dpmsolver++"
        elif resolved["solver"] != "dpm_solver_1" and resolved["solver"].startswith("dpm_solver"):
            derived["algorithm_type"] = "dpmsolver"
        return derived

    def _option(self, key: str, default: Any = None) -> Any:
        """A diffusers key of this scheduler's config (given or derived)."""
        value = self._options.get(key, default)
        return default if value is None else value

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs
    ) -> Any:
        """Like ``ConfigMixin.from_config``; the diffusers keys of the config (every key of
        :data:`~stepsearch.integrations.diffusers_keys.RULES`) reach ``__init__``, which
        implements, refuses or warns about each, exactly as when they are passed directly."""
        if config is None:
            raise ValueError("from_config needs a config")
        config = dict(config)
        if config.get("_class_name") == cls.__name__:
            # our own config: every value in it is what was resolved, defaults included
            config.pop("_use_default_values", None)
        if "solver" in config or (cls is not StepsearchScheduler and "solver" in kwargs):
            for key in _DERIVED_KEYS:  # ours, written for diffusers: recomputed, not read back
                config.pop(key, None)
        else:
            class_name = _diffusers_class_name(config)
            if class_name and "_class_name" not in config:
                config["_class_name"] = class_name
        for key in DIFFUSERS_KEYS:
            if key in config and key not in kwargs:
                kwargs[key] = config.pop(key)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _final_key(cls) -> str | None:
        """The diffusers key for the final step that the class's namesake reads (any, for the
        generic class)."""
        if cls is StepsearchScheduler:
            return None
        return "set_alpha_to_one" if cls._grid_convention == "ddim" else "final_sigmas_type"

    @classmethod
    def _solver_from_diffusers_config(
        cls, config: Mapping[str, Any], class_name: str | None = None
    ) -> str | None:
        """The solver a diffusers config asks for; ``None`` keeps the class default. The generic
        class follows the config's scheduler; subclasses keep their own solver."""
        return _solver_from_diffusers(config, class_name) if cls is StepsearchScheduler else None

    @classmethod
    def from_step_schedule(
        cls, schedule: StepSchedule, solver: str | None = None, **config: Any
    ) -> StepsearchScheduler:
        """A scheduler that replays ``schedule`` (stored as ``custom_times``) on its noise
        schedule (a :class:`DiscreteVP` or :class:`FlowMatching`); ``config`` adds other keys
        (``prediction_type``, ``solver_kwargs``, ...)."""
        noise = schedule.noise
        if isinstance(noise, DiscreteVP):
            params = noise.to_config()
            params.pop("kind")
            if "alphas_cumprod" in params:
                ac = np.asarray(params.pop("alphas_cumprod"))
                params["trained_betas"] = (1.0 - ac / np.concatenate([[1.0], ac[:-1]])).tolist()
        elif isinstance(noise, FlowMatching):
            given = str(config.pop("prediction_type", "flow_prediction"))
            if PREDICTION_TYPE_ALIASES.get(given, given) != "flow":
                raise ValueError(
                    f"a flow-matching schedule needs prediction_type 'flow_prediction', got {given!r}"
                )
            params = {
                "prediction_type": "flow_prediction",
                "shift": noise.shift,
                "num_train_timesteps": noise.num_train_timesteps,
            }
        else:
            raise ValueError(
                f"diffusers schedulers need a DiscreteVP or FlowMatching schedule, got {noise!r}"
            )
        if solver is not None:
            config["solver"] = solver
        scheduler = cls(custom_times=schedule.times.tolist(), **params, **config)
        if not np.allclose(
            scheduler._noise.alpha(schedule.times), noise.alpha(schedule.times), rtol=1e-9
        ):
            raise ValueError("the scheduler's noise schedule does not reproduce the schedule's")
        return scheduler

    # read-only views ------------------------------------------------------------------------
    @property
    def noise(self) -> NoiseSchedule:
        """The noise schedule built from the config."""
        return self._noise

    @property
    def solver(self) -> Solver:
        return self._solver

    @property
    def schedule(self) -> StepSchedule | None:
        """The step schedule of the last ``set_timesteps`` (``None`` before)."""
        return self._schedule

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next evaluation (``None`` before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First evaluation index of a run, set by :meth:`set_begin_index` (img2img)."""
        return self._begin_index

    @property
    def order(self) -> int:  # type: ignore[override]
        """Model evaluations per schedule step when that is constant (Heun: 2), else 1. Pipelines
        skip ``order`` entries of ``timesteps`` per step of img2img strength."""
        if self._order is None:
            self._order = 1
            if self._schedule is not None:
                starts = self._step_starts()
                for width in range(2, 5):
                    if all(starts.get(width * k) == k for k in range(self._schedule.num_steps)):
                        self._order = width
                        break
        return self._order

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    # set_timesteps --------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: ArrayLike | torch.Tensor | None = None,
        sigmas: ArrayLike | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the step schedule and reset the run state.

        One of ``num_inference_steps`` (a grid from ``timestep_spacing`` or the stored
        ``custom_times``), ``timesteps`` (what the model is evaluated at, diffusers units, strictly
        decreasing; the final target is ``config.final``) or ``sigmas`` (see the module docstring)
        may be given; flow models accept ``sigmas`` and ``timesteps`` together when they agree.
        With none, ``custom_times`` is used as stored. ``mu`` (flow models) is the dynamic shift
        (``use_dynamic_shifting``, ``time_shift_type``); the shift is applied once: to the grid or
        to ``sigmas``, never to ``timesteps`` (those are the model's times already).
        """
        flow = isinstance(self._noise, FlowMatching)
        if timesteps is not None and sigmas is not None and not flow:
            raise ValueError("pass only one of `timesteps` or `sigmas`")
        given = timesteps if timesteps is not None else sigmas
        if num_inference_steps is not None and given is not None:
            if len(given) != int(num_inference_steps):
                raise ValueError(
                    f"num_inference_steps = {num_inference_steps} but {len(given)} timesteps/sigmas"
                )
            num_inference_steps = None
        if mu is not None and not flow:
            raise ValueError("`mu` (dynamic shifting) only applies to flow models")
        shift = self._flow_shift(mu) if flow else None
        if sigmas is not None:
            schedule = self._schedule_from_sigmas(sigmas, shift)
            if timesteps is not None:
                self._check_agree(schedule, timesteps)
        elif timesteps is not None:
            schedule = self._schedule_from_timesteps(timesteps)
        elif num_inference_steps is not None:
            schedule = self._schedule_from_spacing(num_inference_steps, shift)
        elif self.config.custom_times is not None:
            schedule = StepSchedule(np.asarray(self.config.custom_times), self._noise)
        else:
            raise ValueError("pass `num_inference_steps`, `timesteps` or `sigmas`")
        self.set_schedule(schedule, device=device)

    def _flow_shift(self, mu: float | None) -> Callable[[FloatArray], FloatArray]:
        """The flow shift of this call: ``mu`` with ``time_shift_type`` (required when
        ``use_dynamic_shifting``), else the config's ``shift``; then ``shift_terminal``."""
        kind = self._option("time_shift_type", "exponential")
        if self._option("use_dynamic_shifting", False) and mu is None:
            raise ValueError("`mu` must be passed to set_timesteps when use_dynamic_shifting=True")
        terminal = self._option("shift_terminal")

        def shifted(u: FloatArray) -> FloatArray:
            if mu is not None:
                t = np.asarray(dynamic_flow_shift(u, float(mu), kind))
            else:
                t = np.asarray(flow_shift(u, self._noise.shift))
            return stretch_to_terminal(t, float(terminal)) if terminal else t

        return shifted

    def _check_agree(self, schedule: StepSchedule, timesteps: ArrayLike | torch.Tensor) -> None:
        given = self._as_float_array(timesteps)
        expected = np.asarray(self._noise.model_time(schedule.times[: given.size]))
        if given.shape != expected.shape or not np.allclose(given, expected, atol=1e-2):
            raise ValueError(
                "`timesteps` and `sigmas` disagree: the shifted sigmas give timesteps "
                f"{np.array2string(expected, precision=3, threshold=8)}, got "
                f"{np.array2string(given, precision=3, threshold=8)}"
            )

    def set_schedule(
        self, schedule: StepSchedule, device: str | torch.device | None = None
    ) -> None:
        """Use ``schedule`` directly (on this scheduler's noise schedule) and reset the run state."""
        if schedule.noise != self._noise and not np.allclose(
            schedule.noise.alpha(schedule.times), self._noise.alpha(schedule.times), rtol=1e-9
        ):
            raise ValueError("the schedule lives on a different noise schedule than the config's")
        evaluation_times = np.asarray(self._solver.evaluation_times(schedule), dtype=np.float64)
        model_times = np.asarray(self._noise.model_time(evaluation_times), dtype=np.float64)
        rounded = np.rint(model_times)
        if np.all(np.abs(model_times - rounded) <= 1e-6):
            timesteps = torch.from_numpy(rounded.astype(np.int64))
        else:
            timesteps = torch.from_numpy(model_times.astype(np.float32))
        self.timesteps = timesteps.to(device) if device is not None else timesteps
        self.sigmas = torch.from_numpy(self._pipeline_sigmas(schedule).astype(np.float32))
        self.num_inference_steps = schedule.num_steps
        self._schedule = schedule
        self._evaluation_times = evaluation_times
        self._model_times = model_times
        self._coefficients = self._x0_coefficients(evaluation_times)
        self.init_noise_sigma = self._initial_noise_sigma(schedule)
        self._reset_run_state()

    def _initial_noise_sigma(self, schedule: StepSchedule) -> float:
        """What pipelines scale the unit latent noise by: 1 (``x_T = eps`` in x-space), except
        where the twin is ``EulerDiscreteScheduler`` / ``HeunDiscreteScheduler`` on ``linspace``
        or ``trailing`` spacing (or Karras / exponential / beta sigmas, which those classes use
        with their default ``linspace``): there diffusers starts at ``sigma~_max eps`` in ``x / alpha``
        space instead of ``sqrt(sigma~_max^2 + 1) eps``, which is ``sigma(t_0) eps`` in x-space
        (``alpha_0 sigma~_max = sigma_0``); the twin starts there too, so the same pipeline
        noise gives the same samples. A stored schedule (``custom_times``: a search's result)
        starts at ``eps``, as stepsearch sampled it when it was scored."""
        if self.config.custom_times is not None:
            return 1.0
        twin = TWINS.get(type(self).__name__) or _diffusers_class_name(self.config)
        sigma_max_start = twin in _SIGMA_MAX_START_TWINS
        if not sigma_max_start or isinstance(self._noise, FlowMatching):
            return 1.0
        # Karras / exponential / beta sigmas come with the classes' default linspace spacing
        if self.config.timestep_spacing not in ("linspace", "trailing", *_SIGMA_SPACINGS):
            return 1.0
        return float(self._noise.sigma(np.asarray([schedule.times[0]]))[0])

    def _pipeline_sigmas(self, schedule: StepSchedule) -> FloatArray:
        if isinstance(self._noise, FlowMatching):
            return schedule.times.copy()
        return schedule.to_kdiffusion_sigmas()

    def _reset_run_state(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._run_start = 0
        self._state: SolverState | None = None
        self._starts: dict[int, int] | None = None
        self._order: int | None = None

    def _x0_coefficients(self, evaluation_times: FloatArray) -> list[tuple[float, float]]:
        """``x0_hat = c_x x + c_out output`` per evaluation, read off the core conversion
        (:func:`stepsearch.denoiser.x0_from_model_output` is linear in ``x`` and ``output``)."""
        times = torch.from_numpy(evaluation_times)
        ones, zeros = torch.ones_like(times), torch.zeros_like(times)
        prediction = self.config.prediction_type
        core_type = "flow" if prediction == "flow_prediction" else prediction
        c_x = x0_from_model_output(self._noise, ones, times, zeros, core_type)
        c_out = x0_from_model_output(self._noise, zeros, times, ones, core_type)
        return list(zip(c_x.tolist(), c_out.tolist(), strict=True))

    def _check_num_steps(self, num_inference_steps: int) -> int:
        total = int(self.config.num_train_timesteps)
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) != num_inference_steps:
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        if not 1 <= n <= total:
            raise ValueError(
                f"num_inference_steps must lie in 1 .. num_train_timesteps = {total}, got {n}"
            )
        return n

    def _schedule_from_spacing(
        self, num_inference_steps: int, shift: Callable[[FloatArray], FloatArray] | None
    ) -> StepSchedule:
        n = self._check_num_steps(num_inference_steps)
        config = self.config
        if config.custom_times is not None:
            stored = StepSchedule(np.asarray(config.custom_times), self._noise)
            if stored.num_steps == n:
                return stored
            if self._warned_resample != (stored.num_steps, n):
                self._warned_resample = (stored.num_steps, n)
                logger.warning(
                    "%s holds a fitted %d-step schedule and was asked for %d steps: resampling it "
                    "by log-linear interpolation of sigma (pass num_inference_steps=%d to run it "
                    "as fitted)", type(self).__name__, stored.num_steps, n, stored.num_steps,
                )  # fmt: skip
            return loglinear_interpolate(stored, n)
        spacing = config.timestep_spacing
        if isinstance(self._noise, FlowMatching):
            assert shift is not None
            schedule = self._flow_schedule(n, spacing, shift)
        elif spacing in DIFFUSERS_SPACINGS:
            offset = int(config.steps_offset)
            grid = diffusers_timesteps(
                self._grid_convention, spacing, n, config.num_train_timesteps, offset
            )
            schedule = self._wrap_errors(
                "timesteps",
                grid,
                lambda: StepSchedule.from_diffusers_timesteps(
                    self._noise, grid, "clean", spacing=spacing, steps_offset=offset
                ),
            )
        elif spacing in ("karras", "beta") or (
            spacing == "logsnr_uniform" and self._option("use_exponential_sigmas", False)
        ):
            kind = spacing if spacing in ("karras", "beta") else "exponential"
            schedule = self._sigma_schedule(n, kind)
        else:
            schedule = make_schedule(self._noise, n, spacing)
        return self._with_final(schedule)

    def _sigma_range(
        self, high: float, low: float, kind: str, bounds: tuple[float, float]
    ) -> tuple[float, float]:
        """``sigma_max`` / ``sigma_min`` from the config where given (Euler, UniPC), else the
        ends of the grid being converted (``high``, ``low``). A given value outside the model's
        range ``bounds`` (k-diffusion sigma; flow time for flow matching), which no time on the
        model's axis reaches, is a ``ValueError`` naming the option and both ranges."""
        option = {"karras": "use_karras_sigmas", "beta": "use_beta_sigmas"}.get(
            kind, "use_exponential_sigmas"
        )
        unit = "flow time" if isinstance(self._noise, FlowMatching) else "k-diffusion sigma"
        lowest, highest = bounds
        chosen = {"sigma_max": high, "sigma_min": low}
        for key in chosen:
            given = self._option(key)
            if given is None:
                continue
            value = float(given)
            if not lowest * (1 - 1e-5) <= value <= highest * (1 + 1e-5):
                raise ValueError(
                    f"{key}={value:.6g} (with {option}) lies outside the model's {unit} range "
                    f"[{lowest:.6g}, {highest:.6g}]: stepsearch evaluates the model only at "
                    f"times it was trained on; set {key} inside that range or leave it unset"
                )
            chosen[key] = min(max(value, lowest), highest)
        if not chosen["sigma_min"] < chosen["sigma_max"]:
            raise ValueError(
                f"sigma_min={chosen['sigma_min']:.6g} must lie below sigma_max="
                f"{chosen['sigma_max']:.6g} (with {option}; the model's {unit} range "
                f"[{lowest:.6g}, {highest:.6g}])"
            )
        return chosen["sigma_max"], chosen["sigma_min"]

    def _sigma_schedule(self, n: int, kind: str) -> StepSchedule:
        """Karras / exponential / beta sigmas over the trained range (diffusers' rule: ``n``
        evaluation sigmas from ``sigma_max`` to ``sigma_min``, then the final step)."""
        noise = self._noise
        trained = (
            float(noise.kdiffusion_sigma(noise.t_min)),
            float(noise.kdiffusion_sigma(noise.t_max)),
        )
        high, low = self._sigma_range(trained[1], trained[0], kind, trained)
        sigmas = np.append(sigma_spacing(kind, high, low, n), 0.0)
        return StepSchedule.from_kdiffusion_sigmas(noise, sigmas, spacing=kind, clip_to_range=True)

    def _flow_schedule(
        self, n: int, spacing: str, shift: Callable[[FloatArray], FloatArray]
    ) -> StepSchedule:
        """The flow grid of the twin: FlowMatchEulerDiscreteScheduler's (``n`` points of
        ``linspace(1, u_end)``, ``u_end = shift(1/N)`` for a static shift as diffusers does,
        ``1/N`` with ``mu``) or, for DPM-Solver / UniPC flow configs, ``n`` of ``n + 1`` points of
        ``linspace(1 - 1/N, 0)``; shifted once; Karras / exponential / beta sigmas are then taken
        over the shifted range in flow time (not in k-diffusion sigma, which is infinite at
        ``t = 1``)."""
        noise = self._noise
        assert isinstance(noise, FlowMatching)
        total = noise.num_train_timesteps
        if spacing not in (*DIFFUSERS_SPACINGS, "flow_shifted", "karras", "beta", "logsnr_uniform"):
            return make_schedule(noise, n, spacing)
        if self._grid_convention == "dpm":
            u = np.linspace(1.0 - 1.0 / total, 0.0, n + 1)[:-1]
        else:
            dynamic = self._option("use_dynamic_shifting", False)
            end = 1.0 / total if dynamic else float(flow_shift(1.0 / total, noise.shift))
            u = np.linspace(1.0, end, n)
        times = shift(u)
        kind = {"karras": "karras", "beta": "beta", "logsnr_uniform": "exponential"}.get(spacing)
        if kind is not None:
            bounds = (float(noise.t_min), float(noise.t_max))
            high, low = self._sigma_range(float(times[0]), float(times[-1]), kind, bounds)
            times = sigma_spacing(kind, high, low, n)
        metadata = {"spacing": spacing if kind else "flow_shifted"}
        return StepSchedule(np.append(times, 0.0), noise, metadata)

    def _with_final(self, schedule: StepSchedule) -> StepSchedule:
        """Replace a clean end by ``t_min`` when ``final == "t_min"`` (dropping the last step
        when it already ends at ``t_min``)."""
        if self.config.final == "clean" or not schedule.ends_clean:
            return schedule
        noisy = schedule.times[:-1]
        t_min = self._noise.t_min
        if noisy[-1] <= t_min * (1 + 1e-9):
            if noisy.size < 2:
                raise ValueError("a one-step schedule at t_min cannot end at t_min")
            return StepSchedule(noisy, self._noise, schedule.metadata)
        return StepSchedule(np.append(noisy, t_min), self._noise, schedule.metadata)

    @staticmethod
    def _as_float_array(values: ArrayLike | torch.Tensor) -> FloatArray:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().double().numpy()
        return np.asarray(values, dtype=np.float64)

    @staticmethod
    def _wrap_errors(
        what: str, values: ArrayLike, build: Callable[[], StepSchedule]
    ) -> StepSchedule:
        try:
            return build()
        except ValueError as error:
            shown = np.array2string(np.asarray(values), precision=4, separator=", ", threshold=12)
            raise ValueError(f"invalid {what} {shown}: {error}") from None

    def _schedule_from_timesteps(self, timesteps: ArrayLike | torch.Tensor) -> StepSchedule:
        """The schedule whose model evaluations are ``timesteps``: for solvers that evaluate
        ``k`` times per step (Heun, singlestep DPM-Solver) every ``k``-th entry starts a step and
        the others must be where the solver puts its intermediate evaluations (so timesteps read
        back from a scheduler replay its run exactly). A list that is no solver's evaluations is
        taken as the grid of step starts (one warning: ``timesteps`` then grows)."""
        values = self._as_float_array(timesteps)
        noise = self._noise

        def grid(starts: FloatArray) -> StepSchedule:
            end = 0.0 if self.config.final == "clean" else noise.t_min
            times = np.asarray(noise.t_from_model_time(starts))
            if times[-1] <= end:
                raise ValueError("the last timestep is at or below the final target")
            return StepSchedule(np.append(times, end), noise, {"spacing": "custom_timesteps"})

        def build() -> StepSchedule:
            if values.ndim != 1 or values.size < 1:
                raise ValueError("timesteps must be a non-empty 1-D list")
            highest, lowest = noise.model_time(noise.t_max), noise.model_time(noise.t_min)
            if not np.isfinite(values).all():
                raise ValueError("timesteps must be finite")
            if values.min() < lowest - 1e-9 or values.max() > highest + 1e-9:
                raise ValueError(f"timesteps must lie in [{lowest:g}, {highest:g}]")
            for width in range(1, 5):
                try:
                    candidate = grid(values[::width])
                except ValueError:
                    continue
                evaluations = np.asarray(self._solver.evaluation_times(candidate))
                model_times = np.asarray(noise.model_time(evaluations))
                if model_times.shape == values.shape and np.allclose(
                    model_times, values, rtol=0, atol=_TIMESTEP_TOLERANCE
                ):
                    return candidate
            schedule = grid(values)
            logger.warning(
                "timesteps %s are not the evaluations of solver %r on any grid; using them as "
                "the grid of step starts (%d model evaluations)",
                np.array2string(values, precision=1, threshold=8), self.config.solver,
                len(self._solver.evaluation_times(schedule)),
            )  # fmt: skip
            return schedule

        return self._wrap_errors("timesteps", values, build)

    def _schedule_from_sigmas(
        self,
        sigmas: ArrayLike | torch.Tensor,
        shift: Callable[[FloatArray], FloatArray] | None,
    ) -> StepSchedule:
        values = self._as_float_array(sigmas)

        def build() -> StepSchedule:
            if values.ndim != 1 or values.size < 1:
                raise ValueError("sigmas must be a non-empty 1-D list")
            if isinstance(self._noise, FlowMatching):
                assert shift is not None
                noisy = values[values > 0]
                times = shift(noisy)
                end = 0.0 if self.config.final == "clean" else self._noise.t_min
                return StepSchedule(
                    np.append(times, end), self._noise, {"spacing": "custom_sigmas"}
                )
            if values.size < 2:
                raise ValueError("k-diffusion sigmas list the whole grid, including its end")
            return StepSchedule.from_kdiffusion_sigmas(self._noise, values, spacing="custom_sigmas")

        return self._wrap_errors("sigmas", values, build)

    # img2img ------------------------------------------------------------------------------
    def _step_starts(self) -> dict[int, int]:
        """``{evaluation index: schedule step}`` for every step a run can start at: where the
        solver's evaluations on ``times[k:]`` are exactly the tail of the full run's."""
        if self._starts is None:
            schedule = self._require_schedule()
            full = self._evaluation_times
            starts = {0: 0}
            for k in range(1, schedule.num_steps):
                tail = StepSchedule(schedule.times[k:], self._noise)
                times = np.asarray(self._solver.evaluation_times(tail))
                begin = full.size - times.size
                if begin > 0 and np.allclose(full[begin:], times, rtol=1e-12, atol=1e-15):
                    starts[begin] = k
            self._starts = starts
        return self._starts

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at evaluation ``begin_index`` (img2img); the solver starts afresh
        on the rest of the schedule. Must be the first evaluation of a schedule step."""
        self._require_schedule()
        begin_index = int(begin_index)
        if not 0 <= begin_index < len(self._evaluation_times):
            raise ValueError(
                f"begin_index {begin_index} outside 0 .. {len(self._evaluation_times) - 1}"
            )
        if begin_index not in self._step_starts():
            raise ValueError(
                f"begin_index {begin_index} is not the first evaluation of a step of solver "
                f"{self._solver!r} (valid: {sorted(self._step_starts())}). A run starting "
                "mid-schedule restarts the solver, and img2img pipelines skip `order` evaluations "
                "per step, so the solver needs the same evaluations per step throughout (PNDM: "
                "solver_kwargs={'warmup': 'lower_order'}, which Stable Diffusion's "
                "skip_prk_steps=True selects)"
            )
        self._begin_index = begin_index
        self._step_index = None
        self._state = None

    # step ------------------------------------------------------------------------------------
    def _require_schedule(self) -> StepSchedule:
        if self._schedule is None:
            raise RuntimeError("call `set_timesteps` before `step`")
        return self._schedule

    @staticmethod
    def _timestep_value(timestep: float | int | torch.Tensor) -> float:
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                flat = timestep.reshape(-1)
                if not bool((flat == flat[0]).all()):
                    raise ValueError("all samples of a batch must share the timestep")
                timestep = flat[0]
            return float(timestep.item())
        return float(timestep)

    def _matches(self, value: float, index: int) -> bool:
        return abs(value - self._model_times.item(index)) <= _TIMESTEP_TOLERANCE

    def _start_run(self, value: float, sample: torch.Tensor) -> None:
        start = self._begin_index
        if start is None:
            if self._matches(value, 0):
                start = 0
            else:
                found = [b for b in sorted(self._step_starts()) if self._matches(value, b)]
                if not found:
                    raise ValueError(
                        f"timestep {value!r} is not in the schedule {self._shown_timesteps()}"
                    )
                start = found[0]
        if not self._matches(value, start):
            raise ValueError(
                f"timestep {value!r} is not the first timestep "
                f"{float(self._model_times[start])!r} of the run (index {start})"
            )
        schedule = self._require_schedule()
        if start:
            k = self._step_starts()[start]
            schedule = StepSchedule(schedule.times[k:], self._noise, schedule.metadata)
        state = self._solver.init(sample, schedule)
        expected = self._evaluation_times[start:]
        if state.evaluation_times.shape != expected.shape or not np.allclose(
            state.evaluation_times, expected, rtol=1e-12, atol=1e-15
        ):
            raise RuntimeError(
                f"solver {self.config.solver!r}: init() and evaluation_times() disagree"
            )
        self._state = state
        self._run_start = start
        self._step_index = start

    def _shown_timesteps(self) -> str:
        return np.array2string(self._model_times, precision=3, separator=", ", threshold=12)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> StepsearchSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Advance one model evaluation: ``sample`` was fed to the model at ``timestep`` (the
        next entry of ``timesteps``), ``model_output`` is its raw output. Returns the next
        sample (the final one after the last evaluation) and the ``x0`` estimate."""
        # diffusers' eta, variance_noise, ...: the solver decides
        use_clipped_model_output = bool(kwargs.get("use_clipped_model_output"))
        value = self._timestep_value(timestep)
        if self._step_index is None or self._step_index >= len(self._evaluation_times):
            self._require_schedule()
            self._start_run(value, sample)
        i = self._step_index
        assert i is not None and self._state is not None
        if not self._matches(value, i):
            raise ValueError(
                f"timestep {value!r} is not the next timestep of the schedule: expected "
                f"{float(self._model_times[i])!r} at index {i} of {self._shown_timesteps()}; "
                "call `set_timesteps` to start over"
            )
        dtype = sample.dtype
        compute = compute_dtype(dtype)
        x = sample if dtype == compute else sample.to(compute)
        output = model_output if model_output.dtype == compute else model_output.to(compute)
        c_x, c_out = self._coefficients[i]
        if c_x == 0.0:
            denoised = output if c_out == 1.0 else output * c_out
        elif c_x == 1.0:
            denoised = torch.add(x, output, alpha=c_out)
        else:  # c_x (x + (c_out / c_x) output): one allocation, two kernels
            denoised = torch.add(x, output, alpha=c_out / c_x).mul_(c_x)
        processed = self._postprocess_x0(denoised) if self._processes_x0 else denoised
        solver_input = processed
        if processed is not denoised and not use_clipped_model_output:
            solver_input = self._keep_model_noise(denoised, processed, i - self._run_start)
        x_next, self._state = self._solver.step(
            self._state, x, solver_input, i - self._run_start, generator=generator
        )
        denoised = processed
        self._step_index = i + 1
        if x_next.dtype != dtype:
            x_next, denoised = x_next.to(dtype), denoised.to(dtype)
        if not return_dict:
            return (x_next, denoised)
        return StepsearchSchedulerOutput(prev_sample=x_next, pred_original_sample=denoised)

    def _postprocess_x0(self, denoised: torch.Tensor) -> torch.Tensor:
        """diffusers' x0 post-processing, applied at the edge before the solver sees ``x0``:
        dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3: per sample, ``s`` = the
        ``dynamic_thresholding_ratio`` quantile of ``|x0|``, clamped to ``[1,
        sample_max_value]``; ``x0 = clamp(x0, -s, s) / s``), else ``clip_sample`` (clamp to
        ``clip_sample_range``)."""
        if self._option("thresholding", False):
            flat = denoised.reshape(denoised.shape[0], -1)
            ratio = float(self._option("dynamic_thresholding_ratio", 0.995))
            scale = torch.quantile(flat.abs().float(), ratio, dim=1).to(flat.dtype)
            scale = scale.clamp(min=1.0, max=float(self._option("sample_max_value", 1.0)))
            scale = scale.reshape(-1, *([1] * (denoised.ndim - 1)))
            return torch.maximum(torch.minimum(denoised, scale), -scale) / scale
        if self._option("clip_sample", False):
            bound = float(self._option("clip_sample_range", 1.0))
            return denoised.clamp(-bound, bound)
        return denoised

    def _keep_model_noise(self, raw: torch.Tensor, processed: torch.Tensor, i: int) -> torch.Tensor:
        """The ``x0`` to give the DDIM solver so that its step is diffusers' ``DDIMScheduler``
        step with a clipped / thresholded ``x0`` (``use_clipped_model_output=False``, the
        default): DDIM's eq. 12 with the clipped ``x0`` in the data term but the model's own
        ``eps`` in the direction term. The solver's step ``x_s = d x_t + (alpha_s - d alpha_t)
        x0`` (``d`` = the direction coefficient over ``sigma_t``) is linear in ``x0``, so
        ``x0 = (alpha_s processed - d alpha_t raw) / (alpha_s - d alpha_t)`` reproduces it.
        Other solvers (and DDPM, Heun, DPM-Solver, UniPC in diffusers) re-derive ``eps`` from
        the processed ``x0``: it is passed on unchanged."""
        if not self._keeps_model_noise:
            return processed
        assert self._state is not None
        solver = self._solver
        if not isinstance(solver, DDIM):
            return processed
        now, target = self._state.level(i), self._state.target_level(i)
        if target.is_clean:
            return processed
        d = solver.direction_std(now, target) / now.sigma
        data_weight = target.alpha - d * now.alpha
        return (processed * target.alpha - raw * (d * now.alpha)) / data_weight

    # helpers for pipelines -----------------------------------------------------------------
    def scale_model_input(
        self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The identity: stepsearch samples are already the model's input (x-space)."""
        return sample

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: float | int | torch.Tensor,
    ) -> torch.Tensor:
        """``alpha(t) x0 + sigma(t) noise`` at diffusers timesteps (one, or one per sample)."""
        times = np.asarray(self._noise.t_from_model_time(self._as_float_array(timesteps)))
        dtype = original_samples.dtype
        x0 = original_samples.to(compute_dtype(dtype))
        alpha = per_sample(np.asarray(self._noise.alpha(times)), x0)
        sigma = per_sample(np.asarray(self._noise.sigma(times)), x0)
        return (alpha * x0 + sigma * noise.to(x0.dtype)).to(dtype)


# --------------------------------------------------------------------------------------------
# one thin subclass per solver
# --------------------------------------------------------------------------------------------


class StepsearchDDIMScheduler(StepsearchScheduler):
    """DDIM (Song et al. 2021, eta = 0) on DDIMScheduler's ``leading`` grid."""

    _default_solver = "ddim"
    _default_spacing = "leading"
    _grid_convention = "ddim"


class StepsearchPNDMScheduler(StepsearchScheduler):
    """Pseudo linear multistep (Liu et al. 2022), variable-step, on PNDMScheduler's grid.

    The closest method to ``PNDMScheduler``, not parity (see :attr:`closest_method`; warned once)."""

    _default_solver = "pndm"
    _default_spacing = "leading"
    _grid_convention = "ddim"
    closest_method = (
        "closest method, not parity with PNDMScheduler: stepsearch's PLMS uses variable-step "
        "Adams-Bashforth weights on the grid as given; diffusers hard-codes the uniform-step "
        "weights and, with skip_prk_steps=True, evaluates one timestep twice, so timesteps and "
        "samples differ"
    )


_SINGLESTEP_CLOSEST_METHOD = (
    "closest method, not parity with DPMSolverSinglestepScheduler: diffusers spends one "
    "model evaluation per grid timestep (a 2nd/3rd-order step spans 2/3 grid intervals and "
    "uses the grid points inside as its intermediate evaluations; orders from "
    "get_order_list); stepsearch takes a full singlestep step on every grid interval, with "
    "its own intermediate evaluations (2n-1 / 3n-2 evaluations for n steps), so timesteps, "
    "cost and samples differ"
)
"""Why the singlestep drop-ins (DPM-Solver-2 / -3, DPM-Solver++(2S)) are not DPMSolverSinglestep
parity (warned once by each)."""


class StepsearchDPMSolver1Scheduler(StepsearchScheduler):
    """DPM-Solver-1 (Lu et al. 2022; equal to DDIM) on DPMSolverMultistepScheduler's grid."""

    _default_solver = "dpm_solver_1"


class StepsearchDPMSolver2Scheduler(StepsearchScheduler):
    """Singlestep DPM-Solver-2 (noise prediction; two evaluations per step).

    The closest method to ``DPMSolverSinglestepScheduler``, not parity (see
    :attr:`closest_method`; warned once)."""

    _default_solver = "dpm_solver_2"

    closest_method = _SINGLESTEP_CLOSEST_METHOD


class StepsearchDPMSolver3Scheduler(StepsearchScheduler):
    """Singlestep DPM-Solver-3 (noise prediction; three evaluations per step).

    The closest method to ``DPMSolverSinglestepScheduler``, not parity (see
    :attr:`closest_method`; warned once)."""

    _default_solver = "dpm_solver_3"

    closest_method = _SINGLESTEP_CLOSEST_METHOD


class StepsearchDPMSolverMultistepScheduler(StepsearchScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022b); ``solver_order: 3`` in a diffusers config picks 3M."""

    _default_solver = "dpm_solver_pp_2m"

    @classmethod
    def _solver_from_diffusers_config(
        cls, config: Mapping[str, Any], class_name: str | None = None
    ) -> str | None:
        return _solver_from_diffusers(config, "DPMSolverMultistepScheduler")


class StepsearchDPMSolverPP3MScheduler(StepsearchScheduler):
    """DPM-Solver++(3M) on DPMSolverMultistepScheduler's grid."""

    _default_solver = "dpm_solver_pp_3m"


class StepsearchDPMSolverSinglestepScheduler(StepsearchScheduler):
    """DPM-Solver++(2S), singlestep data prediction (two evaluations per step).

    The closest method to ``DPMSolverSinglestepScheduler``, not parity (see
    :attr:`closest_method`; warned once)."""

    _default_solver = "dpm_solver_pp_2s"

    closest_method = _SINGLESTEP_CLOSEST_METHOD

    @classmethod
    def _solver_from_diffusers_config(
        cls, config: Mapping[str, Any], class_name: str | None = None
    ) -> str | None:
        return _solver_from_diffusers(config, "DPMSolverSinglestepScheduler")


class StepsearchUniPCMultistepScheduler(StepsearchScheduler):
    """UniPC (Zhao et al. 2023), B(h) = expm1(h) ("bh2", diffusers' default)."""

    _default_solver = "unipc_bh2"

    @classmethod
    def _solver_from_diffusers_config(
        cls, config: Mapping[str, Any], class_name: str | None = None
    ) -> str | None:
        return _solver_from_diffusers(config, "UniPCMultistepScheduler")


class StepsearchUniPCBH1Scheduler(StepsearchScheduler):
    """UniPC with B(h) = h ("bh1")."""

    _default_solver = "unipc_bh1"


class StepsearchEulerDiscreteScheduler(StepsearchScheduler):
    """Euler in k-diffusion sigma (Karras et al. 2022) on EulerDiscreteScheduler's grid."""

    _default_solver = "euler"
    _grid_convention = "euler"


class StepsearchHeunDiscreteScheduler(StepsearchScheduler):
    """Heun (Karras et al. 2022, Alg. 1; two evaluations per step) on HeunDiscreteScheduler's
    grid."""

    _default_solver = "heun"
    _grid_convention = "euler"


class StepsearchFlowMatchEulerDiscreteScheduler(StepsearchScheduler):
    """Euler on flow matching (SD3, Flux, Wan) with FlowMatchEulerDiscreteScheduler's grid:
    ``shift``, ``use_dynamic_shifting`` with ``mu``, ``shift_terminal``, Karras / exponential /
    beta sigmas in flow time."""

    _default_solver = "euler"
    _default_prediction_type = "flow_prediction"
    _grid_convention = "euler"


FLOW_SCHEDULERS: dict[str, type[StepsearchScheduler]] = {
    "euler": StepsearchFlowMatchEulerDiscreteScheduler
}
"""Drop-in classes whose default noise is flow matching."""

SCHEDULERS: dict[str, type[StepsearchScheduler]] = {
    cls._default_solver: cls
    for cls in (
        StepsearchDDIMScheduler,
        StepsearchPNDMScheduler,
        StepsearchDPMSolver1Scheduler,
        StepsearchDPMSolver2Scheduler,
        StepsearchDPMSolver3Scheduler,
        StepsearchDPMSolverMultistepScheduler,
        StepsearchDPMSolverPP3MScheduler,
        StepsearchDPMSolverSinglestepScheduler,
        StepsearchUniPCMultistepScheduler,
        StepsearchUniPCBH1Scheduler,
        StepsearchEulerDiscreteScheduler,
        StepsearchHeunDiscreteScheduler,
    )
}
"""The drop-in class of each solver name."""


def scheduler_for_solver(solver: str) -> type[StepsearchScheduler]:
    """The drop-in scheduler class whose default is ``solver``."""
    try:
        return SCHEDULERS[solver]
    except KeyError:
        known = sorted(SCHEDULERS)
        raise ValueError(f"no scheduler class for solver {solver!r}; known: {known}") from None
