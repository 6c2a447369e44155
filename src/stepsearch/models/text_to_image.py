"""Side-by-side evaluation of samplers inside a local diffusers text-to-image pipeline.

:class:`TextToImageModel` is what the one harness, :func:`~stepsearch.eval.experiment.run_experiment`,
runs methods on for a pipeline (as :class:`~stepsearch.eval.experiment.ImageModel` is for an
unconditional model).

The same :class:`~stepsearch.eval.experiment.Method` s as the unconditional evaluation, run through
``pipe(prompt=..., latents=..., sigmas=...)`` of a UNet-based pipeline (Stable Diffusion 1.x / 2.x,
SDXL, or any pipeline with the same call signature):

- a stepsearch solver x schedule swaps in the solver's drop-in scheduler
  (:data:`~stepsearch.integrations.diffusers.SCHEDULERS`), built ``from_config`` of the pipeline's
  own scheduler config, and passes the schedule as k-diffusion ``sigmas`` (the whole grid, its end
  included, so the schedule is replayed exactly); a saved schedule is resampled log-linearly to the
  step count that spends exactly the NFE;
- a diffusers scheduler class is built ``from_config`` (with the method's options) and run with its
  own spacing at the step count whose ``timesteps`` have exactly NFE entries.

NFE counts denoising-network evaluations per image; classifier-free guidance runs the conditional
and unconditional branches in one batched call, counted once (as everywhere in the literature).

Common random numbers: image ``i`` starts from ``unit_noise`` of its own generator
(:func:`~stepsearch.models.batches.sample_generator` ``(seed, i)``) in the pipeline's latent shape,
passed as ``latents=``, and gets prompt ``i mod len(prompts)``; so every method sees the same
(noise, prompt) pairs and no image depends on the batch size or the number of processes. Images are
returned as float tensors in ``[-1, 1]`` (the pipeline's ``output_type="pt"`` output, rescaled).

Metrics (:data:`TEXT_TO_IMAGE_METRICS`): ``clip`` (CLIP score, higher is better), ``fid`` / ``kid``
(Inception features against a :class:`~stepsearch.eval.experiment.FeatureReference`), ``traj``
(median RMS error of the decoded images to a many-step reference solution of the same pipeline,
same noise, same prompts, same guidance).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stepsearch.models.batches import generate_chunks, sample_generator, unit_noise
from stepsearch.models.method import Method
from stepsearch.noise import DiscreteVP
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import Solver

__all__ = [
    "TextToImageModel",
    "generate_images",
    "load_pipeline",
    "native_image_size",
    "read_prompts",
]


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines are ignored, surrounding
    whitespace stripped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file '{path}' does not exist (--prompts)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise ValueError(f"prompts file '{path}' is empty: give one prompt per line (--prompts)")
    return prompts


def native_image_size(pipeline: Any) -> tuple[int, int]:
    """``(height, width)`` a UNet pipeline makes by default: the UNet's sample size times the VAE
    scale factor."""
    size = pipeline.unet.config.sample_size
    native = (size, size) if isinstance(size, int) else tuple(size)
    return (int(native[0]) * pipeline.vae_scale_factor, int(native[1]) * pipeline.vae_scale_factor)


def load_pipeline(
    source: str | os.PathLike[str] | Any,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    *,
    keep_safety_checker: bool = False,
) -> Any:
    """A diffusers pipeline from a local directory (``save_pretrained`` output with
    ``model_index.json``; never looked up on the hub), moved to ``device``; a pipeline object is
    returned as it is. The safety checker is not loaded unless ``keep_safety_checker``: it blacks
    out images, which would distort every metric.

    Raises:
        FileNotFoundError: the directory or its ``model_index.json`` does not exist.
    """
    if not isinstance(source, str | os.PathLike):
        return source
    from diffusers import DiffusionPipeline

    root = Path(source)
    if not (root / "model_index.json").is_file():
        what = "has no model_index.json" if root.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"pipeline directory '{root}' {what} (--pipeline expects a local diffusers pipeline "
            "saved with save_pretrained, e.g. a downloaded Stable Diffusion folder)"
        )
    components = json.loads((root / "model_index.json").read_text())
    options: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        options["torch_dtype"] = torch_dtype
    if "safety_checker" in components and not keep_safety_checker:
        options["safety_checker"] = None
    return DiffusionPipeline.from_pretrained(root, **options).to(device)


@dataclass
class TextToImageModel:
    """A text-to-image pipeline with the prompts and call options of an evaluation.

    ``scheduler_config`` is the pipeline's scheduler config when the model is made: every method
    builds its scheduler from it, and the pipeline's own scheduler is put back after each run. The
    pipeline's progress bar is switched off (the evaluation shows its own).
    """

    pipeline: Any
    prompts: list[str]
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    name: str = "pipeline"
    scheduler_config: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.prompts = [str(prompt) for prompt in self.prompts]
        if not self.prompts:
            raise ValueError("need at least one prompt")
        if getattr(self.pipeline, "unet", None) is None:
            raise ValueError(
                f"{type(self.pipeline).__name__}: only UNet-based pipelines (Stable Diffusion "
                "1.x / 2.x, SDXL) are supported"
            )
        parameters = inspect.signature(self.pipeline.__call__).parameters
        missing = [name for name in ("prompt", "latents", "sigmas") if name not in parameters]
        if missing:
            raise ValueError(f"{type(self.pipeline).__name__}.__call__ lacks {missing}")
        self.scheduler_config = dict(self.pipeline.scheduler.config)
        self.pipeline.set_progress_bar_config(disable=True)

    @property
    def noise(self) -> DiscreteVP:
        """The discrete VP noise schedule of the pipeline's scheduler config."""
        config = self.scheduler_config
        if "beta_schedule" not in config and "trained_betas" not in config:
            raise ValueError(
                "stepsearch schedules in a pipeline need a discrete VP scheduler config "
                "(beta_schedule / trained_betas); flow-matching pipelines can run diffusers "
                "baselines only"
            )
        return DiscreteVP.from_diffusers_config(config)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the generated images (default: the UNet's native size)."""
        native = native_image_size(self.pipeline)
        return (self.height or native[0], self.width or native[1])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image's initial latent noise."""
        height, width = self.image_size
        factor = self.pipeline.vae_scale_factor
        return (self.pipeline.unet.config.in_channels, height // factor, width // factor)

    def prompts_for(self, indices: Sequence[int]) -> list[str]:
        """Prompt ``i mod len(prompts)`` for each sample index ``i``."""
        return [self.prompts[i % len(self.prompts)] for i in indices]

    def solver_for(self, method: Method) -> Solver:
        """The solver of ``method``'s drop-in scheduler on this pipeline's config."""
        return _stepsearch_scheduler(self, method).solver

    def sample_schedule(
        self,
        method: Method,
        schedule: StepSchedule,
        num_samples: int,
        seed: int,
        accelerator: Any | None,
        chunk_size: int,
        progress: bool | str = True,
    ) -> Tensor:
        """Images along ``schedule``: ``method``'s drop-in scheduler, passed the whole grid as
        k-diffusion ``sigmas`` (its end included, so the schedule is replayed exactly)."""
        return generate_images(
            self,
            _stepsearch_scheduler(self, method),
            num_samples,
            sigmas=schedule.to_kdiffusion_sigmas().tolist(),
            seed=seed,
            chunk_size=chunk_size,
            accelerator=accelerator,
            progress=progress,
        )

    def sample_diffusers(
        self,
        scheduler: Any,
        num_steps: int,
        num_samples: int,
        seed: int,
        accelerator: Any | None,
        chunk_size: int,
        progress: bool | str = True,
    ) -> Tensor:
        """Images with a diffusers ``scheduler`` and its own spacing at ``num_steps`` steps."""
        return generate_images(
            self,
            scheduler,
            num_samples,
            num_inference_steps=num_steps,
            seed=seed,
            chunk_size=chunk_size,
            accelerator=accelerator,
            progress=progress,
        )

    @contextlib.contextmanager
    def using(self, scheduler: Any) -> Iterator[None]:
        """Run the pipeline with ``scheduler``, putting the pipeline's own one back afterwards."""
        original = self.pipeline.scheduler
        self.pipeline.scheduler = scheduler
        try:
            yield
        finally:
            self.pipeline.scheduler = original


def generate_images(
    model: TextToImageModel,
    scheduler: Any,
    num_samples: int,
    *,
    num_inference_steps: int | None = None,
    sigmas: Sequence[float] | None = None,
    seed: int = 0,
    chunk_size: int = 16,
    accelerator: Any | None = None,
    progress: bool | str = True,
) -> Tensor:
    """``num_samples`` images (float ``(N, 3, H, W)`` in ``[-1, 1]``) from ``model``'s pipeline
    with ``scheduler`` and either ``num_inference_steps`` or k-diffusion ``sigmas``.

    Image ``i`` starts from the unit latent noise of ``sample_generator(seed, i)`` and gets prompt
    ``i mod len(prompts)``; stochastic schedulers draw their step noise from a per-chunk generator
    (``sample_generator(seed + 1, first index)``). Chunks are split across processes like
    :func:`~stepsearch.models.batches.generate_chunks`.
    """
    if (num_inference_steps is None) == (sigmas is None):
        raise ValueError("pass exactly one of num_inference_steps or sigmas")
    pipe = model.pipeline
    height, width = model.image_size
    steps: dict[str, Any] = {"num_inference_steps": num_inference_steps}
    if sigmas is not None:
        steps = {"sigmas": [float(sigma) for sigma in sigmas]}

    def make_chunk(indices: range) -> Tensor:
        latents = unit_noise(indices, model.latent_shape, seed)
        with torch.inference_mode():
            output = pipe(
                prompt=model.prompts_for(indices),
                height=height,
                width=width,
                guidance_scale=model.guidance_scale,
                latents=latents.to(pipe.device, pipe.unet.dtype),
                generator=sample_generator(seed + 1, indices.start),
                output_type="pt",
                **steps,
            )
        images = torch.as_tensor(output.images)
        return (images.float() * 2.0 - 1.0).clamp(-1.0, 1.0).cpu()

    with model.using(scheduler):
        return generate_chunks(make_chunk, num_samples, chunk_size, accelerator, progress)


def _stepsearch_scheduler(model: TextToImageModel, method: Method) -> Any:
    from stepsearch.integrations.diffusers import scheduler_for_solver

    options = {"solver_kwargs": dict(method.solver_options)} if method.solver_options else {}
    return scheduler_for_solver(str(method.solver)).from_config(model.scheduler_config, **options)
