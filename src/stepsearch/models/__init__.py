"""Everything that can be sampled, behind one protocol.

- :mod:`~stepsearch.models.source`: the :class:`SampleSource` protocol (what stepsearch's solvers
  sample), sources from a denoiser or a class-conditional model, model identities (weights
  digests) and the one loop over chunks of sample indices (:func:`generate_from_source`, common
  random numbers);
- :mod:`~stepsearch.models.image_model` and :mod:`~stepsearch.models.pipeline`: the bundled digits
  models and local ``UNet2DModel`` directories (:class:`ImageModel`), local text-to-image pipelines
  (:class:`PipelineModel`): each a sample source that also runs diffusers' own loop
  (:class:`DiffusionModel`, the one model protocol);
- :mod:`~stepsearch.models.loading`: every model is loaded there (:func:`load_model`);
- :mod:`~stepsearch.models.trajectories`: the one teacher spec (:class:`TeacherSpec`) and the one
  recorder of teacher / reference trajectories (:func:`record_trajectories`);
- :mod:`~stepsearch.models.method`: samplers as data (:class:`Method`), the built-in line-up and
  the reference solution;
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
from stepsearch.models.image_model import ImageModel
from stepsearch.models.loading import (
    MODEL_DTYPES,
    load_image_model,
    load_model,
    load_source,
    model_dtype,
    model_noise,
    model_scheduler_config,
    pipeline_guidance_scale,
)
from stepsearch.models.method import (
    DiffusionModel,
    Method,
    default_methods,
    dpm_solver_3m_leading,
    reference_solution,
)
from stepsearch.models.pipeline import DEFAULT_GUIDANCE_SCALE, PipelineModel
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
from stepsearch.models.trajectories import (
    DEFAULT_TEACHER,
    TeacherSpec,
    Trajectories,
    record_trajectories,
    teacher_key,
)

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_TEACHER",
    "MODEL_DTYPES",
    "ClassConditionalSource",
    "DenoiserSource",
    "DiffusionModel",
    "ImageModel",
    "Method",
    "ModelIdentity",
    "PipelineModel",
    "SampleSource",
    "TeacherSpec",
    "Trajectories",
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
    "load_model",
    "load_source",
    "model_dtype",
    "model_noise",
    "model_scheduler_config",
    "module_digest",
    "pipeline_guidance_scale",
    "record_trajectories",
    "reference_solution",
    "sample_generator",
    "steps_for_nfe",
    "teacher_key",
    "unit_noise",
]
