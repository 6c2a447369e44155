"""The Align Your Steps job on a sample source: KLUB search, early stopping, refinement, schedule file.

:func:`search_ays` is what ``stepsearch search ays`` runs::

    source = load_source("digits")
    objective = Objective(source, "traj", num_samples=256)     # the early-stopping proxy
    result = search_ays(source, "dpm_solver_pp_2m", nfe=10, objective=objective,
                        checkpoint="ays.ckpt.json")
    result.schedule_file.save("ays10.json")

Strategies (``AYSConfig.strategy``):

- ``"hierarchical"`` (the paper's): optimise ``base_intervals`` (10) intervals from the start spacing
  (time-uniform for discrete and flow models, Karras for continuous ones), then up to
  ``refinements`` (2) rounds of log-midpoint subdivision optimising only the new points
  (10 -> 20 -> 40; the rounds stop once a stage has at least the requested step count), then
  log-linear interpolation (:func:`~stepsearch.schedule.loglinear_interpolate`) to the requested
  step count;
- ``"direct"``: optimise the requested step count itself;
- ``"both"``: run the two and keep the one with the better proxy on the search seed.

The proxy is ``objective(schedule, solver)`` on the objective's *search* seed, always at the
requested step count. The held-out seed is scored once, for the report, after the search.

The solver enters through the proxy (early stopping, and the choice between strategies) and,
optionally, through the KLUB's order: ``order=1`` (default) is the paper's bound, derived for
stochastic DDIM and used by the paper for every solver; ``order=None`` picks 2 for higher-order
solvers (the bound of a multistep solver's linearised SDE, :mod:`stepsearch.ays.klub`), which costs
three model evaluations per Monte Carlo sample instead of two and touches three intervals per move.

Text-to-image and latent models (the paper's COCO setup): :func:`pipeline_ays_inputs` turns a local
diffusers pipeline and a folder of (prompt, image) pairs into a
:class:`~stepsearch.models.pipeline.PipelineModel` (the UNet conditioned on each pair's
prompt, guided) and the pairs' VAE latents; every KLUB sample is denoised with its own caption::

    source, latents = pipeline_ays_inputs("./sd15", "./coco_pairs", guidance_scale=7.5)
    result = search_ays(source, "dpm_solver_pp_2m", nfe=10, data=latents,
                        objective=Objective(source, "traj", num_samples=32))

Resumable: the whole search state is written atomically (JSON) to ``checkpoint`` after every sweep;
running again with the same arguments resumes it and ends with the same schedule as a run that was
never interrupted (the Monte Carlo draws are fixed by the seed). Other arguments raise ``ValueError``.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch._io import atomic_write_bytes, atomic_write_json, read_json
from stepsearch.ays.klub import KLUBEstimator
from stepsearch.ays.optimize import (
    SearchSettings,
    SearchState,
    coordinate_search,
    initial_state,
    subdivide,
)
from stepsearch.cache import TensorCache, tensor_digest
from stepsearch.eval.images import iter_image_batches
from stepsearch.eval.objective import Objective, Score
from stepsearch.integrations.load import write_scheduler_dir
from stepsearch.models import (
    DEFAULT_GUIDANCE_SCALE,
    TeacherSpec,
    load_model,
    load_source,
    model_dtype,
    pipeline_guidance_scale,
)
from stepsearch.models.pipeline import (
    encode_images,
    load_pipeline,
    load_prompt_image_pairs,
    native_image_size,
)
from stepsearch.models.source import SampleSource
from stepsearch.noise import DiscreteVP, FlowMatching, NoiseSchedule
from stepsearch.schedule import StepSchedule, loglinear_interpolate, make_schedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.solvers import get_solver, solver_to_json
from stepsearch.solvers.base import Solver

__all__ = [
    "STRATEGIES",
    "AYSConfig",
    "AYSResult",
    "AYSRun",
    "klub_order",
    "pipeline_ays_inputs",
    "run_ays_job",
    "search_ays",
    "with_held_out",
]

STRATEGIES = ("hierarchical", "direct", "both")
CHECKPOINT_FORMAT = "stepsearch.AYSCheckpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class AYSConfig:
    """Settings of :func:`search_ays` (module docstring); ``num_samples`` are KLUB Monte Carlo
    samples per interval, ``seed`` seeds their draws."""

    strategy: str = "hierarchical"
    base_intervals: int = 10
    refinements: int = 2
    start: str | None = None
    num_samples: int = 64
    seed: int = 0
    sigma_data: float = 0.5
    proposal: str = "gaussian"
    order: int | None = 1
    batch_size: int = 2048
    snap: bool = True
    radius: float = 0.5
    min_radius: float = 1.0 / 16
    max_sweeps: int = 12
    patience: int = 2

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.base_intervals < 2 or self.refinements < 0:
            raise ValueError("need base_intervals >= 2 and refinements >= 0")

    @property
    def settings(self) -> SearchSettings:
        return SearchSettings(self.radius, self.min_radius, self.max_sweeps, self.patience)

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AYSRun:
    """One strategy's outcome: its schedule at the requested step count, the search states of its
    stages (KLUB and proxy history) and its search-seed score."""

    strategy: str
    schedule: StepSchedule
    stages: list[SearchState]
    score: Score


@dataclass
class AYSResult:
    """What :func:`search_ays` returns: the chosen schedule file and every run."""

    schedule_file: ScheduleFile
    runs: dict[str, AYSRun]
    chosen: str
    seconds: float
    held_out: Score | None
    """The chosen schedule's held-out score (``None``: not scored yet, see :func:`search_ays`)."""
    klub_evaluations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def schedule(self) -> StepSchedule:
        return self.schedule_file.schedule


def klub_order(solver: Solver) -> int:
    """The KLUB's order for ``solver``: 1 for first-order solvers, 2 for higher-order ones."""
    return 1 if int(getattr(solver, "order", 1)) <= 1 else 2


def default_start(noise: NoiseSchedule) -> str:
    """Time-uniform for discrete and flow models, Karras for continuous ones (AYS Sec. 3.3)."""
    return "time_uniform" if isinstance(noise, (DiscreteVP, FlowMatching)) else "karras"


def _schedule(noise: NoiseSchedule, sigmas: list[float], num_steps: int) -> StepSchedule:
    """Noisy ``sigmas`` + a clean end, resampled log-linearly to ``num_steps`` if needed."""
    schedule = StepSchedule.from_kdiffusion_sigmas(noise, [*sigmas, 0.0], clip_to_range=True)
    return (
        schedule if schedule.num_steps == num_steps else loglinear_interpolate(schedule, num_steps)
    )


def _snapped(schedule: StepSchedule) -> StepSchedule:
    """Snap a discrete schedule to trained steps unless that would merge two points."""
    if not isinstance(schedule.noise, DiscreteVP):
        return schedule
    times = schedule.times.copy()
    noisy = times > 0
    timesteps = np.rint(np.asarray(schedule.noise.timestep_from_t(times[noisy])))
    if np.unique(timesteps).size < timesteps.size:
        return schedule
    return schedule.snapped_to_trained_steps()


def _load_data(data: Tensor | str | os.PathLike[str] | None, source: SampleSource) -> Tensor:
    if data is None:
        if source.reference_data is None:
            raise ValueError(
                f"{source.identity.name} has no reference data: pass data (a tensor, an image "
                "folder or a .safetensors file)"
            )
        return source.reference_data
    if isinstance(data, Tensor):
        return data
    return torch.cat(list(iter_image_batches(data, progress=False)))


class _Checkpoint:
    """The JSON checkpoint: a fingerprint of the arguments and the states of every stage."""

    def __init__(self, path: str | os.PathLike[str] | None, fingerprint: dict[str, Any]):
        self.path = Path(path) if path is not None else None
        self.fingerprint = fingerprint
        self.runs: dict[str, list[dict[str, Any]]] = {}
        if self.path is not None and self.path.exists():
            payload = read_json(self.path)
            if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{self.path}: not an AYS checkpoint")
            if payload.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{self.path} is a checkpoint of another AYS search (other model, data, solver "
                    "or settings); delete it or choose another checkpoint path"
                )
            self.runs = payload.get("runs", {})

    def stages(self, strategy: str) -> list[dict[str, Any]]:
        return self.runs.setdefault(strategy, [])

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(
                self.path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "version": CHECKPOINT_VERSION,
                    "fingerprint": self.fingerprint,
                    "runs": self.runs,
                },
            )


def hierarchical_plan(base_intervals: int, refinements: int, num_steps: int) -> list[int]:
    """Interval counts of the hierarchical stages: ``base * 2^r`` for ``r = 0 .. refinements``,
    stopping at the first that reaches ``num_steps`` (a finer stage would only be interpolated back
    down to ``num_steps``: the paper refines to serve larger step counts)."""
    plan: list[int] = []
    for refinement in range(refinements + 1):
        plan.append(base_intervals * 2**refinement)
        if plan[-1] >= num_steps:
            break
    return plan


def _run_strategy(
    strategy: str,
    estimator: KLUBEstimator,
    noise: NoiseSchedule,
    num_steps: int,
    config: AYSConfig,
    proxy: Callable[[list[float]], float],
    checkpoint: _Checkpoint,
    on_progress: Callable[[str, int, SearchState], None] | None,
) -> list[SearchState]:
    start = config.start or default_start(noise)
    saved = checkpoint.stages(strategy)
    if strategy == "direct":
        plan = [num_steps]
    else:
        plan = hierarchical_plan(config.base_intervals, config.refinements, num_steps)
    states: list[SearchState] = []
    for index, intervals in enumerate(plan):
        if index < len(saved):
            state = SearchState.from_json_dict(saved[index])
        else:
            if index == 0:
                count = intervals if strategy == "direct" else intervals + 1
                noisy = make_schedule(noise, count, start).to_kdiffusion_sigmas()[:-1]
                sigmas, free = [float(v) for v in noisy], None
            else:
                sigmas, free = subdivide(states[-1].result())
            state = initial_state(estimator, sigmas, free, config.settings)
            saved.append(state.to_json_dict())

        def record(current: SearchState, index: int = index) -> None:
            saved[index] = current.to_json_dict()
            checkpoint.save()
            if on_progress is not None:
                on_progress(strategy, index, current)

        states.append(
            coordinate_search(estimator, state, config.settings, proxy=proxy, on_sweep=record)
        )
    return states


def search_ays(
    source: SampleSource,
    solver: str | Solver,
    nfe: int,
    *,
    data: Tensor | str | os.PathLike[str] | None = None,
    objective: Objective | None = None,
    config: AYSConfig | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    on_progress: Callable[[str, int, SearchState], None] | None = None,
    held_out: bool = True,
) -> AYSResult:
    """Optimise a schedule for ``source`` and ``solver`` at ``nfe`` model evaluations (module
    docstring); ``data`` defaults to the source's reference data, ``objective`` to trajectory error
    on 256 samples. ``on_progress(strategy, stage, state)`` sees every sweep. ``held_out=False``
    leaves the held-out score to the caller (``None`` in the result and its provenance: the
    caller writes the result first, then scores it with :func:`with_held_out`).

    ``data`` lives in the space the solver integrates (latents for a latent model). For a
    conditional source, ``data[i]`` goes with the conditioning of sample index ``i`` (a
    :class:`~stepsearch.models.pipeline.PipelineModel` built on the pairs' prompts: see
    :func:`pipeline_ays_inputs`), and every KLUB row is denoised with its own sample's prompt."""
    began = time.perf_counter()
    config = config or AYSConfig()
    run_solver = get_solver(solver) if isinstance(solver, str) else solver
    if isinstance(nfe, bool) or int(nfe) < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    noise = source.noise
    num_steps = run_solver.num_steps_for_nfe(int(nfe))
    objective = objective or Objective(source, "traj", num_samples=256)
    if objective.source is not source and objective.source.identity != source.identity:
        raise ValueError("the objective scores another model than the one searched")
    samples = _load_data(data, source).to(source.device, source.dtype)
    if tuple(samples.shape[1:]) != tuple(source.sample_shape):
        raise ValueError(
            f"data samples have shape {tuple(samples.shape[1:])}, the model's are "
            f"{tuple(source.sample_shape)} (a latent model needs latents: "
            "stepsearch.models.pipeline.encode_images)"
        )
    order = config.order or klub_order(run_solver)
    estimator = KLUBEstimator(
        source.denoiser([0]),  # its noise schedule; the rows go through `conditioned`
        samples,
        conditioned=source.denoiser,  # row j sees data sample j's prompt / label (if any)
        num_samples=config.num_samples,
        seed=config.seed,
        order=order,
        sigma_data=config.sigma_data,
        proposal=config.proposal,
        batch_size=config.batch_size,
        device=source.device,
        dtype=source.dtype,
    )
    fingerprint = {
        "model": source.identity.to_json_dict(),
        "noise": noise.to_config(),
        "solver": solver_to_json(run_solver),
        "nfe": int(nfe),
        "config": config.to_json_dict(),
        "order": order,
        "data": "sha256:" + tensor_digest({"data": samples.detach().cpu().contiguous()}),
        # what the search sees (the held-out sample count only changes the report)
        "objective": {k: v for k, v in objective.describe().items() if k != "held_out_samples"},
    }
    store = _Checkpoint(checkpoint, fingerprint)

    def proxy(sigmas: list[float]) -> float:
        value = objective(_schedule(noise, sigmas, num_steps), run_solver).value
        return value if math.isfinite(value) else math.inf

    strategies = ["hierarchical", "direct"] if config.strategy == "both" else [config.strategy]
    runs: dict[str, AYSRun] = {}
    for strategy in strategies:
        states = _run_strategy(
            strategy, estimator, noise, num_steps, config, proxy, store, on_progress
        )
        schedule = _schedule(noise, states[-1].result(), num_steps)
        if config.snap:
            schedule = _snapped(schedule)
        runs[strategy] = AYSRun(strategy, schedule, states, objective(schedule, run_solver))
    chosen = min(runs, key=lambda name: runs[name].score.value)
    final = runs[chosen]
    held_out_score = objective.held_out(final.schedule, run_solver) if held_out else None
    settings = {
        **config.to_json_dict(),
        "klub": estimator.describe(),
        "chosen": chosen,
        "runs": {
            name: {
                "search_score": run.score.to_json_dict(),
                "stages": [
                    {
                        "sigmas": state.result(),
                        "sweeps": state.sweeps,
                        "reason": state.reason,
                        "history": state.history,
                    }
                    for state in run.stages
                ],
            }
            for name, run in runs.items()
        },
    }
    schedule = final.schedule.with_metadata(spacing="ays", strategy=chosen, solver=run_solver.name)
    provenance = objective.provenance(run_solver, final.score, held_out_score, "ays", settings)
    return AYSResult(
        ScheduleFile(schedule, provenance),
        runs,
        chosen,
        time.perf_counter() - began,
        held_out_score,
        estimator.evaluations,
    )


def with_held_out(result: AYSResult, objective: Objective, solver: str | Solver) -> AYSResult:
    """``result`` (of ``search_ays(..., held_out=False)``) with its held-out score on
    ``objective``, in the result and in its schedule file's provenance."""
    run_solver = get_solver(solver) if isinstance(solver, str) else solver
    score = objective.held_out(result.schedule, run_solver)
    provenance = result.schedule_file.provenance
    scores = {**provenance.scores, "held_out": score.to_json_dict()}
    schedule_file = ScheduleFile(result.schedule, replace(provenance, scores=scores))
    return replace(result, schedule_file=schedule_file, held_out=score)


def plot_result(result: AYSResult, path: str | os.PathLike[str]) -> Path:
    """A PNG: the schedule against time-uniform, Karras and logSNR spacings at the same step count
    (k-diffusion sigma, log scale), and the KLUB over sweeps of every run and stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedule = result.schedule
    noise, steps = schedule.noise, schedule.num_steps
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("time_uniform", "karras", "logsnr_uniform"):
        sigmas = make_schedule(noise, steps, name).to_kdiffusion_sigmas()[:-1]
        left.plot(np.arange(sigmas.size), sigmas, "o--", ms=3, label=name)
    for name, run in result.runs.items():
        sigmas = run.schedule.to_kdiffusion_sigmas()
        sigmas = sigmas[sigmas > 0]
        left.plot(np.arange(sigmas.size), sigmas, "o-", lw=2, label=f"AYS ({name})")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("k-diffusion sigma")
    left.set_title(f"{steps}-step schedules")
    left.legend(fontsize=8)
    offset = 0
    for name, run in result.runs.items():
        for stage, state in enumerate(run.stages):
            sweeps = [entry["sweep"] + offset for entry in state.history]
            klub = [entry["klub"] for entry in state.history]
            right.plot(sweeps, klub, "o-", ms=3, label=f"{name} stage {stage}")
            offset = sweeps[-1] + 1
    right.set_yscale("log")
    right.set_xlabel("sweep")
    right.set_ylabel("KLUB estimate")
    right.set_title("KLUB over iterations")
    right.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())  # fsynced, then renamed


def pipeline_ays_inputs(
    pipeline: str | os.PathLike[str] | Any,
    pairs: str | os.PathLike[str],
    *,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    device: str = "cpu",
    progress: bool = False,
    dtype: str | None = None,
) -> tuple[SampleSource, Tensor]:
    """The source and KLUB data of Align Your Steps on a text-to-image pipeline (the paper's COCO
    setup): (prompt, image) pairs from the folder ``pairs`` (``metadata.jsonl``, see
    :func:`~stepsearch.models.pipeline.load_prompt_image_pairs`) resized to the pipeline's
    native size and encoded by its VAE; the source's prompt ``i`` is pair ``i``'s, so each data
    latent is denoised conditioned on its own caption, with classifier-free guidance at
    ``guidance_scale``; the pipeline runs in ``dtype`` (default: as stored)."""
    pipe = load_pipeline(
        pipeline, device=device, torch_dtype=None if dtype is None else model_dtype(dtype)
    )
    loaded = load_prompt_image_pairs(pairs, size=native_image_size(pipe))
    name = Path(pipeline).name if isinstance(pipeline, str | os.PathLike) else "pipeline"
    model = load_model(
        pipeline=pipe, prompts=loaded.prompts, guidance_scale=guidance_scale, device=device,
        name=name,
    )  # fmt: skip
    model.check_denoiser()  # type: ignore[union-attr]
    latents = encode_images(pipe, loaded.images, progress=progress)
    return model, latents


def run_ays_job(
    model: str | None,
    nfe: int,
    out: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    pipeline: str | os.PathLike[str] | None = None,
    guidance_scale: float | None = None,
    solver: str = "dpm_solver_pp_2m",
    config: AYSConfig | None = None,
    metric: str = "traj",
    proxy_samples: int = 256,
    held_out_samples: int | None = None,
    teacher_steps: int = 100,
    checkpoint: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    on_progress: Callable[[str, int, SearchState], None] | None = None,
    seed: int | None = None,
) -> AYSResult:
    """What ``stepsearch search ays`` does: load the model (a bundled model, ``digits-cond`` at
    ``guidance_scale``, default 2, or a local diffusers ``UNet2DModel`` directory; or, with
    ``pipeline``, a local text-to-image pipeline directory with ``data`` a folder of (prompt,
    image) pairs, see :func:`pipeline_ays_inputs`, guidance default
    :data:`~stepsearch.models.pipeline.DEFAULT_GUIDANCE_SCALE`), build the proxy objective
    (``metric`` on ``proxy_samples`` samples of noise seed ``seed``, ``held_out_samples``
    (default: as many) of ``seed + 1``; for ``traj`` the teacher is DPM-Solver++(3M) on
    ``teacher_steps`` logSNR steps, cached), search (resuming ``checkpoint``) and write the
    result into the folder ``out``: ``best_schedule.json`` and ``scheduler/`` (a drop-in
    diffusers scheduler, where the noise schedule has one) as soon as the search ends, again once
    the held-out score is in, and ``progress.png``; the checkpoint defaults to
    ``out/ays.ckpt.json``. ``seed`` (default: ``config.seed``) also seeds the KLUB draws.

    Deprecated: ``out`` ending in ``.json`` is the schedule file itself (the checkpoint
    ``OUT.ckpt.json``, the plot ``OUT.png``, no scheduler directory), as before."""
    config = config or AYSConfig()
    if seed is not None:
        config = replace(config, seed=int(seed))
    samples: Tensor | str | os.PathLike[str] | None = data
    if pipeline is not None:
        if data is None:
            raise ValueError(
                "a pipeline needs data: a folder of (prompt, image) pairs with a metadata.jsonl "
                "(--data)"
            )
        scale = pipeline_guidance_scale(guidance_scale)
        source, samples = pipeline_ays_inputs(
            pipeline, data, guidance_scale=scale, device=device, dtype=dtype
        )
    else:
        source = load_source(
            model or "digits", device=device, guidance_scale=guidance_scale, dtype=dtype
        )
    cache = TensorCache(cache_dir) if cache_dir is not None else TensorCache.default()
    teacher = TeacherSpec(num_steps=teacher_steps)
    objective = Objective(
        source, metric, num_samples=proxy_samples, held_out_samples=held_out_samples,
        teacher=teacher, cache=cache, search_seed=config.seed, held_out_seed=config.seed + 1,
    )  # fmt: skip
    target = Path(out)
    legacy = target.suffix == ".json"  # deprecated: OUT is the schedule file
    if not legacy:
        target.mkdir(parents=True, exist_ok=True)
    schedule_path = target if legacy else target / "best_schedule.json"
    if checkpoint is None:
        checkpoint = (
            target.with_name(target.stem + ".ckpt.json") if legacy else target / "ays.ckpt.json"
        )
    result = search_ays(
        source, solver, nfe, data=samples, objective=objective, config=config,
        checkpoint=checkpoint, on_progress=on_progress, held_out=False,
    )  # fmt: skip
    run_solver = get_solver(solver)

    def write(found: AYSResult) -> None:
        found.schedule_file.save(schedule_path)
        if legacy:
            return
        prediction = found.schedule_file.provenance.prediction_type
        options = {} if prediction is None else {"prediction_type": prediction}
        written = write_scheduler_dir(target / "scheduler", found.schedule, run_solver, **options)
        if written is not None:
            found.extra["scheduler"] = str(written)

    write(result)  # the result at once, then its held-out score
    result = with_held_out(result, objective, run_solver)
    write(result)
    result.extra["schedule"] = str(schedule_path)
    if plot is None:
        plot = target.with_suffix(".png") if legacy else target / "progress.png"
    if plot != "":
        result.extra["plot"] = str(plot_result(result, plot))
    return result
