"""NVIDIA's published Align Your Steps schedules, resampled and rescaled safely.

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
"""

from __future__ import annotations

import math

import numpy as np

from stepsearch.noise import EDM, DiscreteVP, FloatArray, NoiseSchedule
from stepsearch.schedule import StepSchedule, loglinear_interpolate

__all__ = [
    "PUBLISHED_SIGMAS",
    "PUBLISHED_TIMESTEPS",
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
