"""Compatibility module: text-to-image pipelines live in :mod:`stepsearch.models.pipeline`.

``TextToImageModel`` is :class:`~stepsearch.models.pipeline.PipelineModel` (same constructor);
the other names are re-exported unchanged. Kept while ``stepsearch.search.optimize``,
``stepsearch.ays.search`` and ``stepsearch.cli.search_olss`` import from here.
"""

from stepsearch.models.pipeline import (
    PipelineModel,
    generate_images,
    load_pipeline,
    native_image_size,
    read_prompts,
)

TextToImageModel = PipelineModel

__all__ = [
    "TextToImageModel",
    "generate_images",
    "load_pipeline",
    "native_image_size",
    "read_prompts",
]
