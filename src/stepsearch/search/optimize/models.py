"""The model of an optimize run: a bundled model, a local UNet directory, a text-to-image
pipeline (with its prompts and guidance scale) or any sample source."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepsearch.models import ImageModel, load_image_model
from stepsearch.models.pipeline import PipelineSource
from stepsearch.models.source import ClassConditionalSource, SampleSource
from stepsearch.models.text_to_image import (
    TextToImageModel,
    load_pipeline,
    read_prompts,
)
from stepsearch.search.optimize.settings import Model


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


def _is_conditional(source: SampleSource) -> bool:
    """A pipeline (prompts) or a class-conditional model (labels), both guided."""
    return isinstance(source, (PipelineSource, ClassConditionalSource))
