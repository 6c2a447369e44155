"""A diffusers text-to-image pipeline as a :class:`~stepsearch.models.source.SampleSource`.

:class:`PipelineSource` lets the searches call a pipeline's denoising network directly, conditioned
on each sample's prompt, in the pipeline's latent space:

- ``noise``: the discrete VP schedule of the pipeline's scheduler config; ``prediction_type`` from
  the same config;
- ``denoiser(indices)``: the UNet conditioned on prompt ``i mod len(prompts)`` for each index ``i``
  (prompts encoded once by the pipeline's own ``encode_prompt``), with classifier-free guidance at
  ``guidance_scale`` against the negative prompt (diffusers' rule: guidance only above 1). SDXL's
  extra conditioning (pooled text embeddings and the size / crop ``time_ids``) is built as its
  pipeline builds it for an uncropped image of the requested size;
- ``sample_shape``: one latent ``(C, H / f, W / f)``; ``decode``: the VAE decode, as float images in
  ``[-1, 1]`` (what ``pipe(output_type="pt")`` returns, rescaled); so samples of this source from the
  same unit noise equal the pipeline's own images with the same solver;
- ``identity``: a SHA-256 over the weights of the UNet, the text encoders and the VAE.

:func:`encode_images` maps images to the latents this source integrates (the VAE posterior's mode,
shifted and scaled by the VAE config as the pipelines do it), e.g. the data of Align Your Steps'
KL upper bound. :func:`load_prompt_image_pairs` reads (prompt, image) pairs from a folder in the
Hugging Face ``imagefolder`` layout (``metadata.jsonl`` with ``file_name`` and ``text``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stepsearch.cache import tensor_digest
from stepsearch.denoiser import Denoiser, ModelDenoiser
from stepsearch.models.source import ModelIdentity
from stepsearch.models.text_to_image import TextToImageModel
from stepsearch.noise import DiscreteVP

__all__ = [
    "PipelineSource",
    "PromptImagePairs",
    "encode_images",
    "load_prompt_image_pairs",
    "pipeline_digest",
]

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


@dataclass
class _Embeddings:
    """One prompt's encoder outputs (conditional, and unconditional when guided)."""

    text: Tensor
    negative: Tensor | None
    pooled: Tensor | None = None
    negative_pooled: Tensor | None = None


@dataclass(eq=False)
class PipelineSource:
    """A UNet text-to-image pipeline (Stable Diffusion 1.x / 2.x, SDXL) as a sample source
    (module docstring).

    Args:
        model: the pipeline with its prompts, guidance scale and image size.
        negative_prompt: the unconditional branch's prompt (diffusers' default: empty).
        reference_data: real images in ``[-1, 1]`` (decoded space), optional.
        name: the display name of the model identity.
    """

    model: TextToImageModel
    negative_prompt: str = ""
    reference_data: Tensor | None = None
    name: str = "pipeline"
    features: nn.Module | None = None
    _embeddings: dict[str, _Embeddings] = field(default_factory=dict, init=False, repr=False)
    _identity: ModelIdentity | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        unet = self.model.pipeline.unet
        addition = getattr(unet.config, "addition_embed_type", None)
        if addition not in (None, "text_time"):
            raise ValueError(f"UNet addition_embed_type {addition!r} is not supported")
        if addition == "text_time" and getattr(
            self.model.pipeline.config, "requires_aesthetics_score", False
        ):
            raise ValueError(
                "SDXL refiner pipelines (aesthetic-score conditioning) are not supported"
            )

    # SampleSource ----------------------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity:
        if self._identity is None:
            self._identity = ModelIdentity(self.name, pipeline_digest(self.model.pipeline))
        return self._identity

    @property
    def noise(self) -> DiscreteVP:
        return self.model.noise

    @property
    def prediction_type(self) -> str:
        return str(self.model.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.model.latent_shape)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.pipeline.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pipeline.unet.dtype

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (diffusers: ``guidance_scale > 1``)."""
        return self.model.guidance_scale > 1.0

    def denoiser(self, indices: Sequence[int]) -> Denoiser:
        """The (guided) UNet for the prompts of ``indices``."""
        embeddings = [self._encoded(prompt) for prompt in self.model.prompts_for(list(indices))]
        conditional = self._network(embeddings, negative=False)
        unconditional = self._network(embeddings, negative=True) if self.guided else None
        return ModelDenoiser(
            conditional,
            self.noise,
            self.prediction_type,
            unconditional=unconditional,
            guidance=float(self.model.guidance_scale),
        )

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> float images in ``[-1, 1]`` (the VAE decode the pipeline does)."""
        vae = self.model.pipeline.vae
        scale, shift = _latent_scaling(vae)
        with torch.inference_mode():
            images = vae.decode((x / scale + shift).to(vae.dtype)).sample
        return images.float().clamp(-1.0, 1.0)

    def describe(self) -> dict[str, Any]:
        height, width = self.model.image_size
        prompts = json.dumps(self.model.prompts, ensure_ascii=False)
        return {
            "kind": "text_to_image_pipeline",
            "pipeline": type(self.model.pipeline).__name__,
            "prediction_type": self.prediction_type,
            "guidance_scale": float(self.model.guidance_scale),
            "negative_prompt": self.negative_prompt,
            "height": height,
            "width": width,
            "num_prompts": len(self.model.prompts),
            "prompts": "sha256:" + hashlib.sha256(prompts.encode("utf-8")).hexdigest(),
            "sample_shape": list(self.sample_shape),
        }

    # conditioning ----------------------------------------------------------------------------
    def _encoded(self, prompt: str) -> _Embeddings:
        if prompt not in self._embeddings:
            pipe = self.model.pipeline
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
        height, width = self.model.image_size
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
        return ids.to(self.device).expand(batch, -1)

    def _network(self, embeddings: list[_Embeddings], *, negative: bool) -> Any:
        unet = self.model.pipeline.unet
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
