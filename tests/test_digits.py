"""The bundled digits model and the FD-digits classifier, loaded from package data."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from stepsearch.testbeds import digits


@pytest.fixture(scope="module")
def model() -> digits.DigitsModel:
    return digits.load()


@pytest.fixture(scope="module")
def classifier() -> digits.DigitsClassifier:
    return digits.load_classifier()


def test_real_images_shape_range_and_labels() -> None:
    images, labels = digits.real_images(), digits.real_labels()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert digits.real_images(torch.float64).dtype == torch.float64


def test_split_is_reproducible_disjoint_and_stratified() -> None:
    train, test = digits.train_test_split_indices(0)
    again_train, again_test = digits.train_test_split_indices(0)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)
    assert len(test) == 360 and len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == 1797
    labels = digits.real_labels().numpy()
    fractions = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(fractions - 0.2) < 0.02)


def test_unet_checkpoint_loads_and_runs(model: digits.DigitsModel) -> None:
    unet = model.unet
    num_parameters = sum(parameter.numel() for parameter in unet.parameters())
    assert 1_400_000 <= num_parameters <= 1_800_000
    assert num_parameters == model.metadata["num_parameters"]
    assert not unet.training
    assert not any(parameter.requires_grad for parameter in unet.parameters())
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = unet(x, torch.tensor([999, 500, 10, 0])).sample
    assert eps.shape == (4, 1, 8, 8) and torch.isfinite(eps).all()


def test_scheduler_config_and_metadata(model: digits.DigitsModel) -> None:
    scheduler = model.make_scheduler()
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "linear"
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.clip_sample is False
    for key in ("seed", "epochs", "final_loss", "wall_time_s", "num_threads", "versions"):
        assert key in model.metadata
    assert model.metadata["final_loss"] < 0.2


def test_classifier_accuracy_recorded_and_recomputed(classifier: digits.DigitsClassifier) -> None:
    record = digits.classifier_metadata()
    assert record["test_accuracy"] >= 0.95
    split = record["split"]
    _, test = digits.train_test_split_indices(split["seed"], split["test_fraction"])
    index = torch.from_numpy(test)
    with torch.no_grad():
        predicted = classifier(digits.real_images()[index]).argmax(dim=1)
    recomputed = (predicted == digits.real_labels()[index]).double().mean().item()
    # Identical up to one image, should a different BLAS round one logit differently.
    assert abs(recomputed - record["test_accuracy"]) <= 1.0 / len(test) + 1e-12


def test_features_have_64_dims_and_are_deterministic(classifier: digits.DigitsClassifier) -> None:
    extractor = digits.DigitsFeatureExtractor(classifier)
    images = digits.real_images()[:32]
    first, second = extractor(images), extractor(images.clone())
    assert extractor.num_features == 64
    assert first.shape == (32, 64) and first.dtype == torch.float32
    assert torch.equal(first, second)
    with torch.no_grad():
        torch.testing.assert_close(first, classifier.features(images))
    torch.testing.assert_close(extractor(images.double())[:5], first[:5])


def test_feature_extractor_rejects_wrong_shapes(classifier: digits.DigitsClassifier) -> None:
    extractor = digits.DigitsFeatureExtractor(classifier)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        extractor(torch.zeros(2, 3, 8, 8))


def test_missing_checkpoint_names_the_training_script(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train_digits\.py"):
        digits.load(directory=tmp_path)


def test_weights_out_of_sync_with_json_are_refused(tmp_path: Path) -> None:
    data = resources.files("stepsearch") / "data"
    for name in (digits.CLASSIFIER_WEIGHTS, digits.CLASSIFIER_CONFIG):
        with resources.as_file(data / name) as source:
            shutil.copyfile(source, tmp_path / name)
    weights = tmp_path / digits.CLASSIFIER_WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        digits.load_classifier(directory=tmp_path)
