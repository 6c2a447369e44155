"""``stepsearch optimize``: the best sampler for one model at each step budget, in one run.

:func:`optimize` runs, on ONE sample source and ONE tensor cache:

1. **Searches** (cheap first, then the expensive one): DP (GITS / OSS), Align Your Steps and OLSS,
   each through its own job function in ``out/nfe-N/<family>-<solver>/`` (so the families' own
   study stores and checkpoints resume inside), then AutoDiffusion with whatever part of
   ``budget_minutes`` is left, its trial budget sized from the measured time of one trial. Every
   search optimises trajectory error (:class:`~stepsearch.eval.objective.Objective` ``"traj"``)
   on the *search* seed 0.
2. **Baselines**: diffusers' built-in schedulers with their own spacings
   (:func:`~stepsearch.eval.experiment.default_methods`, run in diffusers' own loop from the same
   per-sample noise) and stepsearch solvers x built-in spacings.
3. **Selection and report on other noise** (the judges): ``Objective(source, "fd",
   search_seed=1, held_out_seed=2)`` and the same split for trajectory error. Every candidate -
   search results and baselines alike - is scored on seed 1, the winner per NFE is the lowest
   FD-digits there (trajectory error where the model has no feature network), and the report shows
   seed 2 for every method: noise neither the searches nor the selection saw. Since the baselines
   are candidates too, the winner is never worse than the best baseline on the selection seed.
   Where FD prefers a sampler that is less accurate (higher trajectory error) than another, the
   report says so (the "two judges" rule: FD-digits rewards samplers that miss the model's own
   distribution in the direction of the data).

Text-to-image pipelines (``pipeline=`` a local Stable Diffusion 1.x / 2.x or SDXL directory,
``prompts=``, ``guidance_scale=``): the searches run on a
:class:`~stepsearch.models.pipeline.PipelineSource` (the UNet conditioned on sample ``i``'s
prompt ``i mod len(prompts)``, classifier-free guided, in latent space; samples are VAE-decoded
images), the diffusers baselines run in the pipeline's own loop from the same latent noise and
prompts, and both judges are trajectory error of the decoded images (there is no feature network
for FD). Align Your Steps needs (prompt, image) pairs for its KL upper bound (``ays_data=``, a
folder in the ``imagefolder`` layout, encoded by the pipeline's VAE, each latent conditioned on
its own caption); without them it is skipped and the report says so. The run's fingerprint and the
schedule files name the guidance scale, the image size and a digest of the prompts besides the
weights' digest.

Files (``out/``): ``run.json`` (the run's settings and state), ``nfe-N/scheduler/`` (the winner as
a ``from_pretrained``-able diffusers scheduler; OLSS winners are a
:class:`~stepsearch.integrations.olss.StepsearchOLSSScheduler`), ``nfe-N/best_schedule.json``
(the winner's :class:`~stepsearch.schedule_file.ScheduleFile` with provenance; diffusers
baselines have none), ``nfe-N/winner.json``, ``nfe-N/samples.safetensors`` (the report's sample
grid, made by the written scheduler directories in diffusers' loop), and ``report.{md,json,png}``.

Resuming: every stage writes its result as atomic JSON (``stage.json``, ``judged.json``); a rerun
of the same run skips finished stages. A folder holding another run's results is refused unless
``resume=True`` (keep the stages whose settings still match) or ``overwrite=True``. When the
budget ends before every stage ran, the report is still written from what finished and marked
``partial``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from stepsearch.ays.search import AYSConfig, search_ays
from stepsearch.cache import TensorCache, tensor_digest
from stepsearch.eval.objective import Objective, Score
from stepsearch.models import ImageModel, Method, default_methods, load_image_model
from stepsearch.models.pipeline import PipelineSource, encode_images, load_prompt_image_pairs
from stepsearch.models.source import ClassConditionalSource, SampleSource, generate_from_source
from stepsearch.models.text_to_image import (
    TextToImageModel,
    generate_images,
    load_pipeline,
    read_prompts,
)
from stepsearch.noise import DiscreteVP
from stepsearch.schedule import StepSchedule
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.autodiffusion import AutoDiffusionSettings, run_autodiffusion_job
from stepsearch.search.dp_job import DPSettings, run_dp_search
from stepsearch.search.dynamic import GITS_COEFF, layer_rules
from stepsearch.search.job import (
    DEFAULT_SPACINGS,
    SearchProgress,
    num_steps_for_nfe,
    spacing_schedules,
    write_scheduler_dir,
)
from stepsearch.solvers import get_solver
from stepsearch.solvers.base import Solver

__all__ = [
    "CHEAP_METHODS",
    "METHODS",
    "OptimizeResult",
    "OptimizeSettings",
    "demo_settings",
    "gains_in_words",
    "load_scheduler_dir",
    "optimize",
    "pipeline_settings",
    "text_to_image_model",
]

METHODS = ("dp", "ays", "olss", "autodiffusion")
"""Search families :func:`optimize` runs, cheap ones first."""

CHEAP_METHODS = ("dp", "ays", "olss")

RUN_FORMAT = "stepsearch-optimize/1"
SELECT_SEED, REPORT_SEED = 1, 2
"""The judges' seeds: selection (seed 1) and report (seed 2); the searches use seed 0."""

AYS_NEEDS_DATA = (
    "Align Your Steps skipped: on a text-to-image pipeline its KL upper bound needs (prompt, "
    "image) pairs; pass ays_data= (--data DIR: images with a metadata.jsonl of "
    '{"file_name": ..., "text": ...} lines)'
)

Model = ImageModel | TextToImageModel
"""A model whose diffusers scheduler directories the report replays in diffusers' own loop."""


@dataclass(frozen=True)
class OptimizeSettings:
    """What an optimize run does besides its model, NFEs and methods (all in its fingerprint).

    ``search_samples`` samples per trial on the search seed; ``select_samples`` /
    ``held_out_samples`` per candidate on the selection / report seeds. ``*_solvers``: the solvers
    each family searches for (OLSS is its own solver). ``baseline_solvers`` x ``spacings`` are the
    stepsearch baselines; ``diffusers_baselines`` adds diffusers' schedulers (image models and
    pipelines, in their own loop).
    ``autodiffusion_trials``: its trial budget when time is not short. ``grid_rows`` x
    ``grid_cols`` samples per method in the report's grid.
    """

    search_samples: int = 256
    select_samples: int = 1000
    held_out_samples: int = 1000
    dp_solvers: tuple[str, ...] = ("dpm_solver_pp_2m", "unipc_bh2")
    ays_solvers: tuple[str, ...] = ("dpm_solver_pp_2m",)
    autodiffusion_solvers: tuple[str, ...] = ("unipc_bh2",)
    baseline_solvers: tuple[str, ...] = ("ddim", "dpm_solver_pp_2m", "unipc_bh2")
    spacings: tuple[str, ...] = DEFAULT_SPACINGS
    diffusers_baselines: bool = True
    dp: DPSettings = field(default_factory=DPSettings)
    ays: AYSConfig = field(default_factory=AYSConfig)
    olss_samples: int = 64
    autodiffusion: AutoDiffusionSettings = field(default_factory=AutoDiffusionSettings)
    autodiffusion_trials: int = 200
    grid_rows: int = 3
    grid_cols: int = 8
    chunk_size: int = 256

    def __post_init__(self) -> None:
        for name in ("search_samples", "select_samples", "held_out_samples", "olss_samples"):
            if int(getattr(self, name)) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)!r}")
        if self.autodiffusion_trials < 1 or self.grid_rows < 1 or self.grid_cols < 1:
            raise ValueError("autodiffusion_trials, grid_rows and grid_cols must be positive")
        for name in ("dp_solvers", "ays_solvers", "autodiffusion_solvers", "baseline_solvers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "spacings", tuple(self.spacings))

    def solvers(self, family: str) -> tuple[str, ...]:
        return ("olss",) if family == "olss" else getattr(self, f"{family}_solvers")

    def family_settings(self, family: str) -> dict[str, Any]:
        if family == "dp":
            return self.dp.to_json_dict()
        if family == "ays":
            return self.ays.to_json_dict()
        if family == "olss":
            return {"num_samples": self.olss_samples}
        return {**self.autodiffusion.to_json_dict(), "max_trials": self.autodiffusion_trials}

    def to_json_dict(self) -> dict[str, Any]:
        payload = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
            if key not in ("dp", "ays", "autodiffusion")
        }
        return {**payload, **{name: self.family_settings(name) for name in METHODS}}


# -------------------------------------------------------------------------------------------
# candidates
# -------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A sampler the judges score: a stepsearch solver on a schedule (a search result or a
    built-in spacing), or a diffusers scheduler (``method``)."""

    label: str
    family: str  # "baseline", "diffusers" or a search family
    nfe: int
    solver: Solver | None = None
    schedule: StepSchedule | None = None
    method: Method | None = None
    schedule_file: ScheduleFile | None = None
    partial: bool = False

    def key(self) -> str:
        """What the candidate's scores depend on (a resumed run reuses scores of equal keys)."""
        if self.method is not None:
            return json.dumps(
                {"diffusers": self.method.diffusers_scheduler, **self.method.diffusers_options},
                sort_keys=True,
            )
        assert self.solver is not None and self.schedule is not None
        return json.dumps(
            {"solver": self.solver.name, "config": self.solver.config(),
             "times": [float(t) for t in self.schedule.times]},
            sort_keys=True,
        )  # fmt: skip

    def samples(
        self, model: Model | None, source: SampleSource, count: int, seed: int, chunk: int
    ) -> Tensor:
        """``count`` samples from the noise of ``seed`` (sample ``i`` from its own generator)."""
        if self.method is not None:
            assert model is not None
            found = self.method.diffusers_scheduler_for(model.scheduler_config, self.nfe)
            assert found is not None
            scheduler, steps = found
            return model.sample_diffusers(scheduler, steps, count, seed, None, chunk, False)
        assert self.solver is not None and self.schedule is not None
        return generate_from_source(
            source, self.solver, self.schedule, count, seed=seed, chunk_size=chunk
        )

    def write_scheduler(self, path: Path, prediction_type: str | None) -> tuple[Path, int] | None:
        """This sampler as a diffusers scheduler directory and its ``num_inference_steps``;
        ``None`` where the noise schedule has no diffusers form."""
        if path.exists():
            shutil.rmtree(path)
        if self.method is not None:
            raise RuntimeError("diffusers baselines are written by write_diffusers_scheduler")
        assert self.solver is not None and self.schedule is not None
        if self.solver.name == "olss":
            from stepsearch.integrations.olss import StepsearchOLSSScheduler

            config = {} if prediction_type is None else {"prediction_type": prediction_type}
            scheduler = StepsearchOLSSScheduler.from_fit(self.solver, config)
            scheduler.save_pretrained(path)
            return path, self.schedule.num_steps
        config = {} if prediction_type is None else {"prediction_type": prediction_type}
        written = write_scheduler_dir(path, self.schedule, self.solver, **config)
        return None if written is None else (written, self.schedule.num_steps)


def _write_diffusers_scheduler(candidate: Candidate, model: Model, path: Path) -> tuple[Path, int]:
    assert candidate.method is not None
    if path.exists():
        shutil.rmtree(path)
    found = candidate.method.diffusers_scheduler_for(model.scheduler_config, candidate.nfe)
    assert found is not None
    scheduler, steps = found
    scheduler.save_pretrained(path)
    return path, steps


def load_scheduler_dir(path: str | Path) -> Any:
    """The scheduler of a directory written by :func:`optimize` (or any diffusers scheduler
    directory): its ``_class_name`` looked up among stepsearch's drop-in classes, then diffusers'."""
    import diffusers

    from stepsearch.integrations import diffusers as drop_in
    from stepsearch.integrations import olss

    name = json.loads((Path(path) / "scheduler_config.json").read_text())["_class_name"]
    for module in (drop_in, olss, diffusers):
        found = getattr(module, name, None)
        if found is not None and hasattr(found, "from_pretrained"):
            return found.from_pretrained(path)
    raise ValueError(f"{path}: unknown scheduler class {name!r}")


def _solver_from_json(payload: dict[str, Any]) -> Solver:
    name = str(payload["name"])
    config = {k: v for k, v in dict(payload.get("config", {})).items() if k != "name"}
    if name == "olss":
        from stepsearch.solvers.olss import OLSSSolver

        return OLSSSolver.from_config(config)
    return get_solver(name, **config)


# -------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------


@dataclass
class OptimizeResult:
    """The report (JSON-ready), its files, and per NFE the winner's scheduler directory."""

    report: dict[str, Any]
    files: dict[str, str]
    scheduler_dirs: dict[int, str]
    partial: bool


@dataclass
class _Run:
    """What every stage of one run shares."""

    model: Model | None
    source: SampleSource
    settings: OptimizeSettings
    out: Path
    cache: TensorCache
    progress: bool
    deadline: float
    search: Objective
    incomplete: list[dict[str, Any]] = field(default_factory=list)
    ays_inputs: tuple[SampleSource, Tensor] | None = None

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, text: str) -> None:
        if self.progress:
            from rich.console import Console

            Console(stderr=True).print(text)


def text_to_image_model(
    pipeline: str | os.PathLike[str] | Any,
    prompts: Sequence[str] | os.PathLike[str] | str | None,
    guidance_scale: float | None = None,
    *,
    device: str = "cpu",
) -> TextToImageModel:
    """A local text-to-image pipeline directory (``model_index.json``, loaded by
    :func:`~stepsearch.models.text_to_image.load_pipeline`, never from the hub) or pipeline object,
    with its prompts (a list, or a file of one prompt per line) and guidance scale (default 7.5,
    diffusers' own; guidance runs above 1), checked for a discrete VP scheduler config.

    Raises:
        ValueError: no prompts, a non-finite or negative guidance scale, a pipeline without a UNet
            or without a discrete VP scheduler config (flow matching).
        FileNotFoundError: the directory, its ``model_index.json`` or the prompts file is missing.
    """
    if prompts is None:
        raise ValueError("--pipeline needs --prompts FILE (one prompt per line)")
    if isinstance(prompts, str | os.PathLike):
        prompts = read_prompts(prompts)
    scale = 7.5 if guidance_scale is None else float(guidance_scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"--guidance-scale must be a finite number >= 0, got {guidance_scale!r}")
    name = Path(pipeline).name if isinstance(pipeline, str | os.PathLike) else "pipeline"
    model = TextToImageModel(
        load_pipeline(pipeline, device=device), list(prompts), scale, name=name
    )
    model.noise  # noqa: B018 - a flow-matching config fails here, before any work
    return model


def _resolve_model(
    model: str | Path | Model | SampleSource, device: str, guidance_scale: float | None = None
) -> tuple[Model | None, SampleSource]:
    if guidance_scale is not None and not isinstance(model, (str, Path)):
        raise ValueError(
            "guidance_scale goes with a model name (--model digits-cond) or --pipeline"
        )
    if isinstance(model, ImageModel):
        return model, model.source()
    if isinstance(model, TextToImageModel):
        return model, PipelineSource(model, name=model.name)
    if isinstance(model, PipelineSource):
        return model.model, model
    if isinstance(model, (str, Path)):
        from stepsearch.testbeds import digits

        spec = str(model)
        if spec not in digits.MODELS:
            root = Path(spec)
            if not root.is_dir():
                raise ValueError(
                    f"--model {spec}: expected 'digits' or a local diffusers model directory"
                )
            if not any(
                p.is_file()
                for p in (root / "scheduler" / "scheduler_config.json",
                          root / "scheduler_config.json")
            ):  # fmt: skip
                raise ValueError(
                    f"--model {spec}: no scheduler config (scheduler_config.json at its root or in "
                    "scheduler/): the noise schedule the model was trained on is needed"
                )
        image_model = load_image_model(spec, device=device, guidance_scale=guidance_scale)
        return image_model, image_model.source()
    return None, model


def _check_methods(methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(
            f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
            f"{', '.join(METHODS)}"
        )


def _check_inputs(
    source: SampleSource, nfes: Sequence[int], methods: Sequence[str], settings: OptimizeSettings
) -> None:
    _check_methods(methods)
    if not nfes:
        raise ValueError("give at least one NFE (--nfe 4 6 8)")
    for nfe in nfes:
        if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 2:
            raise ValueError(f"NFE must be an integer of at least 2, got {nfe!r}")
        for family in methods:
            if family == "olss":
                continue
            for name in settings.solvers(family):
                solver = get_solver(name)
                try:
                    steps = num_steps_for_nfe(solver, source.noise, int(nfe))
                except ValueError as error:
                    raise ValueError(f"NFE {nfe} is unreachable for {family}: {error}") from None
                if family == "dp":
                    layer_rules(solver, steps)
        for name in settings.baseline_solvers:
            num_steps_for_nfe(get_solver(name), source.noise, int(nfe))


def _fingerprint(
    source: SampleSource,
    nfes: Sequence[int],
    methods: Sequence[str],
    settings: OptimizeSettings,
    ays_inputs: tuple[SampleSource, Tensor] | None = None,
) -> dict[str, Any]:
    fingerprint = {
        "model": source.identity.to_json_dict(),
        "noise": source.noise.to_config(),
        "nfes": [int(n) for n in nfes],
        "methods": list(methods),
        "settings": settings.to_json_dict(),
    }
    if _is_conditional(source):  # prompts or labels, guidance, size (the weights are above)
        fingerprint["conditioning"] = source.describe()
    if ays_inputs is not None:
        fingerprint["ays_data"] = _data_digest(ays_inputs)
    return fingerprint


def _is_conditional(source: SampleSource) -> bool:
    """A pipeline (prompts) or a class-conditional model (labels), both guided."""
    return isinstance(source, (PipelineSource, ClassConditionalSource))


def _data_digest(ays_inputs: tuple[SampleSource, Tensor]) -> dict[str, Any]:
    """What Align Your Steps' pairs change: their captions and their latents."""
    data_source, latents = ays_inputs
    return {
        "prompts": data_source.describe().get("prompts"),
        "latents": "sha256:" + tensor_digest({"data": latents.detach().cpu().contiguous()}),
    }


def _ays_inputs(
    source: PipelineSource, data: str | os.PathLike[str], progress: bool
) -> tuple[PipelineSource, Tensor]:
    """Align Your Steps' source and data on a pipeline: the (prompt, image) pairs of ``data``
    resized to the run's image size and encoded by its VAE, on a source over the same pipeline
    (same weights, guidance and size) whose prompt ``i`` is pair ``i``'s caption."""
    model = source.model
    pairs = load_prompt_image_pairs(data, size=model.image_size)
    captioned = TextToImageModel(
        model.pipeline, pairs.prompts, model.guidance_scale, model.height, model.width, model.name
    )
    latents = encode_images(model.pipeline, pairs.images, progress=progress)
    return PipelineSource(captioned, source.negative_prompt, name=source.name), latents


def _prepare_out(out: Path, fingerprint: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Create ``out`` or check it holds this run (module docstring)."""
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    run_file = out / "run.json"
    if out.is_dir() and any(out.iterdir()):
        recorded = json.loads(run_file.read_text()) if run_file.is_file() else None
        same = recorded is not None and recorded.get("fingerprint") == fingerprint
        if overwrite:
            for entry in out.iterdir():
                if entry.name == "run.json" or entry.name.startswith(("nfe-", "report")):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        elif not same and not resume:
            what = "another optimize run's results" if recorded else "files of something else"
            raise ValueError(
                f"--out {out} holds {what}; pass --resume to continue there (finished stages whose "
                "settings match are kept) or --overwrite to start over, or choose another folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, {"format": RUN_FORMAT, "fingerprint": fingerprint})


def optimize(
    model: str | Path | Model | SampleSource | None,
    nfes: Sequence[int],
    methods: Sequence[str] = METHODS,
    budget_minutes: float = 30.0,
    out: str | Path = "stepsearch-optimize",
    *,
    pipeline: str | os.PathLike[str] | Any | None = None,
    prompts: Sequence[str] | os.PathLike[str] | str | None = None,
    guidance_scale: float | None = None,
    ays_data: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    settings: OptimizeSettings | None = None,
    cache: TensorCache | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> OptimizeResult:
    """Run the searches ``methods`` at every NFE of ``nfes`` on ``model`` (``"digits"``, a local
    diffusers ``UNet2DModel`` directory, an :class:`ImageModel`, a
    :class:`~stepsearch.models.text_to_image.TextToImageModel` or any sample source) within
    ``budget_minutes`` of search time, select and report on unseen noise, write everything under
    ``out`` (module docstring).

    A text-to-image pipeline is ``model=None, pipeline=DIR, prompts=[...] or FILE,
    guidance_scale=G`` (:func:`text_to_image_model`); its default settings are
    :func:`pipeline_settings`. ``ays_data``: (prompt, image) pairs for Align Your Steps on a
    pipeline (without them AYS is skipped there, and the report says so).

    Raises:
        ValueError: bad input (module docstring), found before anything is written.
    """
    began = time.perf_counter()
    methods = list(dict.fromkeys(methods))
    nfes = sorted({int(n) for n in nfes}) if all(isinstance(n, int) for n in nfes) else list(nfes)
    if budget_minutes is None or not budget_minutes > 0:
        raise ValueError(f"--budget-minutes must be positive, got {budget_minutes!r}")
    _check_methods(methods)
    if pipeline is not None:
        if model is not None:
            raise ValueError("give a model (--model) or a pipeline (--pipeline), not both")
        model = text_to_image_model(pipeline, prompts, guidance_scale, device=device)
        guidance_scale = None  # the pipeline's, in its model
    elif prompts is not None:
        raise ValueError("--prompts goes with --pipeline DIR")
    if model is None:
        raise ValueError("give a model (--model digits|DIR) or a pipeline (--pipeline DIR)")
    image_model, source = _resolve_model(model, device, guidance_scale)
    pipeline_run = isinstance(source, PipelineSource)
    settings = settings or (pipeline_settings() if pipeline_run else OptimizeSettings())
    skipped: list[dict[str, str]] = []
    if ays_data is not None and not pipeline_run:
        raise ValueError("ays_data (--data) is for text-to-image pipelines (--pipeline)")
    if pipeline_run and "ays" in methods and ays_data is None:
        methods.remove("ays")
        skipped.append({"method": "ays", "reason": AYS_NEEDS_DATA})
        if not methods:
            raise ValueError(AYS_NEEDS_DATA.replace("skipped", "cannot run"))
    _check_inputs(source, nfes, methods, settings)
    ays_inputs = None
    if ays_data is not None and "ays" in methods:
        assert isinstance(source, PipelineSource)
        ays_inputs = _ays_inputs(source, ays_data, progress)
    out_path = Path(out).expanduser()
    fingerprint = _fingerprint(source, nfes, methods, settings, ays_inputs)
    _prepare_out(out_path, fingerprint, resume, overwrite)
    cache = cache if cache is not None else TensorCache.default()
    search = Objective(
        source,
        "traj",
        num_samples=settings.search_samples,
        search_seed=0,
        held_out_seed=SELECT_SEED,
        held_out_samples=settings.select_samples,
        cache=cache,
        chunk_size=settings.chunk_size,
        progress=progress,
    )
    run = _Run(
        image_model, source, settings, out_path, cache, progress,
        began + 60.0 * float(budget_minutes), search, ays_inputs=ays_inputs,
    )  # fmt: skip
    for item in skipped:
        run.say(f"[yellow]{item['reason']}[/]")
    found: dict[int, list[Candidate]] = {nfe: [] for nfe in nfes}
    for family in [m for m in methods if m in CHEAP_METHODS]:
        for nfe in nfes:
            for name in settings.solvers(family):
                candidate = _stage(run, family, name, nfe)
                if candidate is not None:
                    found[nfe].append(candidate)
    if "autodiffusion" in methods:
        pending = [(nfe, s) for nfe in nfes for s in settings.autodiffusion_solvers]
        for position, (nfe, name) in enumerate(pending):
            share = run.seconds_left() / (len(pending) - position)
            candidate = _stage(run, "autodiffusion", name, nfe, seconds=share)
            if candidate is not None:
                found[nfe].append(candidate)
    return _judge_and_report(run, nfes, methods, found, began, skipped)


# -------------------------------------------------------------------------------------------
# stages
# -------------------------------------------------------------------------------------------


def _stage_fingerprint(run: _Run, family: str, solver: str, nfe: int) -> dict[str, Any]:
    objective = {k: v for k, v in run.search.describe().items() if k != "held_out_samples"}
    fingerprint = {
        "family": family,
        "solver": solver,
        "nfe": int(nfe),
        "settings": run.settings.family_settings(family),
        "objective": objective,
    }
    if family == "ays" and run.ays_inputs is not None:
        fingerprint["data"] = _data_digest(run.ays_inputs)
    return fingerprint


def _stage(
    run: _Run, family: str, solver: str, nfe: int, *, seconds: float | None = None
) -> Candidate | None:
    """One search (a finished one is read back); ``None`` when the budget left no time for it."""
    folder = run.out / f"nfe-{nfe}" / f"{family}-{solver}"
    record_path = folder / "stage.json"
    fingerprint = _stage_fingerprint(run, family, solver, nfe)
    label = f"{family} {solver}" if family != "olss" else "olss"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == fingerprint:
            return _candidate_from_record(run, record, folder, label, nfe)
    if run.seconds_left() <= 0:
        run.incomplete.append({"nfe": nfe, "stage": label, "reason": "budget spent before it ran"})
        return None
    folder.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    partial = False
    notes: dict[str, Any] = {}
    if family == "dp":
        result = run_dp_search(
            run.search, solver, nfe, folder, settings=run.settings.dp, progress=run.progress
        )
        schedule_path = Path(result.files["schedule"])
    elif family == "ays":
        schedule_path = _ays_stage(run, solver, nfe, folder)
    elif family == "olss":
        from stepsearch.olss.search import SCHEDULE_FILE, search_olss

        search_olss(
            run.source,
            nfe,
            num_samples=run.settings.olss_samples,
            held_out_samples=run.settings.select_samples,
            out=folder,
            seed=0,
            held_out_seed=SELECT_SEED,
            fd=False,
            baselines=(),
            cache=run.cache,
            chunk_size=run.settings.chunk_size,
            progress=run.progress,
        )
        schedule_path = folder / SCHEDULE_FILE
    else:
        trials, partial = _autodiffusion_trials(run, solver, nfe, folder, seconds or 0.0)
        if trials is None:
            run.incomplete.append(
                {"nfe": nfe, "stage": label, "reason": "budget too short for a search"}
            )
            return None
        notes["trials"] = trials
        summary = run_autodiffusion_job(
            run.search,
            solver,
            nfe=nfe,
            budget=trials,
            out=folder,
            settings=run.settings.autodiffusion,
            progress=run.progress,
        )
        schedule_path = Path(summary.files["schedule"])
    record = {
        "fingerprint": fingerprint,
        "schedule_file": schedule_path.name,
        "partial": partial,
        "seconds": round(time.perf_counter() - begin, 2),
        **notes,
    }
    atomic_write_json(record_path, record)
    return _candidate_from_record(run, record, folder, label, nfe)


def _candidate_from_record(
    run: _Run, record: dict[str, Any], folder: Path, label: str, nfe: int
) -> Candidate:
    schedule_file = ScheduleFile.load(
        folder / record["schedule_file"], noise=run.source.noise, model=run.source.identity
    )
    solver = _solver_from_json(dict(schedule_file.provenance.solver))
    family = str(record["fingerprint"]["family"])
    if record.get("partial"):
        run.incomplete.append(
            {"nfe": nfe, "stage": label,
             "reason": f"budget ended the search after {record.get('trials')} trials "
                       "(best so far kept)"}
        )  # fmt: skip
    return Candidate(
        label, family, nfe, solver, schedule_file.schedule,
        schedule_file=schedule_file, partial=bool(record.get("partial")),
    )  # fmt: skip


def _ays_stage(run: _Run, solver: str, nfe: int, folder: Path) -> Path:
    """AYS through :func:`~stepsearch.ays.search.search_ays` (checkpointed in ``folder``), then the
    job files every family writes (``best_schedule.json``, ``scheduler/``, ``result.json``)."""
    bar = SearchProgress(0, f"AYS {solver} NFE {nfe} (sweeps)", enabled=run.progress)
    sweeps = [0]

    def on_progress(strategy: str, stage: int, state: Any) -> None:
        sweeps[0] += 1
        proxy = state.history[-1].get("proxy")
        bar.budget = max(bar.budget, sweeps[0])
        bar.update(sweeps[0], math.inf if proxy is None else float(proxy))

    data_source, data = run.ays_inputs or (run.source, None)
    with bar.running():
        result = search_ays(
            data_source,
            solver,
            nfe,
            data=data,
            objective=run.search,
            config=run.settings.ays,
            checkpoint=folder / "ays.ckpt.json",
            on_progress=on_progress,
        )
    path = folder / "best_schedule.json"
    result.schedule_file.save(path)
    prediction = result.schedule_file.provenance.prediction_type
    write_scheduler_dir(
        folder / "scheduler",
        result.schedule,
        get_solver(solver),
        **({} if prediction is None else {"prediction_type": prediction}),
    )
    atomic_write_json(
        folder / "result.json",
        {"family": "ays", "solver": solver, "nfe": int(nfe), "chosen": result.chosen,
         "times": result.schedule.times.tolist(),
         "search": result.runs[result.chosen].score.value, "held_out": result.held_out.value,
         "klub_evaluations": result.klub_evaluations, "seconds": round(result.seconds, 2)},
    )  # fmt: skip
    return path


def _autodiffusion_trials(
    run: _Run, solver: str, nfe: int, folder: Path, seconds: float
) -> tuple[int | None, bool]:
    """The trial budget of an AutoDiffusion stage: what ``seconds`` allows at the measured cost
    of one trial (capped at ``autodiffusion_trials``), fixed in ``plan.json`` so that a resumed
    run replays the same search; ``None`` when not even the starting spacings fit."""
    plan_path = folder / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        return int(plan["trials"]), bool(plan["partial"])
    run_solver = get_solver(solver)
    steps = num_steps_for_nfe(run_solver, run.source.noise, nfe)
    starts = spacing_schedules(run.source.noise, steps)
    probe = next(iter(starts.values()))
    measured = run.search(probe, run_solver).seconds
    trials = int(seconds // max(measured, 1e-3))
    cap = run.settings.autodiffusion_trials
    if trials < len(starts) + 2:
        return None, True
    plan = {"trials": min(trials, cap), "partial": trials < cap, "seconds_per_trial": measured}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_path, plan)
    return int(plan["trials"]), bool(plan["partial"])


# -------------------------------------------------------------------------------------------
# baselines, judges, report
# -------------------------------------------------------------------------------------------


def _baselines(run: _Run, nfe: int) -> list[Candidate]:
    candidates = []
    if (
        run.model is not None
        and run.settings.diffusers_baselines
        and isinstance(run.source.noise, DiscreteVP)
    ):
        for method in default_methods():
            if method.diffusers_scheduler is None:
                continue
            if method.diffusers_scheduler_for(run.model.scheduler_config, nfe) is not None:
                candidates.append(Candidate(method.label, "diffusers", nfe, method=method))
    for name in run.settings.baseline_solvers:
        solver = get_solver(name)
        steps = num_steps_for_nfe(solver, run.source.noise, nfe)
        for spacing, schedule in spacing_schedules(
            run.source.noise, steps, run.settings.spacings
        ).items():
            candidates.append(
                Candidate(f"stepsearch {name} / {spacing}", "baseline", nfe, solver, schedule)
            )
    return candidates


def _judges(run: _Run) -> dict[str, Objective]:
    """The selection / report objectives: FD (where the source has features) and trajectory
    error, both on seeds 1 (selection) and 2 (report)."""
    metrics = ["traj"]
    if run.source.features is not None and run.source.reference_data is not None:
        metrics.insert(0, "fd")
    return {
        metric: Objective(
            run.source,
            metric,
            num_samples=run.settings.select_samples,
            search_seed=SELECT_SEED,
            held_out_seed=REPORT_SEED,
            held_out_samples=run.settings.held_out_samples,
            cache=run.cache,
            chunk_size=run.settings.chunk_size,
            bootstrap=20,
            progress=run.progress,
        )
        for metric in metrics
    }


def _judge(
    run: _Run, nfe: int, candidates: list[Candidate], judges: dict[str, Objective]
) -> dict[str, dict[str, Any]]:
    """Scores of every candidate on both judges' splits (``judged.json``: reused on resume where
    the candidate and the judges are the same: model, conditioning, seeds, sample counts)."""
    path = run.out / f"nfe-{nfe}" / "judged.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    described = json.dumps({m: j.describe() for m, j in judges.items()}, sort_keys=True)
    judged_by = "sha256:" + hashlib.sha256(described.encode("utf-8")).hexdigest()
    selection = next(iter(judges))
    bar = SearchProgress(
        len(candidates), f"judging NFE {nfe} ({selection}, seed {SELECT_SEED})",
        enabled=run.progress,
    )  # fmt: skip
    first = next(iter(judges.values()))
    results: dict[str, dict[str, Any]] = {}
    with bar.running():
        for index, candidate in enumerate(candidates):
            key = candidate.key()
            entry = stored.get(candidate.label)
            if entry is None or entry.get("key") != key or entry.get("judges") != judged_by:
                entry = {"key": key, "judges": judged_by}
                for split, seed in (("search", SELECT_SEED), ("held_out", REPORT_SEED)):
                    count = first.num_samples if split == "search" else first.held_out_samples
                    samples = candidate.samples(
                        run.model, run.source, count, seed, run.settings.chunk_size
                    )
                    entry["select" if split == "search" else "report"] = {
                        metric: judge.score_samples(samples, nfe, split=split).to_json_dict()
                        for metric, judge in judges.items()
                    }
                stored[candidate.label] = entry
                atomic_write_json(path, stored)
            results[candidate.label] = entry
            bar.update(index + 1, _value(entry["select"][selection]))
    return results


def _value(score: dict[str, Any]) -> float:
    value = score.get("value")
    return math.inf if value is None else float(value)


def _reference(run: _Run, judges: dict[str, Objective]) -> dict[str, Any]:
    """The converged solve's scores on the report seed (its FD is the floor a sampler can reach)."""
    path = run.out / "reference.json"
    traj = judges["traj"]
    key = {name: judge.describe() for name, judge in judges.items()}
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored
    teacher = traj.teacher("held_out")
    spec = traj.teacher_spec
    payload: dict[str, Any] = {"key": key, "sampler": spec.to_json_dict()}
    if "fd" in judges:
        payload["fd"] = (
            judges["fd"].score_samples(teacher, spec.num_steps, split="held_out").to_json_dict()
        )
    atomic_write_json(path, payload)
    return payload


def _judge_and_report(
    run: _Run,
    nfes: Sequence[int],
    methods: Sequence[str],
    found: dict[int, list[Candidate]],
    began: float,
    skipped: Sequence[dict[str, str]] = (),
) -> OptimizeResult:
    judges = _judges(run)
    selection = next(iter(judges))
    reference = _reference(run, judges)
    per_nfe: dict[int, dict[str, Any]] = {}
    scheduler_dirs: dict[int, str] = {}
    grids: dict[int, dict[str, Tensor]] = {}
    for nfe in nfes:
        baselines = _baselines(run, nfe)
        candidates = baselines + found[nfe]
        scores = _judge(run, nfe, candidates, judges)

        def chosen(pool: list[Candidate], scores: dict = scores) -> Candidate:
            return min(pool, key=lambda c: _value(scores[c.label]["select"][selection]))

        winner = chosen(candidates)
        best_baseline = chosen(baselines)
        folder = run.out / f"nfe-{nfe}"
        files, steps = _write_winner(run, winner, scores[winner.label], folder, selection)
        if "scheduler" in files:
            scheduler_dirs[nfe] = files["scheduler"]
        grid = _grid_samples(run, winner, best_baseline, folder, files)
        if grid is not None:
            grids[nfe] = grid
        per_nfe[nfe] = _nfe_entry(
            nfe, candidates, scores, winner, best_baseline, selection, files, steps, reference
        )
    report = {
        "model": run.source.identity.to_json_dict(),
        "methods": list(methods),
        "nfes": [int(n) for n in nfes],
        "selection": {"metric": selection, "seed": SELECT_SEED,
                      "samples": run.settings.select_samples},
        "report": {"seed": REPORT_SEED, "samples": run.settings.held_out_samples,
                   "metrics": list(judges)},
        "search": {"metric": "traj", "seed": 0, "samples": run.settings.search_samples},
        "conditioning": run.source.describe() if _is_conditional(run.source) else None,
        "reference": {k: v for k, v in reference.items() if k != "key"},
        "partial": bool(run.incomplete),
        "incomplete": run.incomplete,
        "skipped": list(skipped),
        "per_nfe": {str(n): entry for n, entry in per_nfe.items()},
        "seconds": round(time.perf_counter() - began, 1),
        "settings": run.settings.to_json_dict(),
    }  # fmt: skip
    files = {
        "json": str(atomic_write_json(run.out / "report.json", report)),
        "markdown": str(atomic_write_text(run.out / "report.md", _markdown(report))),
        "png": str(_plot(run, report, grids, found)),
    }
    return OptimizeResult(report, files, scheduler_dirs, bool(run.incomplete))


def _write_winner(
    run: _Run, winner: Candidate, scores: dict[str, Any], folder: Path, selection: str
) -> tuple[dict[str, str], int | None]:
    """The winner's scheduler directory, schedule file (with the judges' scores added to its
    provenance) and ``winner.json``."""
    files: dict[str, str] = {}
    prediction = run.source.describe().get("prediction_type")
    steps: int | None = None
    if winner.method is not None:
        assert run.model is not None
        path, steps = _write_diffusers_scheduler(winner, run.model, folder / "scheduler")
        files["scheduler"] = str(path)
    else:
        written = winner.write_scheduler(folder / "scheduler", prediction)
        if written is not None:
            files["scheduler"] = str(written[0])
            steps = written[1]
        assert winner.solver is not None and winner.schedule is not None
        judged = {"selection": scores["select"], "report": scores["report"],
                  "selected_by": selection, "label": winner.label}  # fmt: skip
        if winner.schedule_file is not None:
            provenance = winner.schedule_file.provenance
            provenance = replace(provenance, extra={**provenance.extra, "optimize": judged})
        else:
            judge = next(iter(_judges(run).values()))
            provenance = judge.provenance(
                winner.solver,
                _score(scores["select"][selection]),
                _score(scores["report"][selection]),
                "builtin",
                {"label": winner.label, "spacing": winner.schedule.metadata.get("name")},
                prediction_type=prediction,
                extra={"optimize": judged},
            )
        path = folder / "best_schedule.json"
        ScheduleFile(winner.schedule, _conditioned(provenance, run.source)).save(path)
        files["schedule"] = str(path)
    winner_path = folder / "winner.json"
    atomic_write_json(
        winner_path,
        {"label": winner.label, "family": winner.family, "nfe": winner.nfe,
         "num_inference_steps": steps, "partial": winner.partial, "files": files,
         "selection": scores["select"], "report": scores["report"]},
    )  # fmt: skip
    files["winner"] = str(winner_path)
    return files, steps


def _conditioned(provenance: Any, source: SampleSource) -> Any:
    """A pipeline's guidance scale, image size and prompts (their digest), a class-conditional
    model's guidance scale and labels, in a provenance."""
    if isinstance(source, ClassConditionalSource):
        return replace(
            provenance,
            guidance_scale=float(source.guidance_scale),
            extra={**provenance.extra, "conditioning": source.describe()},
        )
    if not isinstance(source, PipelineSource):
        return provenance
    return replace(
        provenance,
        guidance_scale=float(source.model.guidance_scale),
        resolution=tuple(source.model.image_size),
        extra={**provenance.extra, "conditioning": source.describe()},
    )


def _score(payload: dict[str, Any]) -> Score:
    return Score(
        _value(payload), payload.get("std"), str(payload["metric"]), str(payload["split"]),
        int(payload["num_samples"]), int(payload["nfe"]), float(payload.get("seconds", 0.0)),
    )  # fmt: skip


def _grid_samples(
    run: _Run, winner: Candidate, baseline: Candidate, folder: Path, files: dict[str, str]
) -> dict[str, Tensor] | None:
    """The report's sample grid: the first ``grid_rows * grid_cols`` samples of the report seed
    (``samples.safetensors``: ``winner`` and ``baseline``, their ``num_inference_steps`` in its
    metadata, and for a pipeline its guidance scale, size and the grid's prompts), made by the
    written scheduler directories in diffusers' own loop (so the directory loaded into a pipeline
    reproduces them bit for bit); ``None`` for sources without a UNet."""
    if run.model is None or "scheduler" not in files:
        return None
    from safetensors.torch import save_file

    count = run.settings.grid_rows * run.settings.grid_cols
    prediction = run.source.describe().get("prediction_type")
    made, steps_of = {}, {}
    for role, candidate, directory in (
        ("winner", winner, Path(files["scheduler"])),
        ("baseline", baseline, folder / "baseline_scheduler"),
    ):
        if role == "baseline":
            if candidate.method is not None:
                _write_diffusers_scheduler(candidate, run.model, directory)
            elif candidate.write_scheduler(directory, prediction) is None:
                return None
        scheduler = load_scheduler_dir(directory)
        steps = _inference_steps(candidate, run.model)
        made[role] = _diffusers_loop(run.model, scheduler, steps, count).contiguous()
        steps_of[f"steps_{role}"] = str(steps)
    path = folder / "samples.safetensors"
    tmp = path.with_name(".samples.tmp.safetensors")
    metadata = {"seed": str(REPORT_SEED), "count": str(count), **steps_of}
    if isinstance(run.model, TextToImageModel):  # what a replay passes the pipeline
        height, width = run.model.image_size
        metadata.update(
            guidance_scale=repr(float(run.model.guidance_scale)), height=str(height),
            width=str(width),
            prompts=json.dumps(run.model.prompts_for(range(count)), ensure_ascii=False),
        )  # fmt: skip
    elif isinstance(run.model, ImageModel) and run.model.conditional:
        labels = run.model.labels_for(range(count))
        assert labels is not None
        metadata.update(
            guidance_scale=repr(float(run.model.guidance_scale)),
            labels=json.dumps(labels.tolist()),
        )
    save_file(made, str(tmp), metadata=metadata)
    tmp.replace(path)
    files["samples"] = str(path)
    return made


def _diffusers_loop(model: Model, scheduler: Any, steps: int, count: int) -> Tensor:
    """``count`` samples of the report seed in diffusers' own loop with ``scheduler``, in one
    batch: the model's plain denoising loop, or the pipeline's ``__call__`` (decoded images)."""
    if isinstance(model, TextToImageModel):
        return generate_images(
            model, scheduler, count, num_inference_steps=steps, seed=REPORT_SEED,
            chunk_size=count, progress=False,
        )  # fmt: skip
    return model.sample_diffusers(scheduler, steps, count, REPORT_SEED, None, count, False)


def _inference_steps(candidate: Candidate, model: Model) -> int:
    if candidate.method is not None:
        found = candidate.method.diffusers_scheduler_for(model.scheduler_config, candidate.nfe)
        assert found is not None
        return found[1]
    assert candidate.schedule is not None
    return candidate.schedule.num_steps


def _nfe_entry(
    nfe: int,
    candidates: list[Candidate],
    scores: dict[str, dict[str, Any]],
    winner: Candidate,
    best_baseline: Candidate,
    selection: str,
    files: dict[str, str],
    steps: int | None,
    reference: dict[str, Any],
) -> dict[str, Any]:
    rows = [
        {"label": c.label, "family": c.family, "partial": c.partial,
         "select": {m: _finite(s["value"]) for m, s in scores[c.label]["select"].items()},
         "report": {m: _finite(s["value"]) for m, s in scores[c.label]["report"].items()},
         "report_std": {m: s.get("std") for m, s in scores[c.label]["report"].items()}}
        for c in candidates
    ]  # fmt: skip
    report_of = {row["label"]: row["report"] for row in rows}
    win, base = report_of[winner.label], report_of[best_baseline.label]
    gain = {
        metric: None if not (base[metric] and win[metric]) else 1.0 - win[metric] / base[metric]
        for metric in win
    }
    most_accurate = min(rows, key=lambda r: _finite(r["report"]["traj"], math.inf))
    two_judges = None
    less_accurate = _finite(win["traj"], math.inf) > _finite(
        most_accurate["report"]["traj"], math.inf
    )
    if selection == "fd" and most_accurate["label"] != winner.label and less_accurate:
        two_judges = (
            f"FD prefers {winner.label} (trajectory error {win['traj']:.4g}) over the more "
            f"accurate {most_accurate['label']} (trajectory error "
            f"{most_accurate['report']['traj']:.4g})"
        )
    reference_fd = reference.get("fd", {}).get("value")
    return {
        "winner": winner.label,
        "winner_family": winner.family,
        "best_baseline": best_baseline.label,
        "num_inference_steps": steps,
        "gain": gain,
        "fd_over_reference": None
        if reference_fd is None or win.get("fd") is None
        else win["fd"] / reference_fd,
        "two_judges": two_judges,
        "files": files,
        "rows": rows,
    }


def _finite(value: Any, default: Any = None) -> Any:
    return float(value) if value is not None and math.isfinite(float(value)) else default


def _markdown(report: dict[str, Any]) -> str:
    metrics = report["report"]["metrics"]
    sel = report["selection"]
    lines = [
        f"# stepsearch optimize: {report['model']['name']}",
        "",
        f"Searches optimise trajectory error on seed 0 ({report['search']['samples']} samples); "
        f"the winner per NFE is the lowest {sel['metric']} on seed {sel['seed']} "
        f"({sel['samples']} samples) among search results and built-in samplers; every number "
        f"below is on seed {report['report']['seed']} ({report['report']['samples']} samples), "
        "noise neither the searches nor the selection saw.",
        "",
    ]
    conditioning = report.get("conditioning")
    if conditioning and conditioning.get("kind") == "class_conditional":
        lines += [
            f"Class-conditional model: sample i asks for class {conditioning['labels']}, "
            f"classifier-free guidance scale {conditioning['guidance_scale']:g}.",
            "",
        ]
    elif conditioning:
        lines += [
            f"Text-to-image pipeline ({conditioning['pipeline']}, {conditioning['height']}x"
            f"{conditioning['width']}): {conditioning['num_prompts']} prompts "
            f"({conditioning['prompts'][:19]}...), sample i gets prompt i mod "
            f"{conditioning['num_prompts']}, guidance scale {conditioning['guidance_scale']:g}; "
            "trajectory error is measured on the decoded images.",
            "",
        ]
    for item in report.get("skipped", []):
        lines += [f"- {item['reason']}", ""]
    if report["partial"]:
        lines += ["**Partial result** (the budget ended before every stage finished):", ""]
        lines += [f"- NFE {i['nfe']}, {i['stage']}: {i['reason']}" for i in report["incomplete"]]
        lines.append("")
    reference_fd = report["reference"].get("fd", {}).get("value")
    if reference_fd is not None:
        lines += [f"Converged reference ({report['reference']['sampler']['solver']}, "
                  f"{report['reference']['sampler']['num_steps']} steps): FD {reference_fd:.4g}.",
                  ""]  # fmt: skip
    head = "| NFE | winner | " + " | ".join(f"winner {m}" for m in metrics)
    head += " | best built-in | " + " | ".join(f"built-in {m}" for m in metrics) + " | gain |"
    lines += [head, "| ---: | --- | " + "---: | " * len(metrics) + "--- | "
              + "---: | " * len(metrics) + "---: |"]  # fmt: skip
    for nfe, entry in report["per_nfe"].items():
        report_of = {row["label"]: row["report"] for row in entry["rows"]}
        win, base = report_of[entry["winner"]], report_of[entry["best_baseline"]]
        gain = entry["gain"].get(sel["metric"])
        lines.append(
            f"| {nfe} | {entry['winner']} | " + " | ".join(_cell(win[m]) for m in metrics)
            + f" | {entry['best_baseline']} | " + " | ".join(_cell(base[m]) for m in metrics)
            + f" | {'' if gain is None else f'{100 * gain:.1f}%'} |"
        )  # fmt: skip
    flags = [(n, e["two_judges"]) for n, e in report["per_nfe"].items() if e["two_judges"]]
    if flags:
        lines += ["", "Two judges disagree:", ""]
        lines += [f"- NFE {n}: {text}" for n, text in flags]
    for nfe, entry in report["per_nfe"].items():
        lines += ["", f"## NFE {nfe}", "",
                  f"Scheduler directory: `{entry['files'].get('scheduler', '(none)')}`", "",
                  "| method | " + " | ".join(f"{m} (report)" for m in metrics)
                  + f" | {sel['metric']} (selection) |",
                  "| --- | " + "---: | " * (len(metrics) + 1)]  # fmt: skip
        for row in sorted(entry["rows"], key=lambda r: _finite(r["select"][sel["metric"]], 1e300)):
            mark = " **(winner)**" if row["label"] == entry["winner"] else ""
            mark += " (partial)" if row["partial"] else ""
            lines.append(
                f"| {row['label']}{mark} | " + " | ".join(_cell(row["report"][m]) for m in metrics)
                + f" | {_cell(row['select'][sel['metric']])} |"
            )  # fmt: skip
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


GRID_PIXELS = 192
"""The largest side of one image in the report's PNG grid."""


def _upscaled(samples: Tensor, rows: int, cols: int, scale: int) -> np.ndarray:
    """A ``rows x cols`` montage of images in ``[-1, 1]`` as ``[0, 1]`` pixels, each pixel a
    ``scale x scale`` block (nearest neighbour), one blank pixel row / column between images.
    Images above :data:`GRID_PIXELS` a side (a pipeline's 512 or 1024) are average-pooled to about
    that first: a figure shows no more, and the montage stays small."""
    samples = samples.detach().cpu().double()[: rows * cols]
    pool = math.ceil(max(samples.shape[-2:]) / GRID_PIXELS)
    if pool > 1:
        samples = torch.nn.functional.avg_pool2d(samples, pool, ceil_mode=True)
    images = ((samples / 2 + 0.5).clamp(0, 1)).numpy()
    channels, height, width = images.shape[1:]
    pad = max(1, scale // 2)
    canvas = np.ones((rows * (height * scale + pad), cols * (width * scale + pad), channels))
    for k in range(min(rows * cols, images.shape[0])):
        r, c = divmod(k, cols)
        block = images[k].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
        y, x = r * (height * scale + pad), c * (width * scale + pad)
        canvas[y : y + height * scale, x : x + width * scale] = block
    return canvas[..., 0] if channels == 1 else canvas


def _plot(
    run: _Run,
    report: dict[str, Any],
    grids: dict[int, dict[str, Tensor]],
    found: dict[int, list[Candidate]],
) -> Path:
    """One PNG: every method's report-seed metrics vs NFE (built-ins thin, searches bold), the
    chosen schedules against the built-in spacings, and best built-in vs winner samples."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["report"]["metrics"]
    nfes = [int(n) for n in report["per_nfe"]]
    image_rows = len(grids)
    rows, cols = run.settings.grid_rows, run.settings.grid_cols
    montages = {
        nfe: {role: _upscaled(made[role], rows, cols, max(1, 48 // max(int(made[role].shape[-2]), 1)))
              for role in ("baseline", "winner")}
        for nfe, made in grids.items()
    }  # fmt: skip
    width = 6.0 * max(len(metrics) + 1, 2)
    # An image row is as tall as its montage drawn at half the figure's width, plus its title.
    aspect = max((m["winner"].shape[0] / m["winner"].shape[1] for m in montages.values()), default=0)
    heights = [4.5] + [width / 2 * aspect + 0.4] * image_rows
    figure = plt.figure(figsize=(width, sum(heights)), layout="constrained")
    outer = figure.add_gridspec(1 + image_rows, 1, height_ratios=heights)
    grid_spec = outer[0, 0].subgridspec(1, len(metrics) + 1)
    labels: dict[str, str] = {}
    for entry in report["per_nfe"].values():
        for row in entry["rows"]:
            labels[row["label"]] = row["family"]
    for column, metric in enumerate(metrics):
        axes = figure.add_subplot(grid_spec[0, column])
        for index, (label, family) in enumerate(labels.items()):
            xs, ys = [], []
            for nfe in nfes:
                rows = {r["label"]: r for r in report["per_nfe"][str(nfe)]["rows"]}
                if label in rows and rows[label]["report"][metric] is not None:
                    xs.append(nfe)
                    ys.append(rows[label]["report"][metric])
            searched = family not in ("baseline", "diffusers")
            axes.plot(xs, ys, marker="o", ms=3 if not searched else 5,
                      lw=2.2 if searched else 0.8, alpha=1.0 if searched else 0.45,
                      ls="-" if searched else ("--" if family == "diffusers" else ":"),
                      color=f"C{index % 10}", label=label)  # fmt: skip
        winners = [
            {r["label"]: r for r in report["per_nfe"][str(n)]["rows"]}[
                report["per_nfe"][str(n)]["winner"]
            ]["report"][metric]
            for n in nfes
        ]
        axes.plot(nfes, winners, color="black", lw=3, alpha=0.35, label="winner (per NFE)")
        reference = report["reference"].get(metric, {}).get("value") if metric == "fd" else None
        if reference is not None:
            axes.axhline(reference, color="black", lw=1, ls="-.", label="converged reference")
        axes.set_yscale("log")
        axes.set_xlabel("NFE")
        axes.set_ylabel(f"{metric} (report seed {report['report']['seed']})")
        axes.set_title(f"{metric} vs NFE")
        if column == 0:
            axes.legend(fontsize=5, ncol=2)
    axes = figure.add_subplot(grid_spec[0, len(metrics)])
    for index, nfe in enumerate(nfes):
        color = f"C{index % 10}"
        for schedule in spacing_schedules(
            run.source.noise, nfe, ("karras", "logsnr_uniform", "trailing")
        ).values():
            sigmas = schedule.to_kdiffusion_sigmas()
            axes.plot(np.flatnonzero(sigmas > 0), sigmas[sigmas > 0], ls=":", lw=0.8, color=color)
        winner = next((c for c in found[nfe] if c.label == report["per_nfe"][str(nfe)]["winner"]),
                      None)  # fmt: skip
        if winner is not None and winner.schedule is not None:
            sigmas = winner.schedule.to_kdiffusion_sigmas()
            axes.plot(np.flatnonzero(sigmas > 0), sigmas[sigmas > 0], marker="o", lw=2,
                      color=color, label=f"NFE {nfe}: {winner.label}")  # fmt: skip
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("k-diffusion sigma")
    axes.set_title("chosen schedules (solid) vs karras / logSNR / trailing (dotted)")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=6)
    for position, (nfe, montage) in enumerate(sorted(montages.items())):
        entry = report["per_nfe"][str(nfe)]
        pair = outer[1 + position, 0].subgridspec(1, 2)
        for column, role in enumerate(("baseline", "winner")):
            axes = figure.add_subplot(pair[0, column])
            axes.imshow(montage[role], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            name = entry["best_baseline"] if role == "baseline" else entry["winner"]
            axes.set_title(f"NFE {nfe}: {'best built-in' if role == 'baseline' else 'optimized'}"
                           f" - {name}", fontsize=9)  # fmt: skip
            axes.axis("off")
    figure.suptitle(f"stepsearch optimize: {report['model']['name']}"
                    + (" (partial)" if report["partial"] else ""))  # fmt: skip
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return atomic_write_bytes(run.out / "report.png", buffer.getvalue())


def gains_in_words(result: OptimizeResult | dict[str, Any]) -> list[str]:
    """One plain sentence per NFE: the optimized sampler vs the best built-in on the report seed,
    and where its scheduler directory is."""
    report = result.report if isinstance(result, OptimizeResult) else result
    metric = report["selection"]["metric"]
    names = {"fd": "FD-digits" if report["model"]["name"] == "digits" else "FD",
             "traj": "trajectory error"}  # fmt: skip
    lines = []
    for nfe, entry in report["per_nfe"].items():
        report_of = {row["label"]: row["report"] for row in entry["rows"]}
        win, base = report_of[entry["winner"]], report_of[entry["best_baseline"]]
        where = entry["files"].get("scheduler", "(no diffusers form)")
        if entry["winner"] == entry["best_baseline"]:
            lines.append(
                f"NFE {nfe}: no search beat the best built-in sampler ({entry['winner']}, "
                f"{names.get(metric, metric)} {_cell(base[metric])}); scheduler: {where}"
            )
            continue
        gain = entry["gain"].get(metric)
        text = "" if gain is None else f"{100 * gain:.0f}% lower "
        lines.append(
            f"NFE {nfe}: {entry['winner']} has {text}{names.get(metric, metric)} than the best "
            f"built-in ({entry['best_baseline']}): {_cell(win[metric])} vs {_cell(base[metric])}"
            + (f"; trajectory error {_cell(win['traj'])} vs {_cell(base['traj'])}"
               if metric != "traj" else "")
            + f". Scheduler: {where}"
        )  # fmt: skip
    return lines


def pipeline_settings() -> OptimizeSettings:
    """Defaults for a text-to-image pipeline, where every sample is a full guided UNet solve and
    a VAE decode: 64 search samples, 128 for selection and report, 16 images per model call, a
    64-sample DP teacher, 32 OLSS trajectories, a 2 x 4 sample grid (made in one pipeline call:
    a replay reproduces it bit for bit with the same batch of 8 prompts)."""
    return OptimizeSettings(
        search_samples=64,
        select_samples=128,
        held_out_samples=128,
        dp=DPSettings(teacher_samples=64),
        olss_samples=32,
        grid_rows=2,
        grid_cols=4,
        chunk_size=16,
    )


def demo_settings() -> OptimizeSettings:
    """Small settings for ``stepsearch demo`` (a few minutes on 2 CPU cores): 128 search samples,
    256 for selection and report, fewer built-in spacings, one solver per family, a 40-point DP
    grid (its solver coefficients are the DP's fixed cost: ~10k instead of ~160k on 100 points),
    a small AutoDiffusion population."""
    return OptimizeSettings(
        search_samples=128,
        select_samples=256,
        held_out_samples=256,
        dp_solvers=("dpm_solver_pp_2m",),
        autodiffusion_solvers=("unipc_bh2",),
        baseline_solvers=("dpm_solver_pp_2m", "unipc_bh2"),
        spacings=("time_uniform", "logsnr_uniform", "karras", "trailing"),
        dp=DPSettings(grid_points=40, teacher_samples=128, coeffs=(GITS_COEFF,)),
        olss_samples=64,
        autodiffusion=AutoDiffusionSettings(population=16, mutations=8, crossovers=4, parents=4),
        autodiffusion_trials=60,
    )
