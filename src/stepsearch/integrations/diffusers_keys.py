"""What stepsearch's drop-in schedulers do with every diffusers scheduler config key.

Each key of each twin's ``__init__`` has a :class:`KeyRule`: the values stepsearch implements
exactly, and for the others either a ``ValueError`` naming key and value (``refused``) or one
warning with the same detail (``warned``: stepsearch deliberately computes something close but
not identical). :func:`check_options` applies the rules; :func:`key_table_markdown` writes the table
of ``docs/schedulers.md`` from the same data, so the table cannot drift from the code.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from stepsearch.solvers import SOLVERS

logger = logging.getLogger("stepsearch.integrations.diffusers")

TWINS: dict[str, str] = {
    "StepsearchDDIMScheduler": "DDIMScheduler",
    "StepsearchPNDMScheduler": "PNDMScheduler",
    "StepsearchDPMSolver1Scheduler": "DPMSolverMultistepScheduler",
    "StepsearchDPMSolver2Scheduler": "DPMSolverSinglestepScheduler",
    "StepsearchDPMSolver3Scheduler": "DPMSolverSinglestepScheduler",
    "StepsearchDPMSolverMultistepScheduler": "DPMSolverMultistepScheduler",
    "StepsearchDPMSolverPP3MScheduler": "DPMSolverMultistepScheduler",
    "StepsearchDPMSolverSinglestepScheduler": "DPMSolverSinglestepScheduler",
    "StepsearchUniPCMultistepScheduler": "UniPCMultistepScheduler",
    "StepsearchUniPCBH1Scheduler": "UniPCMultistepScheduler",
    "StepsearchEulerDiscreteScheduler": "EulerDiscreteScheduler",
    "StepsearchHeunDiscreteScheduler": "HeunDiscreteScheduler",
    "StepsearchFlowMatchEulerDiscreteScheduler": "FlowMatchEulerDiscreteScheduler",
}
"""The diffusers scheduler each drop-in class stands in for."""

Check = Callable[[Any, Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class KeyRule:
    """How one diffusers key is handled.

    Args:
        doc: what stepsearch does with the key (one line, for the docs table).
        check: ``(value, whole config) -> None`` when the value is implemented exactly, else the
            reason it is not (``None`` = every value is implemented).
        level: ``"refused"`` (``ValueError``) or ``"warned"`` (one warning) for the values
            ``check`` rejects.
    """

    doc: str
    check: Check | None = None
    level: str = "refused"

    @property
    def handling(self) -> str:
        return "implemented" if self.check is None else f"implemented; otherwise {self.level}"


def _only(*allowed: Any, why: str) -> Check:
    def check(value: Any, config: Mapping[str, Any]) -> str | None:
        return None if value in allowed else why

    return check


def _false(why: str) -> Check:
    return _only(False, None, why=why)


def _is_flow(config: Mapping[str, Any]) -> bool:
    return bool(config.get("use_flow_sigmas")) or config.get("prediction_type") in (
        "flow_prediction",
        "flow",
    )


def _sigma_spacing_check(value: Any, config: Mapping[str, Any]) -> str | None:
    if not value or _is_flow(config):
        return None
    return (
        "the model is evaluated at the exact (fractional) timestep of each sigma on stepsearch's "
        "continuous time axis; diffusers rounds it (DPM-Solver, UniPC) or interpolates log sigma "
        "over train steps (Euler, Heun), so samples differ slightly from the diffusers scheduler's"
    )


def _flow_sigmas_check(value: Any, config: Mapping[str, Any]) -> str | None:
    if not value:
        return None
    return (
        "the model sees the exact flow timestep t * num_train_timesteps; diffusers' multistep "
        "schedulers truncate it to an integer and keep `mu`'s shift for later calls"
    )


def _algorithm_check(value: Any, config: Mapping[str, Any]) -> str | None:
    if value in ("dpmsolver++", "deis", None):
        return None  # diffusers' DPM-Solver schedulers read "deis" (DEIS configs) as dpmsolver++
    if value == "dpmsolver":
        if config.get("_twin") == "DPMSolverSinglestepScheduler":
            return None  # singlestep DPM-Solver-2 / -3 (noise prediction)
        if {"dpm_solver_2m", "dpm_solver_3m"} <= set(SOLVERS):
            return None
        return "noise-prediction multistep DPM-Solver is not in this stepsearch's solver registry"
    return (
        "SDE variants (sde-dpmsolver, sde-dpmsolver++) are stochastic samplers, not ODE solvers; "
        "stepsearch implements the ODE solvers only"
    )


def _singlestep_order_check(value: Any, config: Mapping[str, Any]) -> str | None:
    singlestep = config.get("_twin") == "DPMSolverSinglestepScheduler"
    if singlestep and config.get("algorithm_type", "dpmsolver++") == "dpmsolver++" and value == 3:
        return "stepsearch has no singlestep DPM-Solver++(3S); use algorithm_type='dpmsolver'"
    return None if value in (1, 2, 3) else "solver_order must be 1, 2 or 3"


def _euler_at_final_check(value: Any, config: Mapping[str, Any]) -> str | None:
    if value and int(config.get("solver_order", 2)) == 3:
        return "a first-order last step without lowering the step before it is not expressible for 3M"
    return None


def _lambda_min_check(value: Any, config: Mapping[str, Any]) -> str | None:
    return None if value is None or value == -math.inf else "clipping the grid in lambda"


def _ddim_spacing_check(value: Any, config: Mapping[str, Any]) -> str | None:
    if value == "linspace" and config.get("_twin") == "DDIMScheduler":
        return (
            "DDIMScheduler steps from t to t - num_train_timesteps // N, which is not the next "
            "timestep of a linspace grid; stepsearch steps to the next timestep, so samples differ"
        )
    return None


_NOISE = "builds the DiscreteVP noise schedule (float64)"

RULES: dict[str, KeyRule] = {
    # noise schedule
    "num_train_timesteps": KeyRule(_NOISE + "; flow: the timestep scale t * N"),
    "beta_start": KeyRule(_NOISE),
    "beta_end": KeyRule(_NOISE),
    "beta_schedule": KeyRule(_NOISE + ": linear, scaled_linear, squaredcos_cap_v2, exp, sigmoid"),
    "trained_betas": KeyRule(_NOISE),
    "rescale_betas_zero_snr": KeyRule(_NOISE + " (zero terminal SNR, alpha_bar floor 2**-24)"),
    "prediction_type": KeyRule(
        "model output conversion to x0: epsilon, v_prediction, sample, flow_prediction",
        _only("epsilon", "v_prediction", "sample", "flow_prediction", "flow", why="unknown type"),
    ),
    # grids
    "timestep_spacing": KeyRule(
        "leading / linspace / trailing computed with the twin's arithmetic (or a stepsearch "
        "spacing); DDIM steps to the next grid timestep",
        _ddim_spacing_check,
        "warned",
    ),
    "steps_offset": KeyRule("added to leading timesteps"),
    "set_alpha_to_one": KeyRule("final step: True = to clean data, False = to the first trained step"),
    "final_sigmas_type": KeyRule(
        "final step: zero = clean data, sigma_min = the first trained step",
        _only("zero", "sigma_min", None, why="unknown final sigma type"),
    ),
    "use_karras_sigmas": KeyRule(
        "Karras et al. (rho 7) spacing over the trained (or sigma_min/max) range",
        _sigma_spacing_check,
        "warned",
    ),
    "use_exponential_sigmas": KeyRule(
        "uniform in log sigma (= uniform in lambda)", _sigma_spacing_check, "warned"
    ),
    "use_beta_sigmas": KeyRule("Beta(0.6, 0.6) spacing of sigma", _sigma_spacing_check, "warned"),
    "use_lu_lambdas": KeyRule("uniform in lambda (Lu et al.)", _sigma_spacing_check, "warned"),
    "sigma_min": KeyRule("lower end of the Karras / exponential / beta range"),
    "sigma_max": KeyRule("upper end of the Karras / exponential / beta range"),
    "lambda_min_clipped": KeyRule(
        "only the default (no clipping) is implemented", _lambda_min_check
    ),
    "interpolation_type": KeyRule(
        "linear: log alpha is interpolated linearly between trained steps (equal at trained steps)",
        _only("linear", None, why="log_linear sigma interpolation is not implemented"),
    ),
    "timestep_type": KeyRule(
        "discrete timesteps", _only("discrete", None, why="continuous (EDM-style) timesteps")
    ),
    # x0 post-processing
    "clip_sample": KeyRule("x0 estimate clamped to [-clip_sample_range, clip_sample_range]"),
    "clip_sample_range": KeyRule("range of clip_sample"),
    "thresholding": KeyRule("dynamic thresholding of the x0 estimate (Saharia et al. 2022)"),
    "dynamic_thresholding_ratio": KeyRule("quantile of |x0| used by thresholding"),
    "sample_max_value": KeyRule("upper bound of the thresholding scale"),
    # solvers
    "solver_order": KeyRule("the solver's order (1, 2, 3)", _singlestep_order_check),
    "algorithm_type": KeyRule(
        "dpmsolver++ (data prediction); dpmsolver: singlestep dpm_solver_2 / dpm_solver_3, "
        "multistep dpm_solver_2m / dpm_solver_3m",
        _algorithm_check,
    ),
    "solver_type": KeyRule(
        "DPM-Solver: midpoint (DEIS' logrho reads as midpoint, as in diffusers); UniPC: bh1 / bh2",
        _only("midpoint", "logrho", "bh1", "bh2", None, why="the 'heun' form of DPM-Solver-2M"),
    ),
    "lower_order_final": KeyRule("the solver's lower_order_final (diffusers' 15-step rule)"),
    "euler_at_final": KeyRule("first-order last step", _euler_at_final_check),
    "skip_prk_steps": KeyRule("PNDM warm-up: True = lower-order multistep, False = Runge-Kutta"),
    "predict_x0": KeyRule("UniPC on data prediction", _only(True, why="noise-prediction UniPC")),
    "disable_corrector": KeyRule(
        "UniPC corrector at every step", _only([], (), None, why="per-step corrector switches")
    ),
    "solver_p": KeyRule("UniPC's own predictor", _only(None, why="an external predictor")),
    "variance_type": KeyRule(
        "model outputs without a variance channel",
        _only(None, "fixed_small", "fixed_large", why="learned variance (split model output)"),
    ),
    # flow matching
    "use_flow_sigmas": KeyRule(
        "flow matching noise x = (1 - t) x0 + t eps", _flow_sigmas_check, "warned"
    ),
    "flow_shift": KeyRule("SD3 shift s t / (1 + (s - 1) t), applied once"),
    "shift": KeyRule("SD3 shift s t / (1 + (s - 1) t), applied once"),
    "use_dynamic_shifting": KeyRule("shift from set_timesteps(mu=...) (required then)"),
    "time_shift_type": KeyRule(
        "dynamic shift: exponential (e^mu) or linear (mu)",
        _only("exponential", "linear", None, why="unknown time shift"),
    ),
    "base_shift": KeyRule("kept for pipelines, which compute mu from it"),
    "max_shift": KeyRule("kept for pipelines, which compute mu from it"),
    "base_image_seq_len": KeyRule("kept for pipelines, which compute mu from it"),
    "max_image_seq_len": KeyRule("kept for pipelines, which compute mu from it"),
    "shift_terminal": KeyRule("stretches the shifted grid to end at shift_terminal"),
    "invert_sigmas": KeyRule(
        "time runs from noise to data",
        _false("inverted sigmas run the time axis backwards (a different model convention)"),
    ),
    "stochastic_sampling": KeyRule(
        "deterministic Euler", _false("stochastic sampling re-noises each step (not an ODE solver)")
    ),
}
"""Every diffusers key of every twin (a test checks this against the installed diffusers)."""

_WARNED: set[tuple[str, str]] = set()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_options(options: Mapping[str, Any], where: str) -> None:
    """Apply :data:`RULES` to the diffusers keys in ``options`` (refuse or warn once); keys no
    rule knows are warned about once (they are kept in the config but do nothing)."""
    for key, value in options.items():
        if key.startswith("_"):
            continue
        rule = RULES.get(key)
        if rule is None:
            _warn_once(key, value, f"{where}: unknown diffusers option {key}={_shown(value)}")
            continue
        reason = None if rule.check is None else rule.check(value, options)
        if reason is None:
            continue
        message = f"{where}: {key}={_shown(value)}: {reason}"
        if rule.level == "refused":
            raise ValueError(message + " (not supported by stepsearch)")
        _warn_once(key, value, message)


def _warn_once(key: str, value: Any, message: str) -> None:
    token = (key, repr(value))
    if token not in _WARNED:
        _WARNED.add(token)
        logger.warning(message)


def warn_method_once(class_name: str, message: str) -> None:
    """One warning per drop-in class whose method is the closest stepsearch has to its twin's,
    not the same (:attr:`StepsearchScheduler.closest_method`)."""
    _warn_once("_method", class_name, f"{class_name}: {message}")


def twin_parameters(diffusers_class: str) -> dict[str, Any]:
    """``{name: default}`` of a diffusers scheduler's ``__init__`` in the installed diffusers."""
    import diffusers

    signature = inspect.signature(getattr(diffusers, diffusers_class).__init__)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def key_table_markdown() -> str:
    """The per-class key table of ``docs/schedulers.md``."""
    lines: list[str] = []
    by_twin: dict[str, list[str]] = {}
    for ours, twin in TWINS.items():
        by_twin.setdefault(twin, []).append(ours)
    for twin, ours in by_twin.items():
        lines += [f"### {twin}", "", "Drop-in classes: " + ", ".join(f"`{c}`" for c in ours), ""]
        lines += ["| key | diffusers default | stepsearch | handling |", "| --- | --- | --- | --- |"]
        for key, default in twin_parameters(twin).items():
            rule = RULES[key]
            lines.append(f"| `{key}` | `{_shown(default)}` | {rule.doc} | {rule.handling} |")
        lines.append("")
    return "\n".join(lines)
