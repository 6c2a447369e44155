"""``stepsearch eval``, ``stepsearch demo`` and ``stepsearch stats``: side-by-side sampler
evaluation with tables and plots (unconditional models and text-to-image pipelines), and reference
statistics for FID."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stepsearch._io import atomic_write_bytes, atomic_write_text
from stepsearch.eval.experiment import (
    METRICS,
    FeatureReference,
    Method,
    default_methods,
    load_image_model,
    run_experiment,
)
from stepsearch.eval.fid import FeatureStatistics
from stepsearch.eval.report import ResultTable, environment, save_sample_grid
from stepsearch.eval.text_to_image import TEXT_TO_IMAGE_METRICS
from stepsearch.schedule import SPACINGS, StepSchedule
from stepsearch.solvers import SOLVERS

console = Console()

METRIC_TITLES = {
    "fd": "Fréchet distance to real data (FD-digits for the bundled model)",
    "fid": "FID (Inception features) against the reference statistics",
    "kid": "KID x 1e3",
    "clip": "CLIP score (100 x cosine of image and prompt embeddings; higher is better)",
    "traj": "median RMS error to a reference ODE solution (same noise)",
}

ALL_METRICS = tuple(dict.fromkeys((*METRICS, *TEXT_TO_IMAGE_METRICS)))
"""Every metric name ``stepsearch eval`` knows (which apply depends on --model / --pipeline)."""

DEFAULT_CHUNK_SIZE = {"model": 250, "pipeline": 16}
"""Samples per batch when ``--chunk-size`` is not given."""


def _accelerator() -> Any | None:
    """An ``accelerate`` Accelerator when launched with several processes, else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def _methods(schedules: list[str], solvers: list[str], baselines: list[str]) -> list[Method]:
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
            loaded = StepSchedule.load(path)
            schedule = loaded.with_metadata(name=path.stem)
        for solver in solvers:
            if solver not in SOLVERS:
                raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
            methods.append(Method.stepsearch(solver, schedule))
    return methods


def _print_table(table: ResultTable) -> None:
    best = {nfe: table.best(nfe) for nfe in table.nfes}
    view = Table(title=METRIC_TITLES.get(table.metric, table.metric))
    view.add_column("method")
    for nfe in table.nfes:
        view.add_column(f"NFE {nfe}", justify="right")
    for method in table.methods:
        cells = []
        for nfe in table.nfes:
            value = table.value(method, nfe)
            text = "–" if value is None else f"{value:.3g}"
            cells.append(f"[bold green]{text}[/]" if best[nfe] == method else text)
        view.add_row(method, *cells)
    console.print(view)


@dataclass(frozen=True)
class EvalInputs:
    """What ``stepsearch eval`` needs beyond the methods: a text-to-image pipeline with its
    prompts (instead of an unconditional ``--model``), and the files some metrics need."""

    pipeline: str | None = None
    prompts: Path | None = None
    clip_model: Path | None = None
    inception_weights: Path | None = None
    reference_stats: Path | None = None
    guidance_scale: float = 7.5

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
        from stepsearch.eval.features import INCEPTION_FILENAME, find_inception_weights

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


def _inception(weights: Path | None, device: str) -> Any:
    from stepsearch.eval.features import InceptionFeatures

    try:
        return InceptionFeatures(weights).to(device)
    except RuntimeError as error:  # missing or unreadable weights: a usage error
        raise ValueError(f"--inception-weights: {error}") from None


def _fid_reference(inputs: EvalInputs, metric: str, device: str) -> FeatureReference:
    inputs.require_inception(metric)
    assert inputs.reference_stats is not None
    return FeatureReference.load(
        _inception(inputs.inception_weights, device), inputs.reference_stats
    )


def _clip_scorer(path: Path, device: str) -> Any:
    from stepsearch.eval.clip_score import ClipScorer

    try:
        scorer = ClipScorer.from_pretrained(path, local_files_only=True)
    except RuntimeError as error:
        raise ValueError(f"--clip-model: {error}") from None
    scorer.model.to(device)
    return scorer


def _run_unconditional(
    model_spec: str,
    methods: list[Method],
    nfes: list[int],
    metrics: list[str],
    num_samples: int,
    seed: int,
    device: str,
    chunk_size: int,
    inputs: EvalInputs,
    accelerator: Any | None,
    on_samples: Any,
) -> tuple[dict[str, ResultTable], dict[str, Any]]:
    model = load_image_model(model_spec, device=device)
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
    if fid_reference is not None:
        context["reference_stats"] = fid_reference.source
    return tables, context


def _run_text_to_image(
    methods: list[Method],
    nfes: list[int],
    metrics: list[str],
    num_samples: int,
    seed: int,
    device: str,
    chunk_size: int,
    inputs: EvalInputs,
    accelerator: Any | None,
    on_samples: Any,
) -> tuple[dict[str, ResultTable], dict[str, Any]]:
    from stepsearch.eval.text_to_image import (
        TextToImageModel,
        load_pipeline,
        read_prompts,
        run_text_to_image_experiment,
    )

    assert inputs.pipeline is not None and inputs.prompts is not None
    prompts = read_prompts(inputs.prompts)
    clip_scorer = None
    if "clip" in metrics:
        assert inputs.clip_model is not None
        clip_scorer = _clip_scorer(inputs.clip_model, device)
    inception_metric = next((m for m in metrics if m in ("fid", "kid")), None)
    fid_reference = (
        _fid_reference(inputs, inception_metric, device) if inception_metric is not None else None
    )
    pipe = load_pipeline(inputs.pipeline, device)
    model = TextToImageModel(pipe, prompts, inputs.guidance_scale, name=Path(inputs.pipeline).name)
    tables = run_text_to_image_experiment(
        model,
        methods,
        nfes,
        metrics,
        num_samples,
        seed,
        clip_scorer=clip_scorer,
        fid_reference=fid_reference,
        accelerator=accelerator,
        chunk_size=chunk_size,
        on_samples=on_samples,
    )
    context: dict[str, Any] = {
        "pipeline": inputs.pipeline,
        "prompts": str(inputs.prompts),
        "num_prompts": len(prompts),
        "guidance_scale": inputs.guidance_scale,
        "image_size": list(model.image_size),
    }
    if clip_scorer is not None:
        context["clip_model"] = str(inputs.clip_model)
    if fid_reference is not None:
        context["reference_stats"] = fid_reference.source
    return tables, context


def evaluate(
    model_spec: str,
    methods: list[Method],
    nfes: list[int],
    metrics: list[str],
    num_samples: int,
    seed: int,
    out: Path,
    device: str,
    chunk_size: int,
    title: str,
    save_samples: bool = False,
    inputs: EvalInputs | None = None,
) -> dict[str, ResultTable]:
    """Run, print and write everything (only the main process writes).

    With ``inputs.pipeline`` the methods run inside that text-to-image pipeline on
    ``inputs.prompts`` (``model_spec`` is ignored); otherwise on the unconditional ``model_spec``.
    """
    inputs = inputs or EvalInputs()
    inputs.check(metrics)
    accelerator = _accelerator()
    main = accelerator is None or accelerator.is_main_process
    grid_size = 16 if inputs.pipeline is None else 8
    grids: dict[int, list[tuple[str, Any]]] = {}

    def keep_grid(method: Method, nfe: int, samples: Any) -> None:
        grids.setdefault(nfe, []).append((method.label, samples[:grid_size]))
        if save_samples and main:
            from safetensors.torch import save

            name = re.sub(r"[^A-Za-z0-9]+", "_", method.label).strip("_")
            atomic_write_bytes(
                out / "samples" / f"{name}_nfe{nfe}.safetensors",
                save({"samples": samples.contiguous()}),
            )

    start = time.perf_counter()
    arguments = (methods, nfes, metrics, num_samples, seed, device, chunk_size, inputs)
    if inputs.pipeline is None:
        tables, context = _run_unconditional(model_spec, *arguments, accelerator, keep_grid)
    else:
        tables, context = _run_text_to_image(*arguments, accelerator, keep_grid)
    seconds = time.perf_counter() - start
    if not main:
        return tables
    subject = context.get("pipeline", context.get("model", model_spec))
    context = {
        **context,
        "num_samples": num_samples,
        "seed": seed,
        "seconds": round(seconds, 1),
        "environment": environment(),
    }
    summary = [
        f"# {title}\n",
        f"{'pipeline' if inputs.pipeline else 'model'} `{subject}`, {num_samples} samples per "
        f"cell, seed {seed}, {seconds:.0f} s\n",
    ]
    for metric, table in tables.items():
        _print_table(table)
        table.save(out, f"results_{metric}", METRIC_TITLES.get(metric, metric), **context)
        summary += [
            f"## {METRIC_TITLES.get(metric, metric)}\n",
            table.to_markdown(),
            f"![{metric}](results_{metric}.png)\n",
        ]
    for nfe, rows in grids.items():
        save_sample_grid(
            rows,
            out / f"samples_nfe{nfe}.png",
            f"first {grid_size} samples at NFE {nfe} (same noise in every row)",
        )
    atomic_write_text(out / "summary.md", "\n".join(summary))
    console.print(f"wrote tables, plots and sample grids to [bold]{out}[/] in {seconds:.0f} s")
    return tables


def compute_statistics(
    images: Path,
    features: str = "inception",
    inception_weights: Path | None = None,
    batch_size: int = 250,
    device: str = "cpu",
) -> FeatureStatistics:
    """Feature statistics of a folder / ``.safetensors`` of images with ``features`` (``inception``
    or ``digits``): what ``stepsearch stats`` writes."""
    if features == "inception":
        extractor = _inception(inception_weights, device)
    elif features == "digits":
        from stepsearch.testbeds import digits

        extractor = digits.DigitsFeatureExtractor(digits.load_classifier(device=device))
    else:
        raise ValueError(f"--features must be 'inception' or 'digits', got {features!r}")
    if images.suffix == ".npz":
        raise ValueError(
            f"'{images}' is already statistics; pass images (a folder or .safetensors)"
        )
    return FeatureReference.load(extractor, images, batch_size=batch_size).statistics


def register(app: typer.Typer) -> None:
    """Add ``eval``, ``stats`` and ``demo`` to the ``stepsearch`` command."""

    @app.command("eval")
    def eval_command(
        model: Annotated[
            str, typer.Option(help="'digits' (bundled) or a local diffusers UNet2DModel directory.")
        ] = "digits",
        pipeline: Annotated[
            str | None,
            typer.Option(
                help="A local diffusers text-to-image pipeline directory (instead of --model)."
            ),
        ] = None,
        prompts: Annotated[
            Path | None,
            typer.Option(help="Text file, one prompt per line (with --pipeline; cycled)."),
        ] = None,
        schedules: Annotated[
            list[str], typer.Option(help="Spacing names or schedule JSON files.")
        ] = ["logsnr_uniform"],
        solvers: Annotated[list[str], typer.Option(help=f"Solvers: {', '.join(SOLVERS)}.")] = [
            "dpm_solver_pp_2m"
        ],
        baselines: Annotated[
            list[str], typer.Option(help="diffusers scheduler classes to run beside them.")
        ] = [],
        nfe: Annotated[list[int], typer.Option(help="Model-evaluation budgets.")] = [
            4,
            5,
            6,
            8,
            10,
        ],
        metric: Annotated[
            list[str] | None,
            typer.Option(
                help=f"Metrics: {', '.join(METRICS)} (--model); "
                f"{', '.join(TEXT_TO_IMAGE_METRICS)} (--pipeline). "
                "[default: fd, traj; with --pipeline: clip if --clip-model is given, else traj]"
            ),
        ] = None,
        clip_model: Annotated[
            Path | None, typer.Option(help="Local CLIP model directory (metric clip).")
        ] = None,
        inception_weights: Annotated[
            Path | None,
            typer.Option(help="inception-2015-12-05.pt (metrics fid, and kid with --pipeline)."),
        ] = None,
        reference_stats: Annotated[
            Path | None,
            typer.Option(
                help="Reference for fid / kid: an .npz from `stepsearch stats`, or a folder "
                "(or .safetensors) of reference images (kid needs images)."
            ),
        ] = None,
        guidance_scale: Annotated[
            float, typer.Option(help="Classifier-free guidance scale (with --pipeline).")
        ] = 7.5,
        num_samples: Annotated[int, typer.Option(help="Samples per cell.", min=2)] = 1000,
        seed: Annotated[int, typer.Option(help="Seed of the per-sample noise.")] = 0,
        out: Annotated[Path, typer.Option(help="Output directory.")] = Path("stepsearch-eval"),
        device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
        chunk_size: Annotated[
            int | None,
            typer.Option(help="Samples per model batch [default: 250; 16 with --pipeline].", min=1),
        ] = None,
        save_samples: Annotated[
            bool,
            typer.Option(help="Also write every cell's samples as safetensors under out/samples/."),
        ] = False,
    ) -> None:
        """Evaluate solvers x schedules (and diffusers baselines) at several NFEs: tables, plots, grids.

        Unconditional (--model) or text-to-image (--pipeline DIR --prompts FILE): image i always
        starts from the noise of its own seed (and gets prompt i mod #prompts), so every method
        sees the same noise. Multi-GPU / multi-process: ``accelerate launch -m stepsearch eval ...``
        splits the samples across processes; results do not depend on the number of processes.
        """
        try:
            if pipeline is not None and model != "digits":
                raise ValueError("pass either --model (unconditional) or --pipeline, not both")
            methods = _methods(schedules, solvers, baselines)
            inputs = EvalInputs(
                pipeline, prompts, clip_model, inception_weights, reference_stats, guidance_scale
            )
            kind = "model" if pipeline is None else "pipeline"
            if not metric:  # defaults: see the option's help
                metric = ["fd", "traj"] if pipeline is None else ["clip" if clip_model else "traj"]
            evaluate(
                model,
                methods,
                nfe,
                metric,
                num_samples,
                seed,
                out,
                device,
                chunk_size or DEFAULT_CHUNK_SIZE[kind],
                "stepsearch eval",
                save_samples,
                inputs,
            )
        except (ValueError, FileNotFoundError) as error:
            console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(2) from None

    @app.command("stats")
    def stats_command(
        images: Annotated[
            Path,
            typer.Argument(help="A folder of images (PNG, JPG, ...) or a .safetensors of images."),
        ],
        out: Annotated[Path, typer.Option(help="Where to write the statistics (.npz).")],
        features: Annotated[
            str, typer.Option(help="Feature extractor: inception (FID) or digits (FD-digits).")
        ] = "inception",
        inception_weights: Annotated[
            Path | None, typer.Option(help="inception-2015-12-05.pt (with --features inception).")
        ] = None,
        batch_size: Annotated[int, typer.Option(help="Images per feature batch.", min=1)] = 250,
        device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    ) -> None:
        """Reference statistics (feature mean and covariance, .npz) of real images, for
        ``stepsearch eval --metric fid --reference-stats``; written atomically."""
        try:
            if out.suffix != ".npz":
                raise ValueError(f"--out must end in .npz, got '{out}'")
            statistics = compute_statistics(images, features, inception_weights, batch_size, device)
            statistics.save(out)
        except (ValueError, FileNotFoundError) as error:
            console.print(f"[red]error:[/red] {escape(str(error))}")
            raise typer.Exit(2) from None
        console.print(
            f"wrote [bold]{out}[/]: {features} features ({statistics.num_features}) "
            f"of {statistics.n} images"
        )

    @app.command("demo")
    def demo_command(
        out: Annotated[Path, typer.Option(help="Output directory.")] = Path("stepsearch-demo"),
        num_samples: Annotated[int, typer.Option(help="Samples per cell.", min=2)] = 500,
        nfe: Annotated[list[int], typer.Option(help="Model-evaluation budgets.")] = [
            4,
            5,
            6,
            8,
            10,
        ],
        seed: Annotated[int, typer.Option(help="Seed of the per-sample noise.")] = 0,
        device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    ) -> None:
        """The main job on the bundled digits model: diffusers' DDIM, DPM-Solver++, UniPC and Euler
        with their spacings vs stepsearch solvers and schedules, FD-digits and trajectory error at
        NFE 4-10 (a few minutes on 2 CPU cores)."""
        evaluate(
            "digits",
            default_methods(),
            nfe,
            ["fd", "traj"],
            num_samples,
            seed,
            out,
            device,
            250,
            "stepsearch demo: bundled digits DDPM",
        )
