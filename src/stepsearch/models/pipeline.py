"""Text-to-image pipelines: one model class that runs the pipeline's own call and is a
:class:`~stepsearch.models.source.SampleSource` for stepsearch's solvers.

:class:`PipelineModel` is a local diffusers UNet pipeline (Stable Diffusion 1.x / 2.x, SDXL, or any
pipeline with the same call signature) with the prompts, guidance scale and image size of a run:

- **the pipeline's own loop** (:meth:`PipelineModel.sample_schedule`,
  :meth:`PipelineModel.sample_diffusers`, :func:`generate_images`): a stepsearch solver x schedule
  swaps in the solver's drop-in scheduler (:data:`~stepsearch.integrations.diffusers.SCHEDULERS`),
  built ``from_config`` of the pipeline's own scheduler config, and passes the schedule as
  k-diffusion ``sigmas`` (the whole grid, its end included, so the schedule is replayed exactly);
  a diffusers scheduler class runs with its own spacing. The pipeline's own scheduler is put back
  after each run; its progress bar is switched off.
- **a sample source** (the UNet called directly, conditioned on each sample's prompt, in the
  pipeline's latent space): ``noise`` is the discrete VP schedule of the pipeline's scheduler
  config; ``denoiser(indices)`` the UNet conditioned on prompt ``i mod len(prompts)`` (prompts
  encoded once by the pipeline's own ``encode_prompt``), with classifier-free guidance at
  ``guidance_scale`` against the negative prompt (diffusers' rule: guidance only above 1); SDXL's
  extra conditioning (pooled text embeddings and the size / crop ``time_ids``) is built as its
  pipeline builds it for an uncropped image of the requested size; ``sample_shape`` is one latent
  ``(C, H / f, W / f)``; ``decode`` the VAE decode, as float images in ``[-1, 1]`` (what
  ``pipe(output_type="pt")`` returns, rescaled), so samples from the same unit noise equal the
  pipeline's own images with the same solver; ``identity`` a SHA-256 over the weights of the UNet,
  the text encoders and the VAE.

NFE counts denoising-network evaluations per image; classifier-free guidance runs the conditional
and unconditional branches in one batched call, counted once (as everywhere in the literature).
A guidance schedule on the noise level (``guidance_schedule``,
:class:`~stepsearch.guidance.GuidanceSchedule`) replaces the scale: stepsearch's denoiser skips
the unconditional branch where its weight is 1, and the pipeline's own loop runs it through
:class:`~stepsearch.integrations.diffusers_guidance.GuidanceCallback`.

Common random numbers: image ``i`` starts from ``unit_noise`` of its own generator
(:func:`~stepsearch.models.batches.sample_generator` ``(seed, i)``) in the pipeline's latent shape
and gets prompt ``i mod len(prompts)``; so every method sees the same (noise, prompt) pairs and no
image depends on the batch size or the number of processes. Images are float tensors in
``[-1, 1]``.

:func:`encode_images` maps images to the latents the model integrates (the VAE posterior's mode,
shifted and scaled by the VAE config as the pipelines do it), e.g. the data of Align Your Steps'
KL upper bound. :func:`load_prompt_image_pairs` reads (prompt, image) pairs from a folder in the
Hugging Face ``imagefolder`` layout (``metadata.jsonl`` with ``file_name`` and ``text``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from stepsearch.cache import tensor_digest
from stepsearch.denoiser import Denoiser, ModelDenoiser
from stepsearch.guidance import GuidanceSchedule, guidance_settings
from stepsearch.integrations.diffusers import scheduler_for_solver
from stepsearch.integrations.diffusers_guidance import GuidanceCallback
from stepsearch.models.batches import generate_chunks, sample_generator, unit_noise
from stepsearch.models.source import ModelIdentity
from stepsearch.noise import DiscreteVP
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import Solver

if TYPE_CHECKING:
    from stepsearch.models.method import Method

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "PipelineModel",
    "PromptImagePairs",
    "encode_images",
    "generate_images",
    "load_pipeline",
    "load_prompt_image_pairs",
    "native_image_size",
    "pipeline_digest",
    "read_prompts",
]

DEFAULT_GUIDANCE_SCALE = 7.5
"""A text-to-image pipeline's classifier-free guidance scale when none is given (diffusers' own
default); the one place this number is written."""

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def pipeline_digest(pipeline: Any) -> str:
    """``sha256:<hex>`` over the state dicts of the pipeline's UNet, text encoders and VAE."""
    tensors: dict[str, Tensor] = {}
    for name in _COMPONENTS:
        module = getattr(pipeline, name, None)
        if isinstance(module, nn.Module):
            tensors.update({f"{name}.{key}": value for key, value in module.state_dict().items()})
    if not tensors:
        raise ValueError(f"{type(pipeline).__name__} has none of the components {_COMPONENTS}")
    return "sha256:" + tensor_digest(tensors)


def _latent_scaling(vae: Any) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE config (shift 0 when the config has none)."""
    config = vae.config
    shift = getattr(config, "shift_factor", None)
    return float(config.scaling_factor), float(shift or 0.0)


def encode_images(
    pipeline: Any, images: Tensor, *, batch_size: int = 16, progress: bool = False
) -> Tensor:
    """Latents of float images ``(N, 3, H, W)`` in ``[-1, 1]``: ``(mode(q(z | x)) - shift) *
    scale`` with the pipeline's VAE, in float32 on the CPU.

    Raises:
        ValueError: images of the wrong rank or channel count, or with NaN / Inf values.
    """
    from tqdm.auto import tqdm

    vae = pipeline.vae
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(
            f"images must be (N, {vae.config.in_channels}, H, W), got {tuple(images.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or Inf")
    scale, shift = _latent_scaling(vae)
    parameter = next(vae.parameters())
    latents = []
    for batch in tqdm(images.split(batch_size), desc="encoding images", disable=not progress):
        with torch.inference_mode():
            posterior = vae.encode(batch.to(parameter.device, parameter.dtype)).latent_dist
            latents.append(((posterior.mode() - shift) * scale).float().cpu())
    return torch.cat(latents)


@dataclass(frozen=True)
class PromptImagePairs:
    """(prompt, image) pairs: ``prompts[i]`` describes ``images[i]`` (float, ``[-1, 1]``)."""

    prompts: list[str]
    images: Tensor

    def __post_init__(self) -> None:
        if len(self.prompts) != self.images.shape[0] or not self.prompts:
            raise ValueError(
                f"need one prompt per image and at least one pair, got {len(self.prompts)} "
                f"prompts for {self.images.shape[0]} images"
            )


def load_prompt_image_pairs(
    folder: str | os.PathLike[str], size: tuple[int, int] | None = None
) -> PromptImagePairs:
    """Pairs from ``folder/metadata.jsonl`` (one JSON object per line with ``file_name``, relative
    to the folder, and ``text``: the Hugging Face ``imagefolder`` layout, as COCO captions are
    usually shipped), images read as RGB and resized to ``size = (height, width)`` (bicubic,
    antialiased) when given.

    Raises:
        FileNotFoundError: no ``metadata.jsonl`` or a listed image is missing.
        ValueError: a line is not a JSON object with a non-empty ``file_name`` and ``text``, or
            images of different sizes without ``size``.
    """
    from PIL import Image

    root = Path(folder)
    metadata = root / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(
            f"'{root}' has no metadata.jsonl: prompt-image data is a folder of images with a "
            'metadata.jsonl of lines {"file_name": "0001.png", "text": "a prompt"}'
        )
    prompts: list[str] = []
    images: list[Tensor] = []
    lines = metadata.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{metadata}:{number}: not JSON ({error.msg})") from None
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(key), str) and entry[key].strip() for key in ("file_name", "text")
        ):
            raise ValueError(f"{metadata}:{number}: need non-empty 'file_name' and 'text' strings")
        path = root / entry["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{metadata}:{number}: image '{path}' does not exist")
        with Image.open(path) as opened:
            image = opened.convert("RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32)
        images.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0)
        prompts.append(entry["text"].strip())
    if not images:
        raise ValueError(f"{metadata} lists no image")
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)}: pass size=(height, width)")
    return PromptImagePairs(prompts, torch.stack(images))


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
class _Embeddings:
    """One prompt's encoder outputs (conditional, and unconditional when guided)."""

    text: Tensor
    negative: Tensor | None
    pooled: Tensor | None = None
    negative_pooled: Tensor | None = None


@dataclass(eq=False)
class PipelineModel:
    """A UNet text-to-image pipeline with the prompts and call options of a run: runs the
    pipeline's own loop and is a sample source (module docstring).

    Args:
        pipeline: the diffusers pipeline (see :func:`load_pipeline`).
        prompts: sample ``i`` gets prompt ``i mod len(prompts)``.
        guidance_scale: classifier-free guidance (applied above 1, as diffusers does).
        height, width: image size (default: the UNet's native size).
        name: the display name of the model identity.
        negative_prompt: the unconditional branch's prompt (diffusers' default: empty).
        reference_data: real images in ``[-1, 1]`` (decoded space), optional.
        features: a feature network for ``fd`` / ``kid``, optional.
        guidance_schedule: a guidance weight per noise level, used instead of
            ``guidance_scale`` when set.

    ``scheduler_config`` is the pipeline's scheduler config when the model is made: every method
    builds its scheduler from it.
    """

    pipeline: Any
    prompts: list[str]
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    height: int | None = None
    width: int | None = None
    name: str = "pipeline"
    negative_prompt: str = ""
    reference_data: Tensor | None = None
    features: nn.Module | None = None
    guidance_schedule: GuidanceSchedule | None = None
    scheduler_config: dict[str, Any] = field(init=False)
    _embeddings: dict[str, _Embeddings] = field(default_factory=dict, init=False, repr=False)
    _identity: ModelIdentity | None = field(default=None, init=False, repr=False)

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

    def with_options(self, **changes: Any) -> PipelineModel:
        """The same pipeline with other prompts, guidance, size, name, negative prompt, ..."""
        return replace(self, **changes)

    def check_denoiser(self) -> None:
        """Raise unless the UNet's conditioning is one :meth:`denoiser` builds (SD 1.x / 2.x,
        SDXL base; not the SDXL refiner's aesthetic-score conditioning)."""
        unet = self.pipeline.unet
        addition = getattr(unet.config, "addition_embed_type", None)
        if addition not in (None, "text_time"):
            raise ValueError(f"UNet addition_embed_type {addition!r} is not supported")
        if addition == "text_time" and getattr(
            self.pipeline.config, "requires_aesthetics_score", False
        ):
            raise ValueError(
                "SDXL refiner pipelines (aesthetic-score conditioning) are not supported"
            )

    @property
    def conditional(self) -> bool:
        """A pipeline is conditioned on prompts."""
        return True

    # the pipeline ----------------------------------------------------------------------------
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

    def drop_in_scheduler(self, method: Method) -> Any:
        """``method``'s stepsearch solver as a drop-in scheduler on this pipeline's config."""
        options = {"solver_kwargs": dict(method.solver_options)} if method.solver_options else {}
        return scheduler_for_solver(str(method.solver)).from_config(
            self.scheduler_config, **options
        )

    def solver_for(self, method: Method) -> Solver:
        """The solver of ``method``'s drop-in scheduler on this pipeline's config."""
        return self.drop_in_scheduler(method).solver

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
            self.drop_in_scheduler(method),
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

    # SampleSource ----------------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        if self._identity is None:
            self._identity = ModelIdentity(self.name, pipeline_digest(self.pipeline))
        return self._identity

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.latent_shape)

    @property
    def device(self) -> torch.device:
        return torch.device(self.pipeline.device)

    @property
    def dtype(self) -> torch.dtype:
        """Latents and solver maths are float32 whatever the UNet runs in (``--dtype``): the
        denoiser casts the latents to the UNet's dtype and its output back."""
        return torch.float32

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (diffusers: ``guidance_scale > 1``; a guidance
        schedule: always encoded, skipped per step where its weight is 1)."""
        return self.guidance_schedule is not None or self.guidance_scale > 1.0

    def denoiser(self, indices: Sequence[int]) -> Denoiser:
        """The (guided) UNet for the prompts of ``indices``."""
        self.check_denoiser()
        embeddings = [self._encoded(prompt) for prompt in self.prompts_for(list(indices))]
        conditional = self._network(embeddings, negative=False)
        unconditional = self._network(embeddings, negative=True) if self.guided else None
        return ModelDenoiser(
            conditional,
            self.noise,
            self.prediction_type,
            unconditional=unconditional,
            guidance=(
                self.guidance_schedule
                if self.guidance_schedule is not None
                else float(self.guidance_scale)
            ),
        )

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> float images in ``[-1, 1]`` (the VAE decode the pipeline does)."""
        vae = self.pipeline.vae
        scale, shift = _latent_scaling(vae)
        with torch.inference_mode():
            images = vae.decode((x / scale + shift).to(vae.dtype)).sample
        return images.float().clamp(-1.0, 1.0)

    def describe(self) -> dict[str, Any]:
        height, width = self.image_size
        prompts = json.dumps(self.prompts, ensure_ascii=False)
        return {
            "kind": "text_to_image_pipeline",
            "pipeline": type(self.pipeline).__name__,
            "prediction_type": self.prediction_type,
            "guidance_scale": float(self.guidance_scale),
            **guidance_settings(self.guidance_schedule),
            "negative_prompt": self.negative_prompt,
            "height": height,
            "width": width,
            "num_prompts": len(self.prompts),
            "prompts": "sha256:" + hashlib.sha256(prompts.encode("utf-8")).hexdigest(),
            "sample_shape": list(self.sample_shape),
            **self._network_dtype(),
        }

    def _network_dtype(self) -> dict[str, str]:
        """``{"network_dtype": ...}`` unless the UNet runs in float32 (keys stay as they were)."""
        dtype = self.pipeline.unet.dtype
        return (
            {} if dtype == torch.float32 else {"network_dtype": str(dtype).removeprefix("torch.")}
        )

    # conditioning ----------------------------------------------------------------------------
    def _encoded(self, prompt: str) -> _Embeddings:
        if prompt not in self._embeddings:
            pipe = self.pipeline
            with torch.inference_mode():
                outputs = pipe.encode_prompt(
                    prompt=prompt,
                    device=pipe.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=self.guided,
                    # None, not "": SDXL then zeroes the negative embeddings as its pipeline does
                    negative_prompt=(self.negative_prompt or None) if self.guided else None,
                )
            if len(outputs) == 4:  # SDXL: (text, negative, pooled, negative pooled)
                self._embeddings[prompt] = _Embeddings(*outputs)
            else:
                self._embeddings[prompt] = _Embeddings(outputs[0], outputs[1])
        return self._embeddings[prompt]

    def _time_ids(self, batch: int, dtype: torch.dtype) -> Tensor:
        """SDXL's ``(original size, crop top-left, target size)`` for an uncropped image."""
        height, width = self.image_size
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
        return ids.to(self.device).expand(batch, -1)

    def _network(self, embeddings: list[_Embeddings], *, negative: bool) -> Any:
        unet = self.pipeline.unet
        text = torch.cat([e.negative if negative else e.text for e in embeddings])
        extra: dict[str, Any] = {}
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            pooled = torch.cat([e.negative_pooled if negative else e.pooled for e in embeddings])
            extra["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": self._time_ids(pooled.shape[0], pooled.dtype),
            }

        def network(x: Tensor, model_time: Tensor) -> Tensor:
            if x.shape[0] != text.shape[0]:
                raise ValueError(f"a batch of {x.shape[0]} for {text.shape[0]} prompts")
            output = unet(
                x.to(unet.dtype),
                model_time.to(x.device),
                encoder_hidden_states=text,
                return_dict=False,
                **extra,
            )[0]
            return output.to(x.dtype)

        return network


def generate_images(
    model: PipelineModel,
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

    def guidance_options() -> dict[str, Any]:
        if model.guidance_schedule is None:
            return {"guidance_scale": model.guidance_scale}
        options = GuidanceCallback(model.guidance_schedule, pipe).call_options(**steps)
        return {key: value for key, value in options.items() if key not in steps}

    def make_chunk(indices: range) -> Tensor:
        latents = unit_noise(indices, model.latent_shape, seed)
        with torch.inference_mode():
            output = pipe(
                prompt=model.prompts_for(indices),
                height=height,
                width=width,
                **guidance_options(),
                latents=latents.to(pipe.device, pipe.unet.dtype),
                generator=sample_generator(seed + 1, indices.start),
                output_type="pt",
                **steps,
            )
        images = torch.as_tensor(output.images)
        return (images.float() * 2.0 - 1.0).clamp(-1.0, 1.0).cpu()

    with model.using(scheduler):
        return generate_chunks(make_chunk, num_samples, chunk_size, accelerator, progress)
