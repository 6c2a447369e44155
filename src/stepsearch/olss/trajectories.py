"""Teacher trajectories for OLSS: every point and model output of a many-step reference solve.

OLSS (Duan et al. 2023, Sec. 3.2) fits its coefficients to the trajectory of a converged sampler:
the samples ``x_0 = x_T, x_1, .., x_K`` at the teacher's times ``tau_0 > .. > tau_K`` and the model
outputs ``denoised_0 .. denoised_{K-1}`` seen on the way. :func:`record_teacher` records them
through the one recorder (:func:`~stepsearch.models.trajectories.record_trajectories`'s
``on_chunk``), chunk by chunk; each chunk is a *shard* stored in the
:class:`~stepsearch.cache.TensorCache` (safetensors, keyed by the model identity, the noise
schedule, the teacher, the seed and the sample range), so memory stays bounded by one chunk and a
second fit on the same model reuses the shards. :func:`record_pipeline_teacher` does the same for a
diffusers text-to-image pipeline in its own loop (the recorder's ``loop="pipeline"``: a recording
scheduler around the drop-in scheduler), so what is recorded is the *guided* (classifier-free
guidance) output the pipeline steps with.

The least-squares fits never need the raw tensors at once: :meth:`TeacherRecording.summary`
streams the shards into the R factor of a QR decomposition of the pooled column matrix
``[x_0 .. x_K, d_0 .. d_{K-1}]`` (one row per sample and pixel, float64; Demmel et al.'s
TSQR), from which every fit is an exact small least-squares problem (:mod:`stepsearch.olss.fit`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch.cache import TensorCache
from stepsearch.models.pipeline import PipelineModel
from stepsearch.models.source import SampleSource, digest_text
from stepsearch.models.trajectories import (
    DEFAULT_TEACHER,
    TeacherSpec,
    record_trajectories,
    teacher_key,
)
from stepsearch.noise import NoiseSchedule
from stepsearch.schedule import StepSchedule
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import noise_levels

__all__ = [
    "TeacherRecording",
    "TeacherTrajectory",
    "TrajectorySummary",
    "record_pipeline_teacher",
    "record_teacher",
]


@dataclass(frozen=True, eq=False)
class TeacherTrajectory:
    """One shard of a teacher solve: ``x`` ``(K + 1, m, *shape)`` (``x[0]`` the initial noise,
    ``x[K]`` the endpoint), ``denoised`` ``(K, m, *shape)`` and the float64 ``times`` ``(K + 1,)``
    of the teacher's schedule on ``noise``; ``indices`` are the sample indices of the ``m`` rows."""

    times: np.ndarray
    x: Tensor
    denoised: Tensor
    noise: NoiseSchedule
    indices: range

    @property
    def num_steps(self) -> int:
        return int(self.times.size - 1)

    def directions(self, basis: str) -> Tensor:
        """The model outputs in ``basis`` (``eps`` or ``denoised``), float64, ``(K, m, *shape)``."""
        denoised = self.denoised.double()
        if basis == "denoised":
            return denoised
        levels = noise_levels(self.noise, self.times[:-1])
        alphas = torch.tensor([level.alpha for level in levels], dtype=torch.float64)
        sigmas = torch.tensor([level.sigma for level in levels], dtype=torch.float64)
        shape = (-1,) + (1,) * (denoised.ndim - 1)
        return (self.x[:-1].double() - alphas.view(shape) * denoised) / sigmas.view(shape)

    def columns(self, basis: str) -> Tensor:
        """The pooled column matrix ``[x_0 .. x_K, d_0 .. d_{K-1}]``: ``(m * D, 2K + 1)``, float64."""
        x = self.x.double().reshape(self.num_steps + 1, -1)
        d = self.directions(basis).reshape(self.num_steps, -1)
        return torch.cat([x, d]).T


@dataclass(frozen=True, eq=False)
class TrajectorySummary:
    """The R factor of the pooled teacher columns (:meth:`TeacherTrajectory.columns`): for any
    column subset ``S`` and target column ``y``, ``||A_S c - y|| = ||R_S c - R_y||``, so every
    least-squares fit of the whole teacher set is a problem of ``2K + 1`` rows. ``num_rows`` is
    the number of pooled rows (samples x pixels) mean squared errors divide by."""

    r: Tensor
    num_rows: int
    times: np.ndarray
    noise: NoiseSchedule
    basis: str

    @property
    def num_steps(self) -> int:
        """``K``, the teacher's steps."""
        return int(self.times.size - 1)

    def x_column(self, k: int) -> int:
        return int(k)

    def d_column(self, k: int) -> int:
        return int(self.num_steps + 1 + k)

    @classmethod
    def of(
        cls, shards: Sequence[TeacherTrajectory] | Iterator[TeacherTrajectory], basis: str
    ) -> TrajectorySummary:
        """Streamed TSQR over ``shards`` (each one loaded, folded into ``R`` and dropped)."""
        r: Tensor | None = None
        rows = 0
        first: TeacherTrajectory | None = None
        for shard in shards:
            first = first or shard
            block = shard.columns(basis)
            rows += block.shape[0]
            stacked = block if r is None else torch.cat([r, block])
            r = torch.linalg.qr(stacked, mode="r").R
        if r is None or first is None:
            raise ValueError("no teacher shards to summarise")
        return cls(r, rows, first.times, first.noise, basis)


@dataclass(eq=False)
class TeacherRecording:
    """A recorded teacher: its shards in a :class:`TensorCache` (see the module docstring)."""

    cache: TensorCache
    key: dict[str, Any]
    chunks: list[range]
    times: np.ndarray
    noise: NoiseSchedule
    sample_shape: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return self.chunks[-1].stop if self.chunks else 0

    @property
    def schedule(self) -> StepSchedule:
        return StepSchedule(self.times, self.noise)

    def shard(self, chunk: range) -> TeacherTrajectory:
        found = self.cache.get("olss-teacher", _shard_key(self.key, chunk), keep_in_memory=False)
        if found is None:
            raise RuntimeError(f"teacher shard {chunk} is missing from the cache")
        return TeacherTrajectory(self.times, found["x"], found["denoised"], self.noise, chunk)

    def shards(self) -> Iterator[TeacherTrajectory]:
        for chunk in self.chunks:
            yield self.shard(chunk)

    def summary(self, basis: str) -> TrajectorySummary:
        return TrajectorySummary.of(self.shards(), basis)

    def points(self, teacher_indices: Sequence[int]) -> Tensor:
        """``x`` at the given teacher indices for every sample: ``(len, N, *shape)``."""
        picked = [self.shard(chunk).x[list(teacher_indices)] for chunk in self.chunks]
        return torch.cat(picked, dim=1)


def _shard_key(key: dict[str, Any], chunk: range) -> dict[str, Any]:
    return {**key, "chunk": [chunk.start, chunk.stop]}


def _check_teacher(solver: Any, schedule: StepSchedule) -> None:
    plan = solver.plan(schedule)
    if len(plan) != schedule.num_steps or any(not info.on_grid or info.stage for info in plan):
        raise ValueError(
            f"an OLSS teacher needs one model evaluation per step on its grid; {solver.name} "
            "evaluates elsewhere (use ddim, dpm_solver_pp_2m / 3m or unipc)"
        )


def _store_shard(recording: TeacherRecording, indices: range, x: Tensor, denoised: Tensor) -> None:
    key = _shard_key(recording.key, indices)
    tensors = {"x": x, "denoised": denoised}
    recording.cache.put("olss-teacher", key, tensors, keep_in_memory=False)


def _all_cached(recording: TeacherRecording) -> bool:
    return all(
        recording.cache.get("olss-teacher", _shard_key(recording.key, chunk), keep_in_memory=False)
        is not None
        for chunk in recording.chunks
    )


def _chunks(num_samples: int, chunk_size: int) -> list[range]:
    if isinstance(num_samples, bool) or int(num_samples) < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size!r}")
    n, size = int(num_samples), int(chunk_size)
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def record_teacher(
    source: SampleSource,
    num_samples: int,
    *,
    seed: int = 0,
    teacher: TeacherSpec = DEFAULT_TEACHER,
    cache: TensorCache | None = None,
    chunk_size: int = 256,
    progress: bool | str = False,
) -> TeacherRecording:
    """Record (or load from ``cache``) the teacher trajectories of samples ``0 .. num_samples - 1``
    of ``source`` under ``seed`` (sample ``i`` starts from the noise of ``(seed, i)``, as everywhere)."""
    schedule = teacher.schedule_on(source.noise)
    _check_teacher(get_solver(teacher.solver), schedule)
    key = teacher_key(source, teacher.to_json_dict(), seed, num_samples, chunk_size=int(chunk_size))
    recording = TeacherRecording(
        cache if cache is not None else TensorCache.default(),
        key,
        _chunks(num_samples, chunk_size),
        schedule.times.copy(),
        source.noise,
        tuple(source.sample_shape),
    )
    if not _all_cached(recording):
        record_trajectories(
            source, teacher, int(num_samples), seed=seed, decode=False, chunk_size=chunk_size,
            progress=progress,
            on_chunk=lambda indices, x, denoised: _store_shard(recording, indices, x, denoised),
        )  # fmt: skip
    return recording


# ------------------------------------------------------------------------------------------------
# text-to-image pipelines
# ------------------------------------------------------------------------------------------------


def record_pipeline_teacher(
    model: PipelineModel,
    num_samples: int,
    *,
    seed: int = 0,
    teacher: TeacherSpec = DEFAULT_TEACHER,
    cache: TensorCache | None = None,
    chunk_size: int = 16,
    progress: bool | str = False,
) -> TeacherRecording:
    """Teacher trajectories of a :class:`~stepsearch.models.pipeline.PipelineModel` (its prompts
    and guidance scale) in latent space, in the pipeline's own loop through a recording drop-in
    scheduler; image ``i`` starts from the latent noise of ``(seed, i)`` as in
    :func:`~stepsearch.models.pipeline.generate_images`."""
    noise = model.noise
    schedule = teacher.schedule_on(noise)
    _check_teacher(get_solver(teacher.solver), schedule)
    key = {
        "model": model.identity.cache_json(),  # the weights digest, computed once per load
        "prompts": digest_text("\n".join(model.prompts)),
        "guidance_scale": float(model.guidance_scale),
        "image_size": list(model.image_size),
        "noise": noise.to_config(),
        "teacher": teacher.to_json_dict(),
        "seed": int(seed),
        "num_samples": int(num_samples),
        "chunk_size": int(chunk_size),
    }
    recording = TeacherRecording(
        cache if cache is not None else TensorCache.default(),
        key,
        _chunks(num_samples, chunk_size),
        schedule.times.copy(),
        noise,
        tuple(model.latent_shape),
    )
    if not _all_cached(recording):
        record_trajectories(
            model, teacher, int(num_samples), seed=seed, loop="pipeline", chunk_size=chunk_size,
            progress=progress,
            on_chunk=lambda indices, x, denoised: _store_shard(recording, indices, x, denoised),
        )  # fmt: skip
    return recording
