"""Published step schedules: NVIDIA's Align Your Steps tables, GITS' and OptimalSteps' tables.

Core: these need only a noise schedule and a step schedule (no model, no search).

**Align Your Steps** (:func:`published_sigmas`, :func:`published_schedule`): NVIDIA's
published schedules, resampled and rescaled safely.

The tables (Sabour et al. 2024, project page and paper) are 10-step schedules: 11 k-diffusion sigmas
from the model's ``sigma_max`` down to its ``sigma_min`` (and, for SD 1.5 / SDXL, the same as 11
train timesteps, 999 down to 0). diffusers ships them as ``AysSchedules`` with the last sigma
replaced by 0; interpolating such a list log-linearly gives ``log 0`` trouble or repeated zero
sigmas. Here the table that ends at ``sigma_min`` is interpolated (piecewise-linear in
``log sigma`` over a uniform index, :func:`~stepsearch.schedule.loglinear_interpolate`) and a clean
end ``0`` is appended afterwards, so every result decreases strictly and holds exactly one zero.

Rescaling: a model whose trained sigma range differs from the table's (another ``beta`` schedule, an
EDM model with another ``sigma_max``) gets the table mapped affinely in ``log sigma`` onto its own
``[sigma_min, sigma_max]``, which keeps the schedule's shape (the relative position of every point in
log-noise) and its endpoints on the model's range.

**GITS / OptimalSteps** (:func:`gits_schedule`, :func:`optimal_steps_schedule`): published DP
schedules, GITS for Stable Diffusion 1.5 and OptimalSteps (OSS) for FLUX, Wan and Chroma, with
interpolation to other step counts.

- **GITS** (Chen et al. 2024, arXiv 2405.11326): k-diffusion sigmas of SD1.5 for cost coefficients
  0.80-1.50 (step 0.05) and 2-20 steps (``data/gits_sd15.json``). The numbers are those ComfyUI
  ships (``comfy_extras/nodes_gits.py``, attributed there to zju-pi/diff-sampler gits-main); the
  gits-main repository publishes the DP code, not these tables, so they were not checked against
  the authors' own release. What was checked (tests): every value lies on one smooth 98-point grid
  of SD1.5's sigmas (timesteps about 10 apart), so no value was mistyped.
- **OptimalSteps** (Pei, Hu & Gu 2025, bebebe666/OptimalSteps): flow-matching sigmas (= flow time
  ``t``) for FLUX (10 steps), Wan (20) and Chroma (40), as in ComfyUI's
  ``comfy_extras/nodes_optimalsteps.py`` (attributed there to bebebe666/OptimalSteps; the OSS
  repository computes schedules per model and prompt and does not list these numbers).

Conventions (the authors' and ComfyUI's): a table of ``n`` steps has ``n + 1`` noise levels ending
at the model's smallest one; used as a schedule its last level becomes clean data (``0``), so the
schedule has exactly ``n`` steps. Other step counts: log-linear interpolation of the *noisy* table
over a uniform index (GITS: the 20-step table), and only then the last level replaced by ``0`` --
never interpolating a list that already ends in ``0``, so no zero sigma is repeated.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from stepsearch.noise import EDM, DiscreteVP, FloatArray, FlowMatching, NoiseSchedule
from stepsearch.schedule import StepSchedule, loglinear_interpolate

__all__ = [
    "GITS_COEFFS",
    "OPTIMAL_STEPS",
    "PUBLISHED_SIGMAS",
    "PUBLISHED_TIMESTEPS",
    "gits_schedule",
    "gits_sigmas",
    "interpolate_noisy_levels",
    "optimal_steps_schedule",
    "optimal_steps_sigmas",
    "published_schedule",
    "published_sigmas",
    "table_name",
]

PUBLISHED_SIGMAS: dict[str, tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "deepfloyd_if": (160.41, 8.081, 3.315, 1.885, 1.207, 0.785, 0.553, 0.293, 0.186, 0.030, 0.006),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}
"""10-step AYS schedules as 11 k-diffusion sigmas ending at the model's ``sigma_min``."""

PUBLISHED_TIMESTEPS: dict[str, tuple[int, ...]] = {
    "sd15": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
    "sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0),
}
"""The same schedules as 11 train timesteps (discrete models)."""

_ALIASES = {
    "sd15": "sd15",
    "sd1.5": "sd15",
    "sd1": "sd15",
    "stable-diffusion-1.5": "sd15",
    "sdxl": "sdxl",
    "stable-diffusion-xl": "sdxl",
    "deepfloyd_if": "deepfloyd_if",
    "deepfloyd-if": "deepfloyd_if",
    "if": "deepfloyd_if",
    "svd": "svd",
    "stable-video-diffusion": "svd",
}


def table_name(model: str) -> str:
    """The canonical table name of ``model`` (``sd15``, ``sdxl``, ``deepfloyd_if``, ``svd``)."""
    try:
        return _ALIASES[model.lower()]
    except KeyError:
        raise ValueError(
            f"no published AYS schedule for {model!r}; choose from {sorted(PUBLISHED_SIGMAS)}"
        ) from None


def _rescaled(sigmas: FloatArray, low: float, high: float) -> FloatArray:
    """Map ``sigmas`` (ending at their minimum) affinely in ``log sigma`` onto ``[low, high]``."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {low!r}, {high!r}")
    log_sigmas = np.log(sigmas)
    first, last = log_sigmas[0], log_sigmas[-1]
    fraction = (log_sigmas - last) / (first - last)
    return np.exp(math.log(low) + fraction * (math.log(high) - math.log(low)))


def published_sigmas(
    model: str,
    num_steps: int = 10,
    *,
    clean_end: bool = True,
    sigma_range: tuple[float, float] | None = None,
) -> FloatArray:
    """The published schedule of ``model`` as k-diffusion sigmas for ``num_steps`` steps.

    With ``clean_end`` (what samplers take: k-diffusion, ComfyUI, ``pipe(sigmas=...)``) the result is
    ``num_steps`` noisy sigmas from ``sigma_max`` to ``sigma_min`` then one ``0``; without, it is
    ``num_steps + 1`` noisy sigmas ending at ``sigma_min`` (``num_steps=10`` is the table itself).
    ``sigma_range = (sigma_min, sigma_max)`` rescales the table onto another model's range first.
    """
    table = np.asarray(PUBLISHED_SIGMAS[table_name(model)], dtype=np.float64)
    if sigma_range is not None:
        table = _rescaled(table, float(sigma_range[0]), float(sigma_range[1]))
    # Sigma = t on an EDM axis spanning the table, so the schedule maths (validation, log-linear
    # interpolation, the clean end) is the library's own.
    axis = EDM(sigma_min=float(table[-1]), sigma_max=float(table[0]))
    times = np.append(table, 0.0) if clean_end else table
    schedule = StepSchedule(times, axis)
    target = int(num_steps)
    if target != schedule.num_steps:
        schedule = loglinear_interpolate(schedule, target)
    return schedule.times.copy()


def published_schedule(
    model: str,
    noise: NoiseSchedule,
    num_steps: int = 10,
    *,
    clean_end: bool = True,
    rescale: str = "auto",
    kind: str = "sigmas",
) -> StepSchedule:
    """The published schedule of ``model`` on ``noise`` (a :class:`StepSchedule`).

    ``kind="sigmas"`` uses the sigma table; ``kind="timesteps"`` the timestep table (discrete
    models; only for the 10-step table itself, other counts interpolate the sigmas).
    ``rescale``: ``"auto"`` maps the table onto ``noise``'s sigma range when the two differ by more
    than 5% at either end (rounded table values are merely clipped); ``"always"``; ``"never"``
    (clip to the model's range).
    """
    if rescale not in ("auto", "always", "never"):
        raise ValueError(f"rescale must be 'auto', 'always' or 'never', got {rescale!r}")
    name = table_name(model)
    metadata = {"spacing": "ays_published", "table": name, "kind": kind}
    if kind == "timesteps":
        if name not in PUBLISHED_TIMESTEPS:
            raise ValueError(f"{name} has no published timesteps; use kind='sigmas'")
        if not isinstance(noise, DiscreteVP):
            raise ValueError("kind='timesteps' needs a DiscreteVP noise schedule")
        if num_steps != 10:
            raise ValueError("the timestep table has 10 steps; use kind='sigmas' to interpolate")
        timesteps = np.asarray(PUBLISHED_TIMESTEPS[name], dtype=np.float64)
        if clean_end:
            return StepSchedule.from_diffusers_timesteps(noise, timesteps[:-1], "clean", **metadata)
        return StepSchedule.from_diffusers_timesteps(noise, timesteps, "none", **metadata)
    if kind != "sigmas":
        raise ValueError(f"kind must be 'sigmas' or 'timesteps', got {kind!r}")
    low = float(noise.kdiffusion_sigma(noise.t_min))
    high = float(noise.kdiffusion_sigma(noise.t_max))
    table = PUBLISHED_SIGMAS[name]
    mismatch = max(abs(math.log(table[0] / high)), abs(math.log(table[-1] / low)))
    scale = rescale == "always" or (rescale == "auto" and mismatch > math.log(1.05))
    sigmas = published_sigmas(
        name, num_steps, clean_end=clean_end, sigma_range=(low, high) if scale else None
    )
    return StepSchedule.from_kdiffusion_sigmas(
        noise, sigmas, clip_to_range=True, **metadata, rescaled=bool(scale)
    )


# GITS / OptimalSteps ------------------------------------------------------------------------------
OPTIMAL_STEPS: dict[str, tuple[float, ...]] = {
    "flux": (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001),
    "wan": (
        1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96,
        0.946, 0.927, 0.902, 0.864, 0.776, 0.539, 0.208, 0.001,
    ),
    "chroma": (
        0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943, 0.931, 0.917,
        0.9, 0.881, 0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599, 0.55, 0.501, 0.451,
        0.402, 0.355, 0.311, 0.27, 0.232, 0.199, 0.169, 0.143, 0.12, 0.101, 0.084, 0.07, 0.058,
        0.048, 0.001,
    ),
}  # fmt: skip
"""OptimalSteps flow sigmas by model (FLUX 10 steps, Wan 20, Chroma 40), ending at 0.001."""


@cache
def _gits_tables() -> dict[str, Any]:
    text = resources.files("stepsearch").joinpath("data/gits_sd15.json").read_text("utf-8")
    return json.loads(text)


def _gits_table(coeff: float) -> list[list[float]]:
    tables = _gits_tables()["tables"]
    key = f"{float(coeff):.2f}"
    if key not in tables or abs(float(key) - float(coeff)) > 1e-9:
        raise ValueError(f"GITS publishes coefficients {', '.join(tables)}; got {coeff!r}")
    return tables[key]


GITS_COEFFS: tuple[float, ...] = tuple(round(0.80 + 0.05 * k, 2) for k in range(15))
"""The cost coefficients of the published GITS tables."""


def _check_steps(num_steps: int) -> int:
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return int(num_steps)


def interpolate_noisy_levels(levels: Any, num_steps: int) -> np.ndarray:
    """``num_steps + 1`` levels from a decreasing table of *noisy* levels (all > 0): piecewise-
    linear in ``log(level)`` over a uniform index, with the table's own ends kept."""
    table = np.asarray(levels, dtype=np.float64)
    if table.ndim != 1 or table.size < 2 or not (table > 0).all() or not (np.diff(table) < 0).all():
        raise ValueError("need a strictly decreasing table of at least two positive levels")
    count = _check_steps(num_steps) + 1
    source = np.linspace(0.0, 1.0, table.size)
    return np.exp(np.interp(np.linspace(0.0, 1.0, count), source, np.log(table)))


def _with_clean_end(levels: np.ndarray) -> np.ndarray:
    out = np.array(levels, dtype=np.float64)
    out[-1] = 0.0
    return out


def gits_sigmas(num_steps: int, coeff: float = 1.20) -> np.ndarray:
    """GITS' SD1.5 k-diffusion sigmas for ``num_steps`` steps (``num_steps + 1`` values, last 0):
    the published table for 2-20 steps, else the 20-step table interpolated. ``coeff`` is one of
    :data:`GITS_COEFFS` (ComfyUI's default 1.20)."""
    num_steps = _check_steps(num_steps)
    tables = _gits_table(coeff)
    if 2 <= num_steps <= len(tables) + 1:
        return _with_clean_end(np.asarray(tables[num_steps - 2]))
    return _with_clean_end(interpolate_noisy_levels(tables[-1], num_steps))


def gits_schedule(
    num_steps: int, coeff: float = 1.20, noise: NoiseSchedule | None = None
) -> StepSchedule:
    """:func:`gits_sigmas` as a :class:`StepSchedule` on SD1.5's noise schedule (or ``noise``,
    another discrete schedule with the same sigmas; rounded table ends are clipped into range)."""
    noise = noise if noise is not None else DiscreteVP.stable_diffusion()
    sigmas = gits_sigmas(num_steps, coeff)
    schedule = StepSchedule.from_kdiffusion_sigmas(
        noise, sigmas, clip_to_range=True, spacing="gits", coeff=float(coeff)
    )
    return schedule


def optimal_steps_sigmas(model: str, num_steps: int) -> np.ndarray:
    """OptimalSteps' flow sigmas for ``model`` (``flux``, ``wan``, ``chroma``) at ``num_steps``
    steps (``num_steps + 1`` values, last 0): the published table at its own step count, else
    interpolated."""
    try:
        table = OPTIMAL_STEPS[model.lower()]
    except KeyError:
        raise ValueError(
            f"OptimalSteps publishes {', '.join(OPTIMAL_STEPS)}; got {model!r}"
        ) from None
    num_steps = _check_steps(num_steps)
    levels = table if num_steps + 1 == len(table) else interpolate_noisy_levels(table, num_steps)
    return _with_clean_end(np.asarray(levels))


def optimal_steps_schedule(
    model: str, num_steps: int, noise: FlowMatching | None = None
) -> StepSchedule:
    """:func:`optimal_steps_sigmas` as a :class:`StepSchedule` on a flow-matching schedule (the
    flow sigma is the time ``t``; the tables already include the models' resolution shifts)."""
    noise = noise if noise is not None else FlowMatching()
    if not isinstance(noise, FlowMatching):
        raise ValueError("OptimalSteps tables are flow-matching times: pass a FlowMatching noise")
    times = optimal_steps_sigmas(model, num_steps)
    return StepSchedule(times, noise, {"spacing": "optimal_steps", "model": model.lower()})
