"""One evaluation end to end: check the inputs, build the methods, run them on a model or a
text-to-image pipeline, and write the tables, plots, sample grids and summary.

This is what ``stepsearch eval`` and ``stepsearch demo`` call (the command modules only parse
arguments and print); :func:`compute_statistics` is what ``stepsearch stats`` calls.
"""

from __future__ import annotations

import difflib
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stepsearch._io import atomic_write_bytes, atomic_write_text
from stepsearch.eval.clip_score import ClipScorer
from stepsearch.eval.experiment import METRICS, TEXT_TO_IMAGE_METRICS, run_experiment
from stepsearch.eval.features import (
    INCEPTION_ENV_VAR,
    INCEPTION_FILENAME,
    INCEPTION_URL,
    InceptionFeatures,
    find_inception_weights,
)
from stepsearch.eval.fid import FeatureStatistics
from stepsearch.eval.report import ResultTable, environment, save_sample_grid
from stepsearch.eval.scoring import FeatureReference
from stepsearch.models import (
    DEFAULT_GUIDANCE_SCALE,
    ImageModel,
    Method,
    load_model,
    pipeline_guidance_scale,
)
from stepsearch.models.pipeline import read_prompts
from stepsearch.schedule import SPACINGS, StepSchedule
from stepsearch.schedule_file import load_schedule, read_plan_file
from stepsearch.solvers import BUILT_IN_SOLVERS
from stepsearch.testbeds import digits

__all__ = [
    "ALL_METRICS",
    "DEFAULT_CHUNK_SIZE",
    "METRIC_TITLES",
    "EvalInputs",
    "EvalResult",
    "check_device",
    "check_diffusers_scheduler",
    "check_nfes",
    "compute_statistics",
    "default_metrics",
    "evaluate",
    "load_clip_scorer",
    "load_inception",
    "methods_from_names",
    "sampling_guidance_scale",
    "write_report",
]

METRIC_TITLES = {
    "fd": "Fréchet distance to real data (FD-digits for the bundled model)",
    "acc": "classifier accuracy on the requested class (higher is better)",
    "fid": "FID (Inception features) against the reference statistics",
    "kid": "KID x 1e3",
    "clip": "CLIP score (100 x cosine of image and prompt embeddings; higher is better)",
    "traj": "median RMS error to a reference ODE solution (same noise)",
}

ALL_METRICS = tuple(dict.fromkeys((*METRICS, *TEXT_TO_IMAGE_METRICS)))
"""Every metric name an evaluation knows (which apply depends on model vs pipeline)."""

DEFAULT_CHUNK_SIZE = {"model": 250, "pipeline": 16}
"""Samples per batch when no chunk size is given."""


# ----------------------------------------------------------------------------------------------
# input checks: each raises ValueError naming the option to fix


def check_device(device: str) -> torch.device:
    """``device`` as a ``torch.device``, or ``ValueError`` when this machine cannot use it (a
    malformed name, or CUDA / MPS asked for where this torch build or machine has none)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device!r}: {error}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ValueError(
            f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build}, "
            "no usable GPU found); use --device cpu"
        )
    if parsed.type == "cuda" and parsed.index is not None:
        count = torch.cuda.device_count()
        if parsed.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    return parsed


def _diffusers_scheduler_names() -> list[str]:
    import diffusers

    return sorted(name for name in dir(diffusers) if name.endswith("Scheduler"))


def check_diffusers_scheduler(name: str) -> None:
    """Raise ``ValueError`` (with the closest names) unless diffusers has a scheduler ``name``."""
    known = _diffusers_scheduler_names()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"choose from {', '.join(known)}"
    raise ValueError(f"--baselines: diffusers has no scheduler class {name!r}; {hint}")


def methods_from_names(
    schedules: Sequence[str],
    solvers: Sequence[str],
    baselines: Sequence[str],
    guidance_scale: float | None = None,
    model: str | None = None,
) -> list[Method]:
    """The diffusers ``baselines`` (class names), then every solver on every schedule (a spacing
    name, a :class:`~stepsearch.schedule.StepSchedule` JSON file or a search's schedule file,
    named after its file stem). A schedule file fitted at a guidance scale other than
    ``guidance_scale`` (the one the evaluation samples at), or made for another model than
    ``model`` (the name of the model or pipeline evaluated, compared by name: a bundled model's,
    a directory's last component), warns
    (:class:`~stepsearch.schedule_file.ModelMismatchWarning`)."""
    for baseline in baselines:
        check_diffusers_scheduler(baseline)
    for solver in solvers:
        if solver not in BUILT_IN_SOLVERS:
            raise ValueError(
                f"unknown solver {solver!r}; choose from {', '.join(BUILT_IN_SOLVERS)}"
            )
    methods = [Method.diffusers(name) for name in baselines]
    for schedule_spec in schedules:
        if schedule_spec in SPACINGS:
            schedule: str | StepSchedule = schedule_spec
        else:
            path = Path(schedule_spec)
            if not path.is_file():
                raise ValueError(
                    f"{schedule_spec!r} is neither a spacing ({', '.join(SPACINGS)}) nor a file"
                )
            schedule = _schedule_from_file(path, solvers, guidance_scale, model)
        methods += [Method.stepsearch(solver, schedule) for solver in solvers]
    return methods


class PlanStepsOnlyWarning(UserWarning):
    """``eval --schedules`` was given a solver plan: it samples the plan's step schedule with the
    chosen solvers, not the plan's own per-step rules."""


def _schedule_from_file(
    path: Path, solvers: Sequence[str], guidance_scale: float | None, model: str | None
) -> StepSchedule:
    """The step schedule of a schedule, schedule-file or solver-plan file, named after its stem
    (:func:`methods_from_names`); a plan warns (:class:`PlanStepsOnlyWarning`)."""
    found = read_plan_file(path)
    if found is not None:
        warnings.warn(
            f"{path} holds a solver plan: eval samples its step schedule with "
            f"{', '.join(solvers)}, not the plan's own per-step rules (run the plan with "
            "`stepsearch export FILE --to diffusers DIR`, a StepsearchPlanScheduler)",
            PlanStepsOnlyWarning,
            stacklevel=3,
        )
    if found is not None and found[1] is None:  # a plain plan file: no provenance to check
        return found[0].schedule.with_metadata(name=path.stem)
    identity = None if model is None else {"name": Path(model).name, "digest": None}
    schedule = load_schedule(path, guidance_scale=guidance_scale, model=identity)
    return schedule.with_metadata(name=path.stem)


def sampling_guidance_scale(
    model: str | None, pipeline: str | Path | None, guidance_scale: float | None
) -> float | None:
    """The classifier-free guidance scale an evaluation samples at: as given, else diffusers'
    :data:`~stepsearch.models.pipeline.DEFAULT_GUIDANCE_SCALE` (7.5) for a pipeline,
    :data:`~stepsearch.testbeds.digits.GUIDANCE_SCALE` for a bundled
    class-conditional model; ``None`` for an unconditional model (nothing is guided)."""
    if guidance_scale is not None:
        return float(guidance_scale)
    if pipeline is not None:
        return DEFAULT_GUIDANCE_SCALE
    spec = digits.MODELS.get(str(model))
    return float(digits.GUIDANCE_SCALE) if spec is not None and spec.conditional else None


def check_nfes(nfes: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``nfes`` is a non-empty list of positive budgets."""
    if not nfes:
        raise ValueError("--nfe: give at least one budget")
    bad = [nfe for nfe in nfes if nfe < 1]
    if bad:
        raise ValueError(f"--nfe: budgets are model evaluations, at least 1 (got {bad})")


def default_metrics(pipeline: bool, clip_model: bool, model: str | None = None) -> list[str]:
    """``fd, traj`` for a model (and ``acc`` for the bundled class-conditional ``digits-cond``);
    ``clip`` (with a CLIP model) or ``traj`` for a pipeline."""
    if not pipeline:
        spec = digits.MODELS.get(str(model))
        return ["fd", "traj", "acc"] if spec is not None and spec.conditional else ["fd", "traj"]
    return ["clip" if clip_model else "traj"]


@dataclass(frozen=True)
class EvalInputs:
    """What an evaluation needs beyond the methods: a text-to-image pipeline with its prompts
    (instead of an image model), the files some metrics need, and the classifier-free guidance
    scale (``None``: the default, ``DEFAULT_GUIDANCE_SCALE`` for a pipeline,
    ``digits.GUIDANCE_SCALE`` for ``digits-cond``; refused for unconditional models)."""

    pipeline: str | None = None
    prompts: Path | None = None
    clip_model: Path | None = None
    inception_weights: Path | None = None
    reference_stats: Path | None = None
    guidance_scale: float | None = None
    dtype: str | None = None  # what the network runs in (--dtype); samples stay float32

    @property
    def pipeline_guidance_scale(self) -> float:
        """The pipeline's guidance scale: as given, or diffusers' default
        (:data:`~stepsearch.models.pipeline.DEFAULT_GUIDANCE_SCALE`)."""
        return pipeline_guidance_scale(self.guidance_scale)

    def check(self, metrics: Sequence[str]) -> None:
        """Raise ``ValueError`` naming the missing option when a metric lacks what it needs."""
        if self.pipeline is None and self.prompts is not None:
            raise ValueError("--prompts applies to text-to-image runs: pass --pipeline DIR too")
        if self.pipeline is not None and self.prompts is None:
            raise ValueError("--pipeline needs --prompts FILE (one prompt per line)")
        known = TEXT_TO_IMAGE_METRICS if self.pipeline is not None else METRICS
        for metric in metrics:
            if metric not in ALL_METRICS:
                raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(known)}")
            if metric == "clip" and self.pipeline is None:
                raise ValueError("metric clip needs a text-to-image --pipeline DIR and --prompts")
            if metric == "acc" and self.pipeline is not None:
                raise ValueError(
                    "metric acc is a class-conditional model's classifier accuracy "
                    "(--model digits-cond); with --pipeline use clip"
                )
            if metric == "fd" and self.pipeline is not None:
                raise ValueError(
                    "metric fd is an unconditional model's own feature space; with --pipeline "
                    "use fid (--inception-weights, --reference-stats)"
                )
        if "clip" in metrics and self.clip_model is None:
            raise ValueError("metric clip needs --clip-model DIR (a local CLIP model directory)")
        inception_metrics = {"fid"} | ({"kid"} if self.pipeline is not None else set())
        for metric in sorted(inception_metrics & set(metrics)):
            self.require_inception(metric)

    def require_inception(self, metric: str) -> None:
        """Raise ``ValueError`` when ``metric`` lacks Inception weights or a reference."""
        if self.inception_weights is None and find_inception_weights() is None:
            raise ValueError(
                f"metric {metric} needs --inception-weights FILE ({INCEPTION_FILENAME})"
            )
        if self.reference_stats is None:
            raise ValueError(
                f"metric {metric} needs --reference-stats: an .npz made by `stepsearch stats` "
                "(or clean-fid / EDM), or a folder of reference images"
            )
        if metric == "kid" and self.reference_stats.suffix == ".npz":
            raise ValueError(
                "metric kid needs reference images (a folder or .safetensors for "
                "--reference-stats): an .npz holds only the mean and covariance"
            )


# ----------------------------------------------------------------------------------------------
# loading what the metrics need


def load_inception(weights: Path | None, device: str | torch.device) -> Any:
    """Inception features from ``weights`` (a file, a folder holding it, or ``None``: the places
    :func:`~stepsearch.eval.features.find_inception_weights` searches). A missing or unreadable
    file is a ``ValueError`` that says how to pass it: ``--inception-weights``."""
    if find_inception_weights(weights) is None:
        where = f"'{weights}' does not exist" if weights is not None else "not found"
        raise ValueError(
            f"Inception weights {where}: pass --inception-weights FILE ({INCEPTION_FILENAME}, "
            f"TorchScript, from {INCEPTION_URL} ; a folder holding it also works) or set "
            f"${INCEPTION_ENV_VAR}"
        )
    try:
        return InceptionFeatures(weights).to(device)
    except RuntimeError as error:  # an unreadable file: a usage error too
        raise ValueError(f"--inception-weights: {error}") from None


def _fid_reference(inputs: EvalInputs, metric: str, device: torch.device) -> FeatureReference:
    inputs.require_inception(metric)
    assert inputs.reference_stats is not None
    return FeatureReference.load(
        load_inception(inputs.inception_weights, device), inputs.reference_stats
    )


def load_clip_scorer(path: Path, device: str | torch.device) -> ClipScorer:
    """A :class:`~stepsearch.eval.clip_score.ClipScorer` from the local CLIP directory ``path``
    on ``device``; an unloadable directory is a ``ValueError`` naming ``--clip-model``."""
    try:
        scorer = ClipScorer.from_pretrained(path, local_files_only=True)
    except RuntimeError as error:
        raise ValueError(f"--clip-model: {error}") from None
    scorer.model.to(device)
    return scorer


def _accelerator() -> Any | None:
    """An ``accelerate`` Accelerator when launched with several processes, else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


# ----------------------------------------------------------------------------------------------
# running


OnSamples = Callable[[Method, int, Tensor], None]


@dataclass
class EvalResult:
    """What :func:`evaluate` measured: one table per metric, the run's context (recorded in every
    results JSON), the first samples of every cell for the grids, the wall time, the cells no
    method could spend exactly, and whether this is the process that writes."""

    tables: dict[str, ResultTable]
    context: dict[str, Any]
    grids: dict[int, list[tuple[str, Tensor]]] = field(default_factory=dict)
    seconds: float = 0.0
    unreachable: list[tuple[str, int]] = field(default_factory=list)
    main_process: bool = True


def _run_unconditional(
    model_spec: str,
    methods: list[Method],
    nfes: list[int],
    metrics: list[str],
    num_samples: int,
    seed: int,
    device: torch.device,
    chunk_size: int,
    inputs: EvalInputs,
    accelerator: Any | None,
    on_samples: OnSamples,
) -> tuple[dict[str, ResultTable], dict[str, Any]]:
    model = load_model(
        model_spec, device=device, guidance_scale=inputs.guidance_scale, torch_dtype=inputs.dtype
    )
    assert isinstance(model, ImageModel)
    fid_reference = None
    own_features = model.feature_extractor is not None and model.reference_images is not None
    inception_metric = next(
        (m for m in metrics if m == "fid" or (m == "kid" and not own_features)), None
    )
    if inception_metric is not None:
        fid_reference = _fid_reference(inputs, inception_metric, device)
    tables = run_experiment(
        model,
        methods,
        nfes,
        metrics,
        num_samples,
        seed,
        accelerator,
        chunk_size,
        on_samples,
        fid_reference=fid_reference,
    )
    context: dict[str, Any] = {"model": model_spec}
    if model.conditional:
        context.update(guidance_scale=model.guidance_scale, labels=f"index mod {model.num_classes}")
    if fid_reference is not None:
        context["reference_stats"] = fid_reference.source
    return tables, context


def _run_text_to_image(
    methods: list[Method],
    nfes: list[int],
    metrics: list[str],
    num_samples: int,
    seed: int,
    device: torch.device,
    chunk_size: int,
    inputs: EvalInputs,
    accelerator: Any | None,
    on_samples: OnSamples,
) -> tuple[dict[str, ResultTable], dict[str, Any]]:
    assert inputs.pipeline is not None and inputs.prompts is not None
    prompts = read_prompts(inputs.prompts)
    clip_scorer = None
    if "clip" in metrics:
        assert inputs.clip_model is not None
        clip_scorer = load_clip_scorer(inputs.clip_model, device)
    inception_metric = next((m for m in metrics if m in ("fid", "kid")), None)
    fid_reference = (
        _fid_reference(inputs, inception_metric, device) if inception_metric is not None else None
    )
    model = load_model(
        pipeline=inputs.pipeline,
        prompts=prompts,
        guidance_scale=inputs.pipeline_guidance_scale,
        device=device,
        torch_dtype=inputs.dtype,
    )
    tables = run_experiment(
        model,
        methods,
        nfes,
        metrics,
        num_samples,
        seed,
        accelerator,
        chunk_size,
        on_samples,
        fid_reference=fid_reference,
        clip_scorer=clip_scorer,
    )
    context: dict[str, Any] = {
        "pipeline": inputs.pipeline,
        "prompts": str(inputs.prompts),
        "num_prompts": len(prompts),
        "guidance_scale": inputs.pipeline_guidance_scale,
        "image_size": list(model.image_size),
    }
    if clip_scorer is not None:
        context["clip_model"] = str(inputs.clip_model)
    if fid_reference is not None:
        context["reference_stats"] = fid_reference.source
    return tables, context


def _sample_file_name(label: str, nfe: int) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") + f"_nfe{nfe}.safetensors"


def evaluate(
    model_spec: str,
    methods: Sequence[Method],
    nfes: Sequence[int],
    metrics: Sequence[str],
    num_samples: int,
    seed: int = 0,
    *,
    device: str = "cpu",
    chunk_size: int | None = None,
    inputs: EvalInputs | None = None,
    samples_dir: Path | None = None,
) -> EvalResult:
    """Run every method at every NFE and score it on every metric.

    With ``inputs.pipeline`` the methods run inside that text-to-image pipeline on
    ``inputs.prompts`` (``model_spec`` is ignored); otherwise on the image model ``model_spec``
    (a bundled model, ``digits``, ``digits-flow``, ``digits-cond`` at ``inputs.guidance_scale``,
    or a local ``UNet2DModel`` directory). ``samples_dir``: also write every cell's
    samples there as safetensors (main process only). Under ``accelerate launch`` the samples are
    split across processes; every process returns the same tables.

    Raises:
        ValueError: bad inputs (unknown metric, missing file for a metric, unusable device, no
            budget), or no method can spend exactly any of ``nfes``.
    """
    inputs = inputs or EvalInputs()
    check_nfes(nfes)
    inputs.check(metrics)
    torch_device = check_device(device)
    kind = "model" if inputs.pipeline is None else "pipeline"
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE[kind]
    accelerator = _accelerator()
    main = accelerator is None or bool(accelerator.is_main_process)
    grid_size = 16 if inputs.pipeline is None else 8
    grids: dict[int, list[tuple[str, Tensor]]] = {}

    def keep_grid(method: Method, nfe: int, samples: Tensor) -> None:
        grids.setdefault(nfe, []).append((method.label, samples[:grid_size]))
        if samples_dir is not None and main:
            from safetensors.torch import save

            atomic_write_bytes(
                samples_dir / _sample_file_name(method.label, nfe),
                save({"samples": samples.contiguous()}),
            )

    start = time.perf_counter()
    arguments = (list(methods), list(nfes), list(metrics), num_samples, seed, torch_device)
    settings = (chunk_size, inputs, accelerator, keep_grid)
    if inputs.pipeline is None:
        tables, context = _run_unconditional(model_spec, *arguments, *settings)
    else:
        tables, context = _run_text_to_image(*arguments, *settings)
    seconds = time.perf_counter() - start
    measured = {(cell.method, cell.nfe) for table in tables.values() for cell in table.cells}
    unreachable = [
        (method.label, nfe)
        for method in methods
        for nfe in nfes
        if (method.label, nfe) not in measured
    ]
    if not measured:
        raise ValueError(
            f"no method can spend exactly NFE {', '.join(map(str, nfes))}: nothing was measured"
        )
    context = {
        **context,
        "num_samples": num_samples,
        "seed": seed,
        "seconds": round(seconds, 1),
        "environment": environment(),
    }
    return EvalResult(tables, context, grids, seconds, unreachable, main)


def write_report(result: EvalResult, out: Path, title: str) -> None:
    """Write ``results_<metric>.{json,md,png}``, ``samples_nfe<N>.png`` and ``summary.md`` into
    ``out`` (atomically). Only the main process writes."""
    if not result.main_process:
        return
    context = result.context
    subject_kind = "pipeline" if "pipeline" in context else "model"
    num_samples, seed, seconds = context["num_samples"], context["seed"], result.seconds
    summary = [
        f"# {title}\n",
        f"{subject_kind} `{context[subject_kind]}`, {num_samples} samples per "
        f"cell, seed {seed}, {seconds:.0f} s\n",
    ]
    for metric, table in result.tables.items():
        table.save(out, f"results_{metric}", METRIC_TITLES.get(metric, metric), **context)
        summary += [
            f"## {METRIC_TITLES.get(metric, metric)}\n",
            table.to_markdown(),
            f"![{metric}](results_{metric}.png)\n",
        ]
    if result.unreachable:
        summary += [
            "## Not measured\n",
            "No step count spends exactly these budgets:\n",
            *(f"- {label}: NFE {nfe}" for label, nfe in result.unreachable),
            "",
        ]
    grid_size = 16 if subject_kind == "model" else 8
    for nfe, rows in result.grids.items():
        save_sample_grid(
            rows,
            out / f"samples_nfe{nfe}.png",
            f"first {grid_size} samples at NFE {nfe} (same noise in every row)",
        )
    atomic_write_text(out / "summary.md", "\n".join(summary))


def compute_statistics(
    images: Path,
    features: str = "inception",
    inception_weights: Path | None = None,
    batch_size: int = 250,
    device: str = "cpu",
) -> FeatureStatistics:
    """Feature statistics of a folder / ``.safetensors`` of images with ``features`` (``inception``
    or ``digits``): what ``stepsearch stats`` writes."""
    torch_device = check_device(device)
    if images.suffix == ".npz":
        raise ValueError(
            f"'{images}' is already statistics; pass images (a folder or .safetensors)"
        )
    if features == "inception":
        extractor = load_inception(inception_weights, torch_device)
    elif features == "digits":
        extractor = digits.DigitsFeatureExtractor(digits.load_classifier(device=torch_device))
    else:
        raise ValueError(f"--features must be 'inception' or 'digits', got {features!r}")
    return FeatureReference.load(extractor, images, batch_size=batch_size).statistics
