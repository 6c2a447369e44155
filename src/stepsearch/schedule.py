"""Step schedules: which times a sampler visits, as validated data.

A :class:`StepSchedule` of ``n`` steps holds ``n + 1`` strictly decreasing times
``t_0 > t_1 > ... > t_n`` on a :class:`~stepsearch.noise.NoiseSchedule`. Step ``i`` moves the sample
from ``t_i`` to ``t_{i+1}``; a first-order solver evaluates the model at ``t_0 .. t_{n-1}``. The last
time may be ``0`` (clean data, k-diffusion's trailing ``sigma = 0``); every other time lies in
``[t_min, t_max]`` of the noise schedule.

The spacing generators below return such schedules; conversions to diffusers timesteps, k-diffusion
sigmas, ComfyUI ``SIGMAS`` and flow times live here and nowhere else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from stepsearch._io import atomic_write_json, read_json
from stepsearch.noise import DiscreteVP, FloatArray, FlowMatching, NoiseSchedule
from stepsearch.noise import noise_schedule_from_config as _noise_from_config

FORMAT_NAME = "stepsearch.StepSchedule"
FORMAT_VERSION = 1
_RANGE_TOLERANCE = 1e-9


@dataclass(frozen=True, eq=False)
class StepSchedule:
    """A validated, strictly decreasing grid of times on a noise schedule.

    Args:
        times: ``n + 1`` times, strictly decreasing; the last may be ``0`` (clean data).
        noise: the noise schedule the times live on.
        metadata: free-form JSON-serialisable provenance (spacing name, search log, ...).
    """

    times: FloatArray
    noise: NoiseSchedule
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        times = _validated_times(self.times, self.noise)
        times.setflags(write=False)
        object.__setattr__(self, "times", times)
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    # derived quantities ----------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.times.size - 1

    @property
    def ends_clean(self) -> bool:
        """Whether the last step goes to clean data (``t = 0``, ``sigma = 0``)."""
        return bool(self.times[-1] == 0.0)

    @property
    def alphas(self) -> FloatArray:
        return np.asarray(self.noise.alpha(self.times))

    @property
    def sigmas(self) -> FloatArray:
        return np.asarray(self.noise.sigma(self.times))

    @property
    def lambdas(self) -> FloatArray:
        return np.asarray(self.noise.lambda_(self.times))

    def __len__(self) -> int:
        return self.times.size

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StepSchedule)
            and self.noise == other.noise
            and np.array_equal(self.times, other.times)
        )

    def __hash__(self) -> int:
        return hash((self.noise, self.times.tobytes()))

    def __repr__(self) -> str:
        shown = np.array2string(self.times, precision=4, separator=", ", threshold=12)
        return f"StepSchedule(num_steps={self.num_steps}, times={shown}, noise={self.noise!r})"

    def with_metadata(self, **metadata: Any) -> StepSchedule:
        return StepSchedule(self.times, self.noise, {**self.metadata, **metadata})

    # conversions -----------------------------------------------------------------------------
    def to_kdiffusion_sigmas(self) -> FloatArray:
        """k-diffusion / EDM sigmas ``sigma / alpha`` (``0`` for a clean end)."""
        return np.asarray(self.noise.kdiffusion_sigma(self.times))

    @classmethod
    def from_kdiffusion_sigmas(
        cls, noise: NoiseSchedule, sigmas: ArrayLike, *, clip_to_range: bool = False, **metadata: Any
    ) -> StepSchedule:
        """From k-diffusion sigmas (``0`` = clean). ``clip_to_range`` clamps non-zero sigmas into the
        model's ``[sigma(t_min), sigma(t_max)]`` (for rounded published tables such as AYS')."""
        sigmas = _finite_1d(sigmas, "sigmas")
        if clip_to_range:
            low = float(noise.kdiffusion_sigma(noise.t_min))
            high = float(noise.kdiffusion_sigma(noise.t_max))
            sigmas = np.where(sigmas > 0, np.clip(sigmas, low, high), sigmas)
        return cls(np.asarray(noise.t_from_kdiffusion_sigma(sigmas)), noise, metadata)

    def to_comfyui_sigmas(self) -> Any:
        """ComfyUI ``SIGMAS``: a float32 torch tensor of descending sigmas that ends in 0."""
        import torch

        if not self.ends_clean:
            raise ValueError("ComfyUI SIGMAS end in 0: this schedule does not end at clean data")
        return torch.tensor(self.to_kdiffusion_sigmas(), dtype=torch.float32)

    def to_diffusers_timesteps(self, *, integer: bool = True) -> FloatArray:
        """diffusers train-timestep indices of the evaluation times ``t_0 .. t_{n-1}``.

        The final target (clean data or ``t_min``) is implied by the scheduler, as in diffusers.
        With ``integer=True`` every time must sit on a trained step.
        """
        noise = _require_discrete(self.noise, "diffusers timesteps")
        timesteps = np.asarray(noise.timestep_from_t(self.times[:-1]))
        if not integer:
            return timesteps
        rounded = np.rint(timesteps)
        off = np.abs(timesteps - rounded) > 1e-6
        if off.any():
            index = int(np.argmax(off))
            raise ValueError(
                f"time index {index} ({self.times[index]!r}) is timestep {float(timesteps[index])!r}, "
                "not a trained step; use to_diffusers_timesteps(integer=False) or snap the schedule"
            )
        return rounded

    @classmethod
    def from_diffusers_timesteps(
        cls, noise: DiscreteVP, timesteps: ArrayLike, final: str = "clean", **metadata: Any
    ) -> StepSchedule:
        """From diffusers evaluation timesteps; ``final`` is ``"clean"`` (sigma = 0, diffusers'
        ``set_alpha_to_one`` / ``final_sigmas_type="zero"``), ``"t_min"`` (the first trained step)
        or ``"none"`` (the last timestep is the end)."""
        noise = _require_discrete(noise, "diffusers timesteps")
        timesteps = _finite_1d(timesteps, "timesteps")
        times = np.asarray(noise.t_from_timestep(timesteps))
        if final == "clean":
            times = np.append(times, 0.0)
        elif final == "t_min":
            times = np.append(times, noise.t_min)
        elif final != "none":
            raise ValueError(f"final must be 'clean', 't_min' or 'none', got {final!r}")
        return cls(times, noise, metadata)

    def to_flow_times(self) -> FloatArray:
        """Flow-matching times (= diffusers' flow ``sigmas``), including the final ``0``."""
        if not isinstance(self.noise, FlowMatching):
            raise ValueError("flow times need a FlowMatching noise schedule")
        return self.times.copy()

    def snapped_to_trained_steps(self) -> StepSchedule:
        """For discrete schedules: round every noisy time to the nearest trained step."""
        noise = _require_discrete(self.noise, "snapping")
        noisy = self.times > 0
        timesteps = np.rint(np.asarray(noise.timestep_from_t(self.times[noisy])))
        times = self.times.copy()
        times[noisy] = noise.t_from_timestep(np.clip(timesteps, 0, noise.num_train_timesteps - 1))
        return StepSchedule(times, self.noise, self.metadata)

    # JSON ------------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "times": self.times.tolist(),
            "noise_schedule": self.noise.to_config(),
            "metadata": dict(self.metadata),
        }
        if isinstance(self.noise, DiscreteVP):
            payload["diffusers_timesteps"] = self.to_diffusers_timesteps(integer=False).tolist()
        payload["kdiffusion_sigmas"] = self.to_kdiffusion_sigmas().tolist()
        return payload

    @classmethod
    def from_json_dict(cls, payload: Mapping[str, Any]) -> StepSchedule:
        if not isinstance(payload, Mapping):
            raise ValueError("a step schedule file must hold a JSON object")
        if payload.get("format") != FORMAT_NAME:
            raise ValueError(
                f"not a step schedule: format is {payload.get('format')!r}, "
                f"expected {FORMAT_NAME!r}"
            )
        version = payload.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported step schedule version {version!r} "
                f"(this stepsearch reads version {FORMAT_VERSION})"
            )
        for key in ("times", "noise_schedule"):
            if key not in payload:
                raise ValueError(f"step schedule file lacks {key!r}")
        noise = _noise_from_config(payload["noise_schedule"])
        return cls(_finite_1d(payload["times"], "times"), noise, payload.get("metadata") or {})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the schedule as versioned JSON, atomically."""
        atomic_write_json(path, self.to_json_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StepSchedule:
        """Read a schedule written by :meth:`save`; bad content raises ``ValueError``."""
        try:
            return cls.from_json_dict(read_json(path))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _finite_1d(values: ArrayLike, name: str) -> FloatArray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a list of numbers ({error})") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        index = int(np.argmax(bad))
        raise ValueError(f"{name}[{index}] is {float(array[index])!r}: values must be finite")
    return array


def _validated_times(values: ArrayLike, noise: NoiseSchedule) -> FloatArray:
    if not isinstance(noise, NoiseSchedule):
        raise TypeError(f"noise must be a NoiseSchedule, got {type(noise).__name__}")
    times = _finite_1d(values, "times").copy()
    if times.size < 2:
        raise ValueError(f"a step schedule needs at least 2 times (1 step), got {times.size}")
    steps = np.diff(times)
    if (steps >= 0).any():
        index = int(np.argmax(steps >= 0)) + 1
        kind = "duplicated" if steps[index - 1] == 0 else "not decreasing"
        raise ValueError(
            f"times must be strictly decreasing: times[{index}] = {float(times[index])!r} is {kind} "
            f"after times[{index - 1}] = {float(times[index - 1])!r}"
        )
    tolerance = _RANGE_TOLERANCE * max(1.0, noise.t_max)
    if times[0] > noise.t_max + tolerance:
        raise ValueError(
            f"times[0] = {float(times[0])!r} is above t_max = {noise.t_max} of {noise!r}"
        )
    times[0] = min(times[0], noise.t_max)
    if times[-1] < -tolerance:
        raise ValueError(f"times[{times.size - 1}] = {float(times[-1])!r} is negative")
    if abs(times[-1]) <= tolerance and times[-1] != 0.0 and noise.t_min > tolerance:
        times[-1] = 0.0
    low = (times > 0) & (times < noise.t_min * (1 - 1e-7) - tolerance)
    if low.any():
        index = int(np.argmax(low))
        raise ValueError(
            f"times[{index}] = {float(times[index])!r} is below t_min = {noise.t_min} of {noise!r}; "
            "only the last time may go below t_min, and only to 0 (clean data)"
        )
    return times


def _require_discrete(noise: NoiseSchedule, what: str) -> DiscreteVP:
    if not isinstance(noise, DiscreteVP):
        raise ValueError(f"{what} need a DiscreteVP noise schedule, got {type(noise).__name__}")
    return noise


def _check_num_steps(num_steps: int) -> int:
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return int(num_steps)


def _finish(
    noise: NoiseSchedule, noisy_times: FloatArray, clean_end: bool, metadata: Mapping[str, Any]
) -> StepSchedule:
    times = np.append(noisy_times, 0.0) if clean_end else noisy_times
    return StepSchedule(times, noise, metadata)


def _kdiffusion_sigma_range(
    noise: NoiseSchedule, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` in k-diffusion sigma, defaulting to the model's trained range
    (up to :attr:`~stepsearch.noise.NoiseSchedule.t_max_finite`: sigma is infinite at pure noise)."""
    high = float(noise.kdiffusion_sigma(noise.t_max_finite)) if sigma_max is None else float(sigma_max)
    low = float(noise.kdiffusion_sigma(noise.t_min)) if sigma_min is None else float(sigma_min)
    if not 0 < low < high:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {low!r}, {high!r}")
    return low, high


def _grid(num_steps: int, clean_end: bool) -> FloatArray:
    """Fractions 0..1 of the noisy points: ``n`` of them before a clean end, else ``n + 1``."""
    count = num_steps if clean_end else num_steps + 1
    return np.linspace(0.0, 1.0, count) if count > 1 else np.zeros(1)


# --------------------------------------------------------------------------------------------
# spacing generators
# --------------------------------------------------------------------------------------------


def time_uniform(
    noise: NoiseSchedule,
    num_steps: int,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    clean_end: bool = True,
) -> StepSchedule:
    """Uniform in ``t`` from ``t_start`` (default ``t_max``) to ``t_end`` (default ``t_min``); with
    ``clean_end`` a last step goes to clean data, otherwise ``t_end`` is the final time."""
    num_steps = _check_num_steps(num_steps)
    start = noise.t_max if t_start is None else float(t_start)
    end = noise.t_min if t_end is None else float(t_end)
    times = start + _grid(num_steps, clean_end) * (end - start)
    return _finish(noise, times, clean_end, {"spacing": "time_uniform"})


def logsnr_uniform(
    noise: NoiseSchedule,
    num_steps: int,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    clean_end: bool = True,
) -> StepSchedule:
    """Uniform in ``lambda = log(alpha / sigma)`` (DPM-Solver's ``logSNR`` spacing), from
    ``t_start`` (default :attr:`~stepsearch.noise.NoiseSchedule.t_max_finite`, the noisiest time
    with a finite ``lambda``) to ``t_end`` (default ``t_min``)."""
    num_steps = _check_num_steps(num_steps)
    lambda_start = float(noise.lambda_(noise.t_max_finite if t_start is None else t_start))
    lambda_end = float(noise.lambda_(noise.t_min if t_end is None else t_end))
    lambdas = lambda_start + _grid(num_steps, clean_end) * (lambda_end - lambda_start)
    times = np.asarray(noise.t_from_lambda(lambdas))
    return _finish(noise, times, clean_end, {"spacing": "logsnr_uniform"})


def karras(
    noise: NoiseSchedule,
    num_steps: int,
    *,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    clean_end: bool = True,
) -> StepSchedule:
    """Karras et al. (2022, eq. 5) spacing in k-diffusion sigma:
    ``sigma_i = (sigma_max^(1/rho) + i/(m-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``."""
    num_steps = _check_num_steps(num_steps)
    low, high = _kdiffusion_sigma_range(noise, sigma_min, sigma_max)
    count = num_steps if clean_end else num_steps + 1
    sigmas = sigma_spacing("karras", high, low, count, rho=rho)
    times = np.asarray(noise.t_from_kdiffusion_sigma(sigmas))
    return _finish(noise, times, clean_end, {"spacing": "karras", "rho": rho})


def ays_gaussian(
    noise: NoiseSchedule,
    num_steps: int,
    *,
    sigma_data: float = 0.5,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    clean_end: bool = True,
) -> StepSchedule:
    """Align Your Steps' optimum for Gaussian data of std ``c = sigma_data`` (Sabour et al. 2024,
    Thm 3.1), the "KL-optimal" spacing: ``sigma_i = c tan((1 - u) atan(sigma_max / c)
    + u atan(sigma_min / c))`` for ``u`` uniform in [0, 1]."""
    num_steps = _check_num_steps(num_steps)
    low, high = _kdiffusion_sigma_range(noise, sigma_min, sigma_max)
    if sigma_data <= 0:
        raise ValueError(f"sigma_data must be positive, got {sigma_data!r}")
    u = _grid(num_steps, clean_end)
    angles = (1 - u) * math.atan(high / sigma_data) + u * math.atan(low / sigma_data)
    sigmas = sigma_data * np.tan(angles)
    times = np.asarray(noise.t_from_kdiffusion_sigma(sigmas))
    metadata = {"spacing": "ays_gaussian", "sigma_data": sigma_data}
    return _finish(noise, times, clean_end, metadata)


DIFFUSERS_SPACINGS = ("leading", "linspace", "trailing")
GRID_CONVENTIONS = ("ddim", "dpm", "euler")


def diffusers_timesteps(
    convention: str, spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int = 0
) -> FloatArray:
    """The evaluation timesteps diffusers' schedulers generate for ``num_steps`` steps, decreasing.

    ``convention`` names the family whose arithmetic is reproduced: ``"ddim"`` (DDIM, PNDM, DDPM:
    ``n`` points of ``linspace(0, N - 1)``, leading step ``N // n``), ``"dpm"`` (DPM-Solver,
    UniPC, DEIS: ``n + 1`` points with the last dropped, leading step ``N // (n + 1)``) or
    ``"euler"`` (Euler, Heun: like ``"ddim"`` but ``linspace`` is not rounded). ``leading``:
    ``k * step + steps_offset``; ``linspace``: ``linspace(0, N - 1, n)``; ``trailing``:
    ``round(arange(N, 0, -N / n)) - 1`` (always starts at ``N - 1``); Lin et al. 2023, Table 2.

    ``num_steps == N`` is every trained step, ``N - 1 .. 0``, whatever the spacing (diffusers'
    arithmetic repeats or collapses timesteps there); rounding that would repeat a timestep for
    other counts near ``N`` keeps each timestep once (the grid then has fewer steps).
    """
    n, total = _check_num_steps(num_steps), int(num_train_timesteps)
    if convention not in GRID_CONVENTIONS:
        raise ValueError(f"grid convention must be one of {GRID_CONVENTIONS}, got {convention!r}")
    if spacing not in DIFFUSERS_SPACINGS:
        raise ValueError(f"spacing must be one of {DIFFUSERS_SPACINGS}, got {spacing!r}")
    if n > total:
        raise ValueError(f"num_steps = {n} exceeds num_train_timesteps = {total}")
    if n == total:
        return np.arange(total - 1, -1, -1, dtype=np.float64)
    if spacing == "trailing":
        grid = np.round(np.arange(total, 0, -total / n)) - 1.0
    elif convention == "dpm" and spacing == "linspace":
        grid = np.linspace(0, total - 1, n + 1).round()[::-1][:-1].copy()
    elif convention == "dpm":
        grid = (np.arange(n + 1) * (total // (n + 1))).round()[::-1][:-1] + float(steps_offset)
    elif spacing == "linspace":
        grid = np.linspace(0, total - 1, n)[::-1].copy()
        grid = grid if convention == "euler" else grid.round()
    else:
        grid = (np.arange(n) * (total // n)).round()[::-1] + float(steps_offset)
    if grid.max() > total - 1:
        raise ValueError(f"steps_offset = {steps_offset} pushes timesteps past {total - 1}")
    return np.unique(grid)[::-1].astype(np.float64) if np.any(np.diff(grid) == 0) else grid


def diffusers_spacing(
    noise: NoiseSchedule,
    num_steps: int,
    spacing: str = "leading",
    *,
    steps_offset: int = 0,
    convention: str = "ddim",
) -> StepSchedule:
    """The grid of :func:`diffusers_timesteps` on a discrete schedule, ending at clean data."""
    discrete = _require_discrete(noise, "diffusers spacings")
    timesteps = diffusers_timesteps(
        convention, spacing, num_steps, discrete.num_train_timesteps, steps_offset
    )
    times = np.asarray(discrete.t_from_timestep(timesteps))
    return _finish(noise, times, True, {"spacing": spacing, "steps_offset": steps_offset})


SIGMA_SPACINGS = ("karras", "exponential", "beta")


def sigma_spacing(
    kind: str, sigma_max: float, sigma_min: float, count: int, *, rho: float = 7.0
) -> FloatArray:
    """``count`` decreasing noise levels from ``sigma_max`` to ``sigma_min`` (both included):
    ``karras`` (Karras et al. 2022, eq. 5, ``rho``), ``exponential`` (uniform in ``log sigma``) or
    ``beta`` (Lee et al. 2024, "Beta sampling is all you need": ``sigma_min + ppf(1 - u)
    (sigma_max - sigma_min)`` with the Beta(0.6, 0.6) quantile function). The same rules serve
    k-diffusion sigmas of VP models and flow times."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    u = np.linspace(0.0, 1.0, count) if count > 1 else np.zeros(1)
    if kind == "karras":
        return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if kind == "exponential":
        return np.exp(np.log(sigma_max) + u * (np.log(sigma_min) - np.log(sigma_max)))
    if kind == "beta":
        from scipy.stats import beta

        return sigma_min + beta.ppf(1.0 - u, 0.6, 0.6) * (sigma_max - sigma_min)
    raise ValueError(f"sigma spacing must be one of {SIGMA_SPACINGS}, got {kind!r}")


def beta_sigmas(
    noise: NoiseSchedule,
    num_steps: int,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    clean_end: bool = True,
) -> StepSchedule:
    """Beta-distribution spacing of k-diffusion sigma (:func:`sigma_spacing`, ``beta``)."""
    num_steps = _check_num_steps(num_steps)
    low, high = _kdiffusion_sigma_range(noise, sigma_min, sigma_max)
    count = num_steps if clean_end else num_steps + 1
    sigmas = sigma_spacing("beta", high, low, count)
    times = np.asarray(noise.t_from_kdiffusion_sigma(sigmas))
    return _finish(noise, times, clean_end, {"spacing": "beta"})


def flow_shifted(
    noise: NoiseSchedule, num_steps: int, *, shift: float | None = None, clean_end: bool = True
) -> StepSchedule:
    """SD3 / Flux default: time-uniform from 1 to ``t_min``, then the resolution shift
    (:func:`stepsearch.noise.flow_shift`; ``shift`` defaults to the schedule's own)."""
    if not isinstance(noise, FlowMatching):
        raise ValueError("flow_shifted needs a FlowMatching noise schedule")
    num_steps = _check_num_steps(num_steps)
    value = noise.shift if shift is None else float(shift)
    u = noise.t_max + _grid(num_steps, clean_end) * (noise.t_min - noise.t_max)
    times = np.asarray(noise.shift_time(u, value))
    return _finish(noise, times, clean_end, {"spacing": "flow_shifted", "shift": value})


def loglinear_interpolate(schedule: StepSchedule, num_steps: int) -> StepSchedule:
    """Resample a schedule to ``num_steps`` by piecewise-linear interpolation of
    ``log(k-diffusion sigma)`` over a uniform index (the AYS paper's rule for other step counts).

    Only the noisy part is interpolated; a clean end is appended afterwards, so no repeated
    zero sigmas can appear (the bug of interpolating a table that ends in 0).
    """
    num_steps = _check_num_steps(num_steps)
    noisy = schedule.times[:-1] if schedule.ends_clean else schedule.times
    count = num_steps if schedule.ends_clean else num_steps + 1
    log_sigmas = np.log(np.asarray(schedule.noise.kdiffusion_sigma(noisy)))
    source = np.linspace(0.0, 1.0, log_sigmas.size)
    target = np.linspace(0.0, 1.0, count) if count > 1 else np.zeros(1)
    sigmas = np.exp(np.interp(target, source, log_sigmas))
    times = np.asarray(schedule.noise.t_from_kdiffusion_sigma(sigmas))
    metadata = {**schedule.metadata, "interpolated_from_steps": schedule.num_steps}
    return _finish(schedule.noise, times, schedule.ends_clean, metadata)


Spacing = Callable[[NoiseSchedule, int], StepSchedule]

SPACINGS: dict[str, Spacing] = {
    "time_uniform": time_uniform,
    "logsnr_uniform": logsnr_uniform,
    "karras": karras,
    "beta": beta_sigmas,
    "ays_gaussian": ays_gaussian,
    "leading": lambda noise, n: diffusers_spacing(noise, n, "leading"),
    "linspace": lambda noise, n: diffusers_spacing(noise, n, "linspace"),
    "trailing": lambda noise, n: diffusers_spacing(noise, n, "trailing"),
    "flow_shifted": flow_shifted,
}
"""Spacing generators by name, each ``(noise, num_steps) -> StepSchedule`` with defaults."""


def make_schedule(noise: NoiseSchedule, num_steps: int, spacing: str) -> StepSchedule:
    """Look a spacing up by name in :data:`SPACINGS`."""
    try:
        generator = SPACINGS[spacing]
    except KeyError:
        raise ValueError(f"unknown spacing {spacing!r}; choose from {sorted(SPACINGS)}") from None
    return generator(noise, num_steps)
