"""Noise schedules on one continuous time axis.

Every diffusion model here is described by ``x_t = alpha(t) x0 + sigma(t) eps`` on a continuous time
``t`` with ``t = 0`` the clean data (``alpha(0) = 1, sigma(0) = 0``) and ``t_max`` the noisiest time.
Solvers work with the half log-SNR ``lambda(t) = log(alpha(t) / sigma(t))`` (Lu et al. 2022, DPM-Solver,
eq. 3.3), which decreases strictly with ``t``; k-diffusion's ``sigma`` is ``sigma(t) / alpha(t) =
exp(-lambda(t))``.

All maths is float64 numpy. Methods accept scalars or arrays and return ``np.float64`` for scalars,
float64 arrays otherwise.

Clamping: at ``t = 0`` ``lambda = +inf`` (clean data; solvers special-case a step to sigma = 0).
Where ``alpha`` reaches 0 (zero terminal SNR, flow matching at ``t = 1``) ``lambda`` would be
``-inf``; it is clamped from below at :data:`LAMBDA_MIN` so differences of ``lambda`` stay finite.
Discrete schedules with zero terminal SNR replace ``alphas_cumprod[-1] = 0`` by ``2**-24``, as
diffusers does (Lin et al. 2023, arXiv 2305.08891).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
Times = float | FloatArray

LAMBDA_MIN = -30.0
"""Lower clamp of ``lambda`` where ``alpha = 0`` (``exp(-30)`` ~ 1e-13)."""

ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
"""``alphas_cumprod`` floor for zero-terminal-SNR discrete schedules (diffusers' convention)."""


def _as_array(t: ArrayLike) -> FloatArray:
    array = np.asarray(t, dtype=np.float64)
    if np.isnan(array).any():
        raise ValueError("time contains NaN")
    return array


def _like_input(value: FloatArray, t: ArrayLike) -> Times:
    return np.float64(value) if np.ndim(t) == 0 else value


def _log_alpha_from_lambda(lambda_: FloatArray) -> FloatArray:
    # alpha^2 = sigmoid(2 lambda) for variance-preserving marginals.
    return -0.5 * np.logaddexp(0.0, -2.0 * lambda_)


class NoiseSchedule(ABC):
    """A forward process ``x_t = alpha(t) x0 + sigma(t) eps`` on a continuous time axis.

    Subclasses implement :meth:`_log_alpha_sigma` and :meth:`_t_from_lambda`; everything else is
    derived here. ``t_min`` is the smallest *noisy* time a model was trained on; ``t = 0`` (clean) is
    always a valid final target.
    """

    kind: ClassVar[str]
    t_min: float
    t_max: float

    @abstractmethod
    def _log_alpha_sigma(self, t: FloatArray) -> tuple[FloatArray, FloatArray]:
        """``(log alpha(t), log sigma(t))`` for ``t`` in ``[0, t_max]``."""

    @abstractmethod
    def _t_from_lambda(self, lambda_: FloatArray) -> FloatArray:
        """Inverse of ``lambda(t)``."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable description; :func:`noise_schedule_from_config` inverts it."""

    variance_preserving: ClassVar[bool] = True
    """``alpha^2 + sigma^2 = 1`` (the starting noise has unit scale)."""

    model_time_scale: ClassVar[float] = 1.0
    """The network's conditioning time is ``model_time_scale * t`` (see :meth:`model_time`)."""

    def model_time(self, t: ArrayLike) -> Times:
        """The time value a network of this family expects as its conditioning input."""
        return _like_input(_as_array(t) * self.model_time_scale, t)

    def t_from_model_time(self, model_time: ArrayLike) -> Times:
        """Inverse of :meth:`model_time`: the time axis value of a network's conditioning time."""
        return _like_input(_as_array(model_time) / self.model_time_scale, model_time)

    @property
    def t_max_finite(self) -> float:
        """The noisiest time with a finite log-SNR: ``t_max``, or one ``t_min`` below it where
        ``alpha(t_max) = 0`` (flow matching at ``t = 1``; zero-terminal-SNR betas keep
        diffusers' ``alpha_bar = 2^-24`` there, a finite log-SNR).

        Spacings defined by ``lambda`` or k-diffusion sigma (logSNR-uniform, Karras, Align Your
        Steps' closed form, beta) start here by default: from ``lambda = -inf`` (clamped at
        :data:`LAMBDA_MIN`) a uniform grid would spend its first interval on noise levels no
        sample ever sees. Pass ``t_start`` / ``sigma_max`` to start from pure noise."""
        if float(self.lambda_(self.t_max)) > LAMBDA_MIN:
            return float(self.t_max)
        return float(self.t_max - self.t_min)

    def initial_noise_scale(self, t: float) -> float:
        """Scale of the starting noise ``x_t = scale * eps`` at time ``t``: 1 for
        variance-preserving schedules (diffusers' ``init_noise_sigma = 1``; ``alpha(t_max) x0`` is
        neglected), ``sigma(t)`` otherwise (EDM / VE, flow matching)."""
        return 1.0 if self.variance_preserving else float(self.sigma(t))

    def _check_range(self, t: FloatArray) -> None:
        tolerance = 1e-9 * max(1.0, self.t_max)
        if (t < -tolerance).any() or (t > self.t_max + tolerance).any():
            bad = float(t[(t < -tolerance) | (t > self.t_max + tolerance)].ravel()[0])
            raise ValueError(f"time {bad!r} outside [0, {self.t_max}] of {type(self).__name__}")

    def log_alpha(self, t: ArrayLike) -> Times:
        array = _as_array(t)
        self._check_range(array)
        with np.errstate(divide="ignore"):
            log_alpha = self._log_alpha_sigma(np.clip(array, 0.0, self.t_max))[0]
        return _like_input(log_alpha, t)

    def alpha(self, t: ArrayLike) -> Times:
        """Signal scale ``alpha(t)``."""
        return np.exp(self.log_alpha(t))

    def sigma(self, t: ArrayLike) -> Times:
        """Noise scale ``sigma(t)``."""
        array = _as_array(t)
        self._check_range(array)
        with np.errstate(divide="ignore"):
            log_sigma = self._log_alpha_sigma(np.clip(array, 0.0, self.t_max))[1]
        return _like_input(np.exp(log_sigma), t)

    def lambda_(self, t: ArrayLike) -> Times:
        """Half log-SNR ``log(alpha / sigma)``: ``+inf`` at ``t = 0``, clamped at ``LAMBDA_MIN``."""
        array = _as_array(t)
        self._check_range(array)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_alpha, log_sigma = self._log_alpha_sigma(np.clip(array, 0.0, self.t_max))
            value = np.maximum(log_alpha - log_sigma, LAMBDA_MIN)
        return _like_input(value, t)

    def t_from_lambda(self, lambda_: ArrayLike) -> Times:
        """Inverse of :meth:`lambda_` (``+inf`` maps to ``t = 0``)."""
        array = np.asarray(lambda_, dtype=np.float64)
        if np.isnan(array).any():
            raise ValueError("lambda contains NaN")
        with np.errstate(over="ignore", divide="ignore"):
            t = self._t_from_lambda(array)
        return _like_input(np.clip(t, 0.0, self.t_max), lambda_)

    def kdiffusion_sigma(self, t: ArrayLike) -> Times:
        """k-diffusion / EDM sigma ``sigma(t) / alpha(t) = exp(-lambda(t))`` (0 at ``t = 0``)."""
        return _like_input(np.exp(-np.asarray(self.lambda_(t))), t)

    def t_from_kdiffusion_sigma(self, kdiffusion_sigma: ArrayLike) -> Times:
        """Inverse of :meth:`kdiffusion_sigma`."""
        array = np.asarray(kdiffusion_sigma, dtype=np.float64)
        if np.isnan(array).any() or (array < 0).any():
            raise ValueError("k-diffusion sigmas must be non-negative numbers")
        with np.errstate(divide="ignore"):
            lambda_ = -np.log(array)
        return self.t_from_lambda(_like_input(lambda_, kdiffusion_sigma))

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}"
            for k, v in self.to_config().items()
            if k != "kind" and not isinstance(v, list)
        )
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and self.to_config() == other.to_config()

    def __hash__(self) -> int:
        return hash(repr(self))


# --------------------------------------------------------------------------------------------
# Discrete variance-preserving schedules (DDPM, Stable Diffusion, ...)
# --------------------------------------------------------------------------------------------


def betas_for_schedule(
    beta_schedule: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> FloatArray:
    """diffusers' beta schedules, in float64.

    ``linear`` and ``scaled_linear`` (Stable Diffusion), ``squaredcos_cap_v2`` (Nichol & Dhariwal
    2021, cosine ``alpha_bar`` with betas capped at 0.999), ``exp`` (``alpha_bar(u) = e^{-12 u}``,
    diffusers' ``betas_for_alpha_bar(alpha_transform_type="exp")``) and ``sigmoid`` (GeoDiff).
    """
    n = int(num_train_timesteps)
    if n < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(u: FloatArray) -> FloatArray:
            return np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(n, dtype=np.float64)
        betas = 1.0 - alpha_bar((steps + 1) / n) / alpha_bar(steps / n)
        return np.minimum(betas, 0.999)
    if beta_schedule == "exp":  # alpha_bar(u) = exp(-12 u): constant betas, capped at 0.999
        return np.full(n, min(-math.expm1(-12.0 / n), 0.999), dtype=np.float64)
    if beta_schedule == "sigmoid":
        ramp = np.linspace(-6.0, 6.0, n, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-ramp)) * (beta_end - beta_start) + beta_start
    raise ValueError(
        f"unknown beta_schedule {beta_schedule!r}; expected one of "
        "'linear', 'scaled_linear', 'squaredcos_cap_v2', 'exp', 'sigmoid' (or pass trained_betas)"
    )


def rescale_zero_terminal_snr(alphas_cumprod: ArrayLike) -> FloatArray:
    """Shift and scale ``sqrt(alphas_cumprod)`` so the last step has zero SNR (Lin et al. 2023,
    Algorithm 1); the first value is unchanged."""
    sqrt_alpha_bar = np.sqrt(np.asarray(alphas_cumprod, dtype=np.float64))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    rescaled = (sqrt_alpha_bar - last) * first / (first - last)
    return rescaled**2


class DiscreteVP(NoiseSchedule):
    """A variance-preserving schedule given at ``N`` trained steps (``alphas_cumprod``).

    Time convention (as in dpm-solver): trained index ``n`` sits at ``t = (n + 1) / N``, so
    ``t_min = 1 / N``, ``t_max = 1``; ``t = 0`` is clean data (index ``-1``, diffusers'
    ``final_alpha_cumprod = 1``). ``log alpha`` is piecewise linear in ``t`` between these knots,
    so the schedule agrees exactly with the trained values and is continuous in between.
    """

    kind = "discrete_vp"

    def __init__(self, alphas_cumprod: ArrayLike, *, config: Mapping[str, Any] | None = None):
        alphas_cumprod = np.array(alphas_cumprod, dtype=np.float64).ravel()
        if alphas_cumprod.size < 2:
            raise ValueError("alphas_cumprod needs at least 2 trained steps")
        if not np.isfinite(alphas_cumprod).all():
            raise ValueError("alphas_cumprod contains NaN or Inf")
        if (alphas_cumprod > 1).any() or (alphas_cumprod < 0).any():
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        if alphas_cumprod[-1] == 0.0:  # zero terminal SNR: keep lambda finite
            alphas_cumprod[-1] = min(ZERO_SNR_ALPHA_CUMPROD, 0.5 * alphas_cumprod[-2])
        decreasing = np.diff(alphas_cumprod) < 0
        if not decreasing.all():
            index = int(np.argmin(decreasing)) + 1
            raise ValueError(
                f"alphas_cumprod must decrease strictly; index {index} has "
                f"{float(alphas_cumprod[index])!r} after {float(alphas_cumprod[index - 1])!r}"
            )
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod.setflags(write=False)
        self.num_train_timesteps = alphas_cumprod.size
        self.t_min = 1.0 / self.num_train_timesteps
        self.t_max = 1.0
        self._knot_t = np.arange(self.num_train_timesteps + 1, dtype=np.float64)
        self._knot_t /= self.num_train_timesteps
        self._knot_log_alpha = np.concatenate([[0.0], 0.5 * np.log(alphas_cumprod)])
        self._config = dict(config) if config is not None else None

    # constructors ---------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: ArrayLike) -> DiscreteVP:
        betas = np.asarray(betas, dtype=np.float64)
        if not np.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("betas must be finite and in (0, 1)")
        return cls(np.cumprod(1.0 - betas))

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any] | Any) -> DiscreteVP:
        """Build from a diffusers scheduler (or its ``config``): ``num_train_timesteps``,
        ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``,
        ``rescale_betas_zero_snr``."""
        if hasattr(config, "config") and not isinstance(config, Mapping):
            config = config.config
        params = {
            "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
            "beta_start": float(config.get("beta_start", 0.0001)),
            "beta_end": float(config.get("beta_end", 0.02)),
            "beta_schedule": str(config.get("beta_schedule", "linear")),
            "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False)),
        }
        trained = config.get("trained_betas")
        if trained is not None:
            betas = np.asarray(trained, dtype=np.float64)
            params["trained_betas"] = betas.tolist()
            params["num_train_timesteps"] = betas.size
        else:
            betas = betas_for_schedule(
                params["beta_schedule"],
                params["num_train_timesteps"],
                params["beta_start"],
                params["beta_end"],
            )
        if not np.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("betas must be finite and in (0, 1)")
        alphas_cumprod = np.cumprod(1.0 - betas)
        if params["rescale_betas_zero_snr"]:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        return cls(alphas_cumprod, config=params)

    @classmethod
    def stable_diffusion(cls) -> DiscreteVP:
        """Stable Diffusion 1.x / 2.x / SDXL: ``scaled_linear`` betas 0.00085 to 0.012."""
        return cls.from_diffusers_config(
            {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
        )

    # time axis ------------------------------------------------------------------------------
    def _log_alpha_sigma(self, t: FloatArray) -> tuple[FloatArray, FloatArray]:
        log_alpha = np.interp(t, self._knot_t, self._knot_log_alpha)
        return log_alpha, 0.5 * np.log(-np.expm1(2.0 * log_alpha))

    def _t_from_lambda(self, lambda_: FloatArray) -> FloatArray:
        log_alpha = _log_alpha_from_lambda(lambda_)
        return np.interp(log_alpha, self._knot_log_alpha[::-1], self._knot_t[::-1])

    def timestep_from_t(self, t: ArrayLike) -> Times:
        """diffusers' (fractional) train-timestep index ``t N - 1`` (``-1`` is clean data)."""
        return _like_input(_as_array(t) * self.num_train_timesteps - 1.0, t)

    def t_from_timestep(self, timestep: ArrayLike) -> Times:
        """Inverse of :meth:`timestep_from_t`."""
        return _like_input((_as_array(timestep) + 1.0) / self.num_train_timesteps, timestep)

    def model_time(self, t: ArrayLike) -> Times:
        return self.timestep_from_t(t)

    def t_from_model_time(self, model_time: ArrayLike) -> Times:
        return self.t_from_timestep(model_time)

    @property
    def betas(self) -> FloatArray:
        """Per-step ``beta_n = 1 - alpha_bar_n / alpha_bar_{n-1}`` (DDPM, Ho et al. 2020, eq. 4)."""
        previous = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        return 1.0 - self.alphas_cumprod / previous

    def to_config(self) -> dict[str, Any]:
        if self._config is not None:
            return {"kind": self.kind, **self._config}
        return {"kind": self.kind, "alphas_cumprod": self.alphas_cumprod.tolist()}


# --------------------------------------------------------------------------------------------
# Continuous-time schedules
# --------------------------------------------------------------------------------------------


class LinearVP(NoiseSchedule):
    """Continuous VP with linear ``beta(t) = beta_0 + t (beta_1 - beta_0)`` (Song et al. 2021):
    ``log alpha(t) = -(beta_1 - beta_0) t^2 / 4 - beta_0 t / 2``."""

    kind = "linear_vp"

    def __init__(
        self, beta_0: float = 0.1, beta_1: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0
    ):
        if not 0 < beta_0 < beta_1:
            raise ValueError("need 0 < beta_0 < beta_1")
        if not 0 < t_min < t_max:
            raise ValueError("need 0 < t_min < t_max")
        self.beta_0, self.beta_1, self.t_min, self.t_max = beta_0, beta_1, t_min, t_max

    def _log_alpha_sigma(self, t: FloatArray) -> tuple[FloatArray, FloatArray]:
        log_alpha = -0.25 * (self.beta_1 - self.beta_0) * t**2 - 0.5 * self.beta_0 * t
        return log_alpha, 0.5 * np.log(-np.expm1(2.0 * log_alpha))

    def _t_from_lambda(self, lambda_: FloatArray) -> FloatArray:
        # Solve (beta_1 - beta_0)/4 t^2 + beta_0/2 t - L = 0, L = -log alpha, in a stable form.
        minus_log_alpha = -_log_alpha_from_lambda(lambda_)
        half_beta_0 = 0.5 * self.beta_0
        root = np.sqrt(half_beta_0**2 + (self.beta_1 - self.beta_0) * minus_log_alpha)
        return 2.0 * minus_log_alpha / (half_beta_0 + root)

    model_time_scale = 999.0
    """score_sde convention: the network sees ``999 t``."""

    def to_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "beta_0": self.beta_0,
            "beta_1": self.beta_1,
            "t_min": self.t_min,
            "t_max": self.t_max,
        }


class CosineVP(NoiseSchedule):
    """Continuous cosine VP (Nichol & Dhariwal 2021):
    ``alpha(t) = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s))``; ``t_max`` < 1 avoids the
    singularity at ``t = 1`` (dpm-solver uses 0.9946)."""

    kind = "cosine_vp"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        if not 0 < t_min < t_max < 1:
            raise ValueError("need 0 < t_min < t_max < 1")
        self.s, self.t_min, self.t_max = s, t_min, t_max
        self._log_cos_0 = math.log(math.cos(math.pi / 2 * s / (1 + s)))

    def _log_alpha_sigma(self, t: FloatArray) -> tuple[FloatArray, FloatArray]:
        log_alpha = np.log(np.cos(math.pi / 2 * (t + self.s) / (1 + self.s))) - self._log_cos_0
        return log_alpha, 0.5 * np.log(-np.expm1(2.0 * log_alpha))

    def _t_from_lambda(self, lambda_: FloatArray) -> FloatArray:
        log_alpha = _log_alpha_from_lambda(lambda_)
        angle = np.arccos(np.exp(log_alpha + self._log_cos_0))
        return angle * 2.0 * (1 + self.s) / math.pi - self.s

    model_time_scale = 999.0

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "s": self.s, "t_min": self.t_min, "t_max": self.t_max}


class EDM(NoiseSchedule):
    """Variance-exploding / EDM (Karras et al. 2022): ``alpha = 1``, ``sigma = t``."""

    kind = "edm"
    variance_preserving = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def _log_alpha_sigma(self, t: FloatArray) -> tuple[FloatArray, FloatArray]:
        with np.errstate(divide="ignore"):
            return np.zeros_like(t), np.log(t)

    def _t_from_lambda(self, lambda_: FloatArray) -> FloatArray:
        return np.exp(-lambda_)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "sigma_min": self.t_min, "sigma_max": self.t_max}


def flow_shift(t: ArrayLike, shift: float) -> Times:
    """SD3's resolution shift ``s t / (1 + (s - 1) t)`` (Esser et al. 2024, eq. 23): moves a
    time-uniform flow grid towards noise for ``s > 1``."""
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    array = _as_array(t)
    return _like_input(shift * array / (1.0 + (shift - 1.0) * array), t)


TIME_SHIFT_TYPES = ("exponential", "linear")


def dynamic_flow_shift(t: ArrayLike, mu: float, kind: str = "exponential") -> Times:
    """Flux's resolution-dependent shift of flow times ``t`` in (0, 1]:
    ``e^mu / (e^mu + (1/t - 1))`` (``exponential``, the SD3 shift with ``s = e^mu``) or
    ``mu / (mu + (1/t - 1))`` (``linear``, the SD3 shift with ``s = mu``)."""
    if kind not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {kind!r}")
    return flow_shift(t, math.exp(float(mu)) if kind == "exponential" else float(mu))


def stretch_to_terminal(t: ArrayLike, terminal: float) -> FloatArray:
    """LTX-Video's ``shift_terminal``: rescale ``1 - t`` so the last of the decreasing times ``t``
    becomes ``terminal`` while ``t = 1`` stays put."""
    array = np.asarray(_as_array(t), dtype=np.float64)
    if not 0.0 < terminal < 1.0:
        raise ValueError(f"shift_terminal must lie in (0, 1), got {terminal!r}")
    one_minus = 1.0 - array
    return 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))


class FlowMatching(NoiseSchedule):
    """Rectified flow / flow matching (SD3, Flux): ``x_t = (1 - t) x0 + t eps``, ``t`` in [0, 1].

    ``shift`` is the SD3 / Flux resolution shift applied by :meth:`shift_time` when a spacing is
    generated; it does not change the forward process itself.
    """

    kind = "flow_matching"
    variance_preserving = False

    def __init__(self, shift: float = 1.0, t_min: float = 1e-3, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ValueError("shift must be positive")
        if not 0 < t_min < 1:
            raise ValueError("need 0 < t_min < 1")
        self.shift, self.t_min, self.t_max = float(shift), float(t_min), 1.0
        self.num_train_timesteps = int(num_train_timesteps)

    def _log_alpha_sigma(self, t: FloatArray) -> tuple[FloatArray, FloatArray]:
        with np.errstate(divide="ignore"):
            return np.log1p(-t), np.log(t)

    def _t_from_lambda(self, lambda_: FloatArray) -> FloatArray:
        return 1.0 / (1.0 + np.exp(lambda_))

    def shift_time(self, t: ArrayLike, shift: float | None = None) -> Times:
        """SD3's shift (:func:`flow_shift`) by ``shift`` (default: the schedule's own)."""
        return flow_shift(t, self.shift if shift is None else shift)

    @property
    def model_time_scale(self) -> float:  # type: ignore[override]
        """diffusers' flow pipelines pass ``timestep = t * num_train_timesteps``."""
        return float(self.num_train_timesteps)

    def to_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shift": self.shift,
            "t_min": self.t_min,
            "num_train_timesteps": self.num_train_timesteps,
        }


_KINDS: dict[str, type[NoiseSchedule]] = {
    cls.kind: cls for cls in (DiscreteVP, LinearVP, CosineVP, EDM, FlowMatching)
}


def noise_schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """Inverse of :meth:`NoiseSchedule.to_config`."""
    params = dict(config)
    kind = params.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown noise schedule kind {kind!r}; expected one of {sorted(_KINDS)}")
    if kind == DiscreteVP.kind:
        if "alphas_cumprod" in params:
            return DiscreteVP(params["alphas_cumprod"])
        return DiscreteVP.from_diffusers_config(params)
    try:
        return _KINDS[kind](**params)
    except TypeError as error:
        raise ValueError(f"bad parameters for noise schedule {kind!r}: {error}") from None
