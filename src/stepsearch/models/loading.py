"""Every model is loaded here: the bundled digits models, local diffusers ``UNet2DModel``
directories and local text-to-image pipelines (:func:`load_model`); :func:`load_image_model` and
:func:`load_source` are its entry points for image models. What is loaded is a sample source that
also runs diffusers' own loop (:class:`~stepsearch.models.image_model.ImageModel`,
:class:`~stepsearch.models.pipeline.PipelineModel`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stepsearch.models.image_model import ImageModel
from stepsearch.models.pipeline import (
    DEFAULT_GUIDANCE_SCALE,
    PipelineModel,
    load_pipeline,
    read_prompts,
)
from stepsearch.noise import DiscreteVP, NoiseSchedule
from stepsearch.testbeds import digits

__all__ = [
    "MODEL_DTYPES",
    "load_image_model",
    "load_model",
    "load_source",
    "model_dtype",
    "model_noise",
    "model_scheduler_config",
    "pipeline_guidance_scale",
]

MODEL_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The dtypes a model may run in (``--dtype``): its weights and activations. Samples and solver
maths stay float32 (float64 for the test beds) whatever the model runs in: the network's input is
cast to its dtype and its output back."""


def model_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (or a torch dtype); ``None`` is float32.

    Raises:
        ValueError: anything but float32, float16, bfloat16.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in MODEL_DTYPES.values():
            raise ValueError(f"--dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    return MODEL_DTYPES[dtype]


def pipeline_guidance_scale(guidance_scale: float | None) -> float:
    """A pipeline's guidance scale: as given (finite, >= 0), else :data:`DEFAULT_GUIDANCE_SCALE`."""
    scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else float(guidance_scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"--guidance-scale must be a finite number >= 0, got {guidance_scale!r}")
    return scale


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    pipeline: str | os.PathLike[str] | Any | None = None,
    prompts: Sequence[str] | str | os.PathLike[str] | None = None,
    guidance_scale: float | None = None,
    device: str | torch.device = "cpu",
    features: nn.Module | None = None,
    name: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
) -> ImageModel | PipelineModel:
    """The one model loader.

    - ``spec``: a bundled model name (``digits``, ``digits-flow``, ``digits-cond``) or a local
      diffusers ``UNet2DModel`` directory (see :func:`load_image_model`);
    - ``pipeline``: a local text-to-image pipeline directory (``model_index.json``, never looked up
      on the hub, see :func:`~stepsearch.models.pipeline.load_pipeline`) or a pipeline object,
      with ``prompts`` (a list, or a file of one prompt per line) and ``guidance_scale``
      (default :data:`~stepsearch.models.pipeline.DEFAULT_GUIDANCE_SCALE`); named after the
      directory unless ``name`` is given;
    - ``torch_dtype``: what the network runs in (:data:`MODEL_DTYPES`, default float32); samples
      and solver maths stay float32.

    Raises:
        ValueError: neither or both of ``spec`` and ``pipeline``; a pipeline without prompts; a
            non-finite or negative guidance scale; guidance for an unconditional model; an
            unknown dtype.
        FileNotFoundError: a missing model directory, pipeline directory or prompts file.
    """
    if (spec is None) == (pipeline is None):
        raise ValueError("give a model (--model) or a text-to-image pipeline (--pipeline)")
    dtype = model_dtype(torch_dtype)
    if pipeline is None:
        assert spec is not None
        return load_image_model(
            str(spec), device, features=features, guidance_scale=guidance_scale, dtype=dtype
        )
    if prompts is None:
        raise ValueError("--pipeline needs --prompts FILE (one prompt per line)")
    if isinstance(prompts, str | os.PathLike):
        prompts = read_prompts(prompts)
    scale = pipeline_guidance_scale(guidance_scale)
    if name is None:
        name = Path(pipeline).name if isinstance(pipeline, str | os.PathLike) else "pipeline"
    loaded = load_pipeline(
        pipeline, device=device, torch_dtype=None if torch_dtype is None else dtype
    )
    return PipelineModel(loaded, list(prompts), scale, name=name)


def _model_directory_files(spec: str) -> tuple[Path, Path]:
    """The UNet directory and the scheduler config file of a local diffusers model directory."""
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(
            f"model {spec!r}: expected a bundled model {sorted(digits.MODELS)} or a local "
            "diffusers model directory"
        )
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    config_path = next(
        (
            p
            for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json")
            if p.is_file()
        ),
        None,
    )
    if config_path is None:
        raise FileNotFoundError(f"{spec}: no scheduler_config.json at its root or in scheduler/")
    return unet_dir, config_path


def model_noise(spec: str) -> NoiseSchedule:
    """The noise schedule of ``spec`` (a bundled model name or a local diffusers model directory,
    as for :func:`load_image_model`), read from its scheduler config: what a schedule file for
    that model must be made on."""
    if spec in digits.MODELS:
        return digits.load(spec).noise
    _, config_path = _model_directory_files(spec)
    return DiscreteVP.from_diffusers_config(json.loads(config_path.read_text()))


def model_scheduler_config(spec: str) -> dict[str, Any]:
    """The diffusers scheduler config of ``spec`` (a bundled model name or a local diffusers model
    directory), its ``_class_name`` included where known, read without loading the network: what a
    drop-in scheduler for the model needs (prediction type, betas, clipping, ...)."""
    if spec in digits.MODELS:
        record = digits.checkpoint_record(spec)
        config = dict(record["scheduler_config"])
        config.setdefault("_class_name", str(record.get("scheduler_class", "DDPMScheduler")))
        return config
    _, config_path = _model_directory_files(spec)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: a scheduler config must be a JSON object")
    return config


def load_image_model(
    spec: str,
    device: str | torch.device = "cpu",
    features: nn.Module | None = None,
    guidance_scale: float | None = None,
    dtype: str | torch.dtype | None = None,
) -> ImageModel:
    """A bundled model by name (:data:`stepsearch.testbeds.digits.MODELS`: ``digits``,
    ``digits-flow``, ``digits-cond``; FD-digits features, the real digits, the classifier), or a
    local diffusers directory holding an unconditional ``UNet2DModel`` (at its root or in
    ``unet/``) and a scheduler config (``scheduler_config.json`` at the root or in
    ``scheduler/``), with ``features`` (e.g. Inception features) as its feature network.

    ``digits-cond`` is class-conditional: sample ``i`` gets digit ``i mod 10``, guided with
    ``guidance_scale`` (default :data:`~stepsearch.testbeds.digits.GUIDANCE_SCALE`, 2); its
    reference images are the real digits ordered so that row ``j`` is a ``j mod 10`` (174 of each
    digit). ``guidance_scale`` for an unconditional model is a ``ValueError``. The UNet runs in
    ``dtype`` (:data:`MODEL_DTYPES`, default float32); the feature and classifier networks and
    the samples stay float32."""
    device = torch.device(device)
    unet_dtype = model_dtype(dtype)
    if spec in digits.MODELS:
        bundle = digits.load(spec, device=device, dtype=unet_dtype)
        classifier = digits.load_classifier(device=device)
        conditional = digits.MODELS[spec].conditional
        if guidance_scale is not None and not conditional:
            raise ValueError(
                f"--guidance-scale: model {spec!r} is unconditional; guidance needs a "
                "class-conditional model (--model digits-cond)"
            )
        real = digits.real_images()
        return ImageModel(
            name=spec,
            unet=bundle.unet,
            scheduler_config=dict(bundle.scheduler_config),
            sample_shape=digits.IMAGE_SHAPE,
            feature_extractor=digits.DigitsFeatureExtractor(classifier),
            reference_images=real[digits.label_cycle_indices()] if conditional else real,
            device=device,
            noise_schedule=bundle.noise,
            prediction=bundle.prediction_type,
            num_classes=digits.NUM_CLASSES if conditional else None,
            null_label=digits.NULL_LABEL if conditional else None,
            guidance_scale=(
                (digits.GUIDANCE_SCALE if guidance_scale is None else float(guidance_scale))
                if conditional
                else 1.0
            ),
            classifier=classifier,
        )
    if guidance_scale is not None:
        raise ValueError(
            f"--guidance-scale: {spec} is an unconditional model directory; guidance needs a "
            "class-conditional model (--model digits-cond)"
        )
    from diffusers import UNet2DModel

    root = Path(spec)
    unet_dir, config_path = _model_directory_files(spec)
    unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=unet_dtype)
    unet = unet.to(device).eval().requires_grad_(False)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    extractor = None if features is None else features.to(device)
    return ImageModel(
        name=root.name,
        unet=unet,
        scheduler_config=json.loads(config_path.read_text()),
        sample_shape=(unet.config.in_channels, *size),
        feature_extractor=extractor,
        device=device,
    )


def load_source(
    spec: str,
    device: str | torch.device = "cpu",
    guidance_scale: float | None = None,
    dtype: str | torch.dtype | None = None,
) -> ImageModel:
    """The model of a spec as a sample source: a bundled model (``digits``, ``digits-flow``,
    ``digits-cond`` with its ``guidance_scale``) or a local diffusers ``UNet2DModel`` directory
    (see :func:`load_image_model`; an :class:`ImageModel` is a sample source), its UNet in
    ``dtype``."""
    return load_image_model(spec, device=device, guidance_scale=guidance_scale, dtype=dtype)
