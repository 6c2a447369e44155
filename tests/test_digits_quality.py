"""Sanity of the bundled digits model under FD-digits (the demo's metric), on the real checkpoint."""

from importlib import resources

import pytest
import torch

from stepsearch.eval.features import ensure_features
from stepsearch.eval.fid import fid_from_features
from stepsearch.models import Method, load_image_model

NUM_SAMPLES = 400


@pytest.fixture(scope="module")
def model():
    torch.set_grad_enabled(False)
    yield load_image_model("digits")
    torch.set_grad_enabled(True)


def _fd(model, images: torch.Tensor) -> float:
    features = ensure_features(images, model.feature_extractor, progress=False)
    reference = ensure_features(model.reference_images, model.feature_extractor, progress=False)
    return fid_from_features(features, reference)


def test_fd_digits_separates_real_from_generated_and_falls_with_nfe(model):
    generator = torch.Generator().manual_seed(0)
    real = model.reference_images
    half = real[torch.randperm(real.shape[0], generator=generator)[: real.shape[0] // 2]]
    real_vs_real = _fd(model, half)

    ddim = Method.stepsearch("ddim", "trailing")
    fd_by_nfe = {}
    for nfe in (5, 10, 20):
        samples, num_steps = ddim.run(model, nfe, NUM_SAMPLES, seed=0)
        assert num_steps == nfe and torch.isfinite(samples).all()
        fd_by_nfe[nfe] = _fd(model, samples)

    # Real halves are far closer to the data than 5-step samples ...
    assert real_vs_real * 3 < fd_by_nfe[5], (real_vs_real, fd_by_nfe)
    # ... and DDIM gets closer with every doubling of the budget.
    assert fd_by_nfe[5] > fd_by_nfe[10] > fd_by_nfe[20], fd_by_nfe


def test_diffusers_baseline_spends_exactly_the_nfe_and_matches_its_stepsearch_twin(model):
    heun = Method.diffusers("HeunDiscreteScheduler", timestep_spacing="trailing")
    assert heun.diffusers_scheduler_for(model.scheduler_config, 4) is None  # Heun spends 2n - 1
    _, heun_steps = heun.diffusers_scheduler_for(model.scheduler_config, 5)
    assert heun_steps == 3

    # diffusers' DDIM on trailing spacing and stepsearch's DDIM on the same grid: same samples.
    # (At 5 steps: diffusers' DDIM steps to ``t - N // n``, which is the next grid point only when
    # n divides N; at 6 steps it lands on 833 while the grid says 832.)
    baseline = Method.diffusers("DDIMScheduler", timestep_spacing="trailing", clip_sample=False)
    theirs, steps = baseline.run(model, 5, 16, seed=3)
    ours, _ = Method.stepsearch("ddim", "trailing").run(model, 5, 16, seed=3)
    assert steps == 5
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def flow_model():
    torch.set_grad_enabled(False)
    yield load_image_model("digits-flow")
    torch.set_grad_enabled(True)


def test_flow_twin_loads_as_a_flow_and_gets_closer_with_more_steps(flow_model):
    from stepsearch.noise import FlowMatching

    assert isinstance(flow_model.noise, FlowMatching) and flow_model.prediction_type == "flow"
    euler = Method.stepsearch("ddim", "flow_shifted")  # DDIM is Euler on a rectified flow
    fd_by_nfe = {}
    for nfe in (5, 10, 20):
        samples, _ = euler.run(flow_model, nfe, NUM_SAMPLES, seed=0)
        fd_by_nfe[nfe] = _fd(flow_model, samples)
    assert fd_by_nfe[5] > fd_by_nfe[10] > fd_by_nfe[20], fd_by_nfe


def test_flow_twin_matches_diffusers_flow_match_euler(flow_model):
    """diffusers' FlowMatchEulerDiscreteScheduler (with the model's shift), run as a baseline of
    the harness (it has no ``init_noise_sigma``: the loop starts from the unit noise), and
    stepsearch's Euler on the same shifted grid give the same samples."""
    theirs, steps = Method.diffusers("FlowMatchEulerDiscreteScheduler").run(flow_model, 8, 16, 3)
    ours, _ = Method.stepsearch("ddim", "flow_shifted").run(flow_model, 8, 16, seed=3)
    assert steps == 8
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not (resources.files("stepsearch") / "data" / "digits_cond_unet.safetensors").is_file(),
    reason="digits-cond is not trained yet: python scripts/train_digits.py --models digits-cond",
)
def test_guidance_raises_accuracy_on_the_requested_digit():
    from stepsearch.models.source import generate
    from stepsearch.schedule import make_schedule
    from stepsearch.solvers import get_solver
    from stepsearch.testbeds import digits

    torch.set_grad_enabled(False)
    model, classifier = digits.load("digits-cond"), digits.load_classifier()
    labels = torch.arange(200) % 10
    schedule = make_schedule(model.noise, 10, "logsnr_uniform")
    accuracy = {}
    for scale in (0.0, 1.0, 4.0):  # 0: the unconditional branch alone
        samples = generate(
            model.denoiser(labels, scale),
            schedule,
            get_solver("dpm_solver_pp_2m"),
            200,
            digits.IMAGE_SHAPE,
            seed=0,
            chunk_size=200,
            progress=False,
        )
        accuracy[scale] = digits.class_accuracy(classifier, samples, labels)
    torch.set_grad_enabled(True)
    assert accuracy[0.0] < 0.3 < accuracy[1.0] < accuracy[4.0], accuracy
