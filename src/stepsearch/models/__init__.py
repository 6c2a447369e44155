"""Everything that can be sampled, behind one protocol (:class:`SampleSource`).

- :mod:`~stepsearch.models.source`: the protocol, sources from a denoiser or a class-conditional
  model, model identities (weights digests) and the one loop over chunks of sample indices
  (:func:`generate_from_source`, common random numbers);
- :mod:`~stepsearch.models.image_model`: the bundled digits models and local ``UNet2DModel``
  directories, loaded in one place (:func:`load_image_model`, :func:`load_source`);
- :mod:`~stepsearch.models.text_to_image` and :mod:`~stepsearch.models.pipeline`: local
  text-to-image pipelines (SD 1.x / 2.x, SDXL) driven by the drop-in scheduler or as a source;
- :mod:`~stepsearch.models.method`: samplers as data (:class:`Method`) and the built-in line-up;
- :mod:`~stepsearch.models.batches`: per-sample noise streams and chunking across processes.

This package knows nothing of scoring (:mod:`stepsearch.eval`) or searching
(:mod:`stepsearch.search`).
"""

from stepsearch.models.batches import (
    chunks_for_process,
    generate_chunks,
    generate_with_diffusers_scheduler,
    sample_generator,
    steps_for_nfe,
    unit_noise,
)
from stepsearch.models.image_model import ImageModel, load_image_model, load_source, model_noise
from stepsearch.models.method import (
    REFERENCE_SOLVER,
    EvalModel,
    Method,
    default_methods,
    dpm_solver_3m_leading,
    reference_solution,
)
from stepsearch.models.source import (
    ClassConditionalSource,
    DenoiserSource,
    ModelIdentity,
    SampleSource,
    array_digest,
    digest_text,
    generate,
    generate_from_source,
    initial_noise_for,
    module_digest,
)

__all__ = [
    "REFERENCE_SOLVER",
    "ClassConditionalSource",
    "DenoiserSource",
    "EvalModel",
    "ImageModel",
    "Method",
    "ModelIdentity",
    "SampleSource",
    "array_digest",
    "chunks_for_process",
    "default_methods",
    "digest_text",
    "dpm_solver_3m_leading",
    "generate",
    "generate_chunks",
    "generate_from_source",
    "generate_with_diffusers_scheduler",
    "initial_noise_for",
    "load_image_model",
    "load_source",
    "model_noise",
    "module_digest",
    "reference_solution",
    "sample_generator",
    "steps_for_nfe",
    "unit_noise",
]
