"""One model protocol, one loader, one teacher recorder, one distance scorer (issue 20)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepsearch.cache import TensorCache
from stepsearch.eval.scoring import FeatureReference, distance_scores
from stepsearch.models import (
    DEFAULT_TEACHER,
    DiffusionModel,
    SampleSource,
    TeacherSpec,
    generate_from_source,
    load_model,
    load_source,
    record_trajectories,
)
from stepsearch.models.source import ClassConditionalSource, DenoiserSource
from stepsearch.noise import DiscreteVP
from stepsearch.schedule import make_schedule
from stepsearch.solvers import get_solver
from stepsearch.testbeds.gaussian_mixture import GaussianMixture

NOISE = DiscreteVP.from_diffusers_config({"beta_schedule": "scaled_linear"})


def _mixture() -> DenoiserSource:
    mixture = GaussianMixture.random(num_components=3, dim=4, noise=NOISE, seed=2)
    return DenoiserSource.of_mixture(mixture, num_reference=64)


def test_one_teacher_spec():
    assert TeacherSpec() == DEFAULT_TEACHER
    assert DEFAULT_TEACHER.to_json_dict() == {
        "solver": "dpm_solver_pp_3m",
        "spacing": "logsnr_uniform",
        "num_steps": 100,
    }
    assert DEFAULT_TEACHER.with_steps(None) is DEFAULT_TEACHER
    assert DEFAULT_TEACHER.with_steps(7).num_steps == 7


def _separate_source(model):
    """The model as the separate source the loader made before the model was its own source:
    its fingerprints (``identity``, ``describe()``) and samples must not change."""
    settings = {"prediction_type": model.prediction_type, "sample_shape": list(model.sample_shape)}
    if model.num_classes is not None:
        return ClassConditionalSource(
            model.denoiser, model.noise, model.sample_shape, model.identity,
            num_classes=model.num_classes, guidance_scale=float(model.guidance_scale),
            features=model.feature_extractor, reference_data=model.reference_images,
            settings={**settings, "null_label": model.null_label}, device=model.device,
        )  # fmt: skip
    return DenoiserSource(
        model.denoiser(), model.sample_shape, model.identity, features=model.feature_extractor,
        reference_data=model.reference_images, settings=settings, device=model.device,
    )  # fmt: skip


@pytest.mark.parametrize(("spec", "view"), [("digits", DenoiserSource), ("digits-cond", None)])
def test_image_model_is_its_own_sample_source(spec, view):
    model = load_model(spec)
    assert isinstance(model, SampleSource) and isinstance(model, DiffusionModel)
    assert load_source(spec).identity == model.identity
    legacy = _separate_source(model)
    assert isinstance(legacy, view or ClassConditionalSource)
    assert model.describe() == legacy.describe()
    assert list(model.describe()) == list(legacy.describe())  # provenance order too
    assert model.conditional == legacy.conditional == (view is None)
    schedule = make_schedule(model.noise, 3, "logsnr_uniform")
    solver = get_solver("dpm_solver_pp_2m")
    ours = generate_from_source(model, solver, schedule, 3, seed=4)
    theirs = generate_from_source(legacy, solver, schedule, 3, seed=4)
    assert torch.equal(ours, theirs)


def test_load_model_needs_one_model():
    with pytest.raises(ValueError, match="--model"):
        load_model()
    with pytest.raises(ValueError, match="--model"):
        load_model("digits", pipeline="somewhere")
    with pytest.raises(ValueError, match="--prompts"):
        load_model(pipeline="somewhere")


def test_recorded_trajectories_agree_whatever_is_kept():
    source = _mixture()
    teacher = TeacherSpec("dpm_solver_pp_2m", "logsnr_uniform", 6)
    final = record_trajectories(source, teacher, 10, seed=3, decode=False, chunk_size=4)
    shards: list[tuple[range, torch.Tensor, torch.Tensor]] = []
    whole = record_trajectories(
        source,
        teacher,
        10,
        seed=3,
        keep="trajectory",
        chunk_size=4,
        on_chunk=lambda indices, x, d: shards.append((indices, x, d)),
    )
    assert whole.x.shape == (7, 10, *source.sample_shape) and whole.denoised.shape[0] == 6
    assert torch.equal(whole.x[-1], final.double())
    assert [indices for indices, _, _ in shards] == [range(0, 4), range(4, 8), range(8, 10)]
    assert torch.equal(torch.cat([x for _, x, _ in shards], dim=1).double(), whole.x)
    schedule = teacher.schedule_on(source.noise)
    again = record_trajectories(source, schedule, 10, seed=3, solver="dpm_solver_pp_2m")
    assert torch.equal(again, final)
    with pytest.raises(ValueError, match="solver"):
        record_trajectories(source, schedule, 10)
    with pytest.raises(TypeError, match="PipelineModel"):
        record_trajectories(source, teacher, 2, loop="pipeline")


def test_recorded_trajectories_are_cached_by_key(tmp_path):
    source = _mixture()
    teacher = TeacherSpec("ddim", "time_uniform", 4)
    cache = TensorCache(tmp_path)
    key = {"what": "test"}
    first = record_trajectories(source, teacher, 4, cache=cache, cache_kind="t", cache_key=key)
    assert len(list(tmp_path.glob("t-*.safetensors"))) == 1
    again = record_trajectories(source, teacher, 4, cache=TensorCache(tmp_path), cache_key=key,
                                cache_kind="t")  # fmt: skip
    assert torch.equal(first, again)


def test_one_distance_scorer():
    source = _mixture()
    extractor = source.features
    assert extractor is not None and source.reference_data is not None
    reference = FeatureReference.from_images(extractor, source.reference_data)
    samples = source.reference_data[:40]
    scores = distance_scores(samples, {"fd": reference, "kid": reference})
    fd, fd_std = scores["fd"]
    assert fd_std is None and np.isfinite(fd) and fd >= 0
    kid, kid_std = scores["kid"]
    assert np.isfinite(kid) and kid_std is not None and kid_std >= 0
    _, with_std = distance_scores(samples, {"fd": reference}, bootstrap=5)["fd"]
    assert with_std is not None and with_std > 0
    bad = torch.full_like(samples, float("nan"))
    assert np.isfinite(distance_scores(bad, {"fd": reference})["fd"][0])
