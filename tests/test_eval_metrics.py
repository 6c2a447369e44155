"""FID / KID / CLIP score / trajectory error against closed forms and reference libraries.

Offline: a deterministic random-projection feature network stands in for Inception, a scripted
stub for the Inception TorchScript file, and a tiny random-weight CLIP for the real one.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stepsearch.eval import (
    ClipFeatures,
    ClipScorer,
    FeatureStatistics,
    InceptionFeatures,
    compute_fid,
    compute_kid,
    ensure_features,
    fid_from_features,
    frechet_distance,
    kernel_inception_distance,
    torchmetrics_clip_loader,
    trajectory_error,
)
from stepsearch.eval.features import INCEPTION_ENV_VAR, INCEPTION_FILENAME
from stepsearch.eval.trajectory import per_sample_rms_error

N_IMAGES = 300


class RandomProjection(nn.Module):
    """Images (B, 3, 8, 8) in [-1, 1] -> (B, 16) nonlinear random features, deterministic."""

    def __init__(self, num_features: int = 16, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(3 * 8 * 8, num_features, generator=generator))
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.float().reshape(images.shape[0], -1)
        return torch.tanh(flat @ self.weight / 8.0) + 0.5 * flat[:, : self.num_features]


class Identity(nn.Module):
    """Passes precomputed features through (torchmetrics metrics take a feature module)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _uint8_images(seed: int, low: int, high: int) -> np.ndarray:
    """(N, 8, 8, 3) uint8 images, uniform noise in [low, high)."""
    return np.random.default_rng(seed).integers(low, high, (N_IMAGES, 8, 8, 3), dtype=np.uint8)


def _to_model_range(images_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_hwc).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def two_image_sets() -> tuple[np.ndarray, np.ndarray]:
    return _uint8_images(1, 0, 256), _uint8_images(2, 40, 256)


@pytest.fixture(scope="module")
def two_feature_sets(two_image_sets) -> tuple[np.ndarray, np.ndarray]:
    extractor = RandomProjection()
    first, second = two_image_sets
    return (
        ensure_features(_to_model_range(first), extractor, batch_size=64, progress=False),
        ensure_features(_to_model_range(second), extractor, batch_size=64, progress=False),
    )


# ---------------------------------------------------------------------------------------------
# FID


def test_fid_matches_clean_fid_and_torchmetrics(two_image_sets, two_feature_sets, tmp_path):
    clean_fid = pytest.importorskip("cleanfid.fid", reason="clean-fid (the eval extra)")
    from PIL import Image
    from torchmetrics.image.fid import FrechetInceptionDistance

    features_a, features_b = two_feature_sets
    ours = fid_from_features(features_a, features_b)
    assert ours > 1.0  # the two distributions differ

    # clean-fid's own end-to-end path: PNG folders, custom extractor, no resize (offline).
    extractor = RandomProjection()
    for name, images in zip(("a", "b"), two_image_sets, strict=True):
        (tmp_path / name).mkdir()
        for index, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{index:04d}.png")
    clean = clean_fid.compute_fid(
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        mode="clean",
        custom_feat_extractor=lambda batch: extractor(batch / 127.5 - 1.0),
        custom_fn_resize=lambda image: image,
        num_workers=0,
        batch_size=64,
        device=torch.device("cpu"),
        verbose=False,
    )
    assert clean == pytest.approx(ours, rel=1e-4)
    # ... and its Fréchet distance on the same moments (scipy sqrtm inside).
    clean_same_moments = clean_fid.frechet_distance(
        features_a.mean(0), np.cov(features_a, rowvar=False), features_b.mean(0),
        np.cov(features_b, rowvar=False),
    )  # fmt: skip
    assert clean_same_moments == pytest.approx(ours, rel=1e-9)

    # torchmetrics with the projection as its `feature` module, on the same images.
    metric = FrechetInceptionDistance(feature=RandomProjection())
    metric.update(_to_model_range(two_image_sets[0]), real=True)
    metric.update(_to_model_range(two_image_sets[1]), real=False)
    value = metric.compute()
    assert value.dtype == torch.float32  # quirk: cast back to the feature dtype
    assert float(value) == pytest.approx(ours, rel=1e-4)

    # float64 features through torchmetrics: agreement to round-off.
    metric64 = FrechetInceptionDistance(feature=Identity(16))
    metric64.update(torch.from_numpy(features_a), real=True)
    metric64.update(torch.from_numpy(features_b), real=False)
    assert float(metric64.compute()) == pytest.approx(ours, rel=1e-9)


def test_compute_fid_on_images_equals_feature_path(two_image_sets, two_feature_sets):
    images_a, images_b = (_to_model_range(images) for images in two_image_sets)
    extractor = RandomProjection()
    expected = fid_from_features(*two_feature_sets)
    reference = FeatureStatistics.from_features(two_feature_sets[0])
    # Batch size changes BLAS summation order: round-off only.
    got = compute_fid(images_b, images_a, extractor, batch_size=50, progress=False)
    assert got == pytest.approx(expected, rel=1e-12)
    got = compute_fid(images_b, reference, extractor, progress=False)
    assert got == pytest.approx(expected, rel=1e-12)


def _stats(mu: np.ndarray, sigma: np.ndarray) -> FeatureStatistics:
    return FeatureStatistics(mu=mu, sigma=sigma)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    dim = 12
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    s_a, s_b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum(s_a + s_b - 2.0 * np.sqrt(s_a * s_b))

    diagonal = frechet_distance(_stats(mu_a, np.diag(s_a)), _stats(mu_b, np.diag(s_b)))
    assert diagonal == pytest.approx(expected, rel=1e-8)

    # Same formula for covariances sharing eigenvectors (a common rotation).
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    rotated = frechet_distance(
        _stats(rotation @ mu_a, rotation @ np.diag(s_a) @ rotation.T),
        _stats(rotation @ mu_b, rotation @ np.diag(s_b) @ rotation.T),
    )
    assert rotated == pytest.approx(expected, rel=1e-8)

    # sigma_b = c^2 sigma_a for a full sigma_a:  ||dmu||^2 + (1 - c)^2 tr(sigma_a).
    factor = rng.normal(size=(dim, dim))
    sigma = factor @ factor.T
    scaled = frechet_distance(_stats(mu_a, sigma), _stats(mu_b, 0.3**2 * sigma))
    assert scaled == pytest.approx(np.sum((mu_a - mu_b) ** 2) + 0.7**2 * np.trace(sigma), rel=1e-8)

    # One dimension: (mu_a - mu_b)^2 + (s_a - s_b)^2 for standard deviations s.
    one_d = frechet_distance(_stats(np.array([1.0]), [[4.0]]), _stats(np.array([-2.0]), [[0.25]]))
    assert one_d == pytest.approx(9.0 + 1.5**2, rel=1e-12)


def test_frechet_distance_general_matches_scipy_sqrtm_when_well_conditioned():
    from scipy import linalg

    rng = np.random.default_rng(1)
    dim = 20
    a, b = rng.normal(size=(dim, 3 * dim)), rng.normal(size=(dim, 3 * dim))
    sigma_a, sigma_b = a @ a.T / dim, b @ b.T / dim
    mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
    root = linalg.sqrtm(sigma_a @ sigma_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2.0 * root)
    ours = frechet_distance(_stats(mu_a, sigma_a), _stats(mu_b, sigma_b))
    assert ours == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_with_singular_covariances_stays_exact():
    """8 samples of 32 features: rank-7 covariances. FD(P, P) = 0; a mean shift adds ||d||^2."""
    rng = np.random.default_rng(2)
    features = rng.normal(size=(8, 32)) * rng.uniform(0.1, 10.0, 32)
    stats = FeatureStatistics.from_features(features)
    assert np.linalg.matrix_rank(stats.sigma) == 7
    scale = float(np.trace(stats.sigma))
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-10 * scale)
    shift = rng.normal(size=32)
    shifted = FeatureStatistics.from_features(features + shift)
    assert frechet_distance(stats, shifted) == pytest.approx(shift @ shift, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# KID


def _brute_force_mmd2(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / F + 1)^3, written as explicit sums."""
    dim, m = a.shape[1], a.shape[0]

    def kernel(x: np.ndarray, y: np.ndarray) -> float:
        return (float(x @ y) / dim + 1.0) ** 3

    within = sum(
        kernel(a[i], a[j]) + kernel(b[i], b[j]) for i in range(m) for j in range(m) if i != j
    )
    across = sum(kernel(a[i], b[j]) for i in range(m) for j in range(m))
    return within / (m * (m - 1)) - 2.0 * across / m**2


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`")
def test_kid_full_subset_equals_brute_force_clean_fid_and_torchmetrics(two_feature_sets):
    kernel_distance = pytest.importorskip(
        "cleanfid.fid", reason="clean-fid (the eval extra)"
    ).kernel_distance
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = (features[:40] for features in two_feature_sets)
    expected = _brute_force_mmd2(a, b)
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=40)
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12 * abs(expected))  # every subset is the full set

    np.random.seed(0)
    assert kernel_distance(a, b, num_subsets=3, max_subset_size=40) == pytest.approx(
        expected, rel=1e-10
    )
    metric = KernelInceptionDistance(feature=Identity(16), subsets=3, subset_size=40)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    torchmetrics_mean, _ = metric.compute()
    assert float(torchmetrics_mean) == pytest.approx(expected, rel=1e-10)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`")
def test_kid_agrees_with_torchmetrics_within_its_std(two_feature_sets):
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = two_feature_sets
    subsets, subset_size = 50, 100
    mean, std = kernel_inception_distance(a, b, subsets=subsets, subset_size=subset_size, seed=3)
    torch.manual_seed(0)
    metric = KernelInceptionDistance(feature=Identity(16), subsets=subsets, subset_size=subset_size)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    torchmetrics_mean, torchmetrics_std = (float(value) for value in metric.compute())
    assert mean > 5 * std  # a real difference between the distributions
    assert abs(mean - torchmetrics_mean) < torchmetrics_std
    assert 0.5 < std / torchmetrics_std < 2.0
    # Seeded: the same call gives the same numbers.
    assert kernel_inception_distance(a, b, subsets=subsets, subset_size=subset_size, seed=3) == (
        mean,
        std,
    )


def test_compute_kid_on_images(two_image_sets, two_feature_sets):
    images_a, images_b = (_to_model_range(images) for images in two_image_sets)
    expected = kernel_inception_distance(
        two_feature_sets[1], two_feature_sets[0], subsets=5, subset_size=50
    )
    got = compute_kid(
        images_b, images_a, RandomProjection(), progress=False, subsets=5, subset_size=50
    )
    assert got == expected


# ---------------------------------------------------------------------------------------------
# Statistics files


def test_statistics_npz_round_trip_and_atomic_write(two_feature_sets, tmp_path):
    stats = FeatureStatistics.from_features(two_feature_sets[0])
    assert stats.n == N_IMAGES and stats.mu.dtype == np.float64
    np.testing.assert_allclose(stats.sigma, np.cov(two_feature_sets[0], rowvar=False), rtol=1e-12)
    path = tmp_path / "stats.npz"
    stats.save(path)
    FeatureStatistics.from_features(two_feature_sets[1]).save(path)  # overwrite in place
    stats.save(path)
    assert [entry.name for entry in tmp_path.iterdir()] == ["stats.npz"]  # no temp files left
    loaded = FeatureStatistics.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == stats.n
    assert frechet_distance(loaded, stats) == pytest.approx(0.0, abs=1e-12)

    # clean-fid / EDM layout (float32, no n) loads too.
    np.savez(tmp_path / "foreign.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma)
    foreign = FeatureStatistics.load(tmp_path / "foreign.npz")
    assert foreign.n is None and foreign.mu.dtype == np.float64


def test_statistics_validation_errors(tmp_path):
    mu, sigma = np.zeros(3), np.eye(3)
    sigma_nan = sigma.copy()
    sigma_nan[1, 2] = sigma_nan[2, 1] = np.nan
    np.savez(tmp_path / "nan.npz", mu=mu, sigma=sigma_nan)
    with pytest.raises(ValueError, match=r"nan\.npz.*sigma has 2 non-finite"):
        FeatureStatistics.load(tmp_path / "nan.npz")
    with pytest.raises(ValueError, match="mu has 1 non-finite"):
        FeatureStatistics(mu=np.array([0.0, np.inf, 0.0]), sigma=sigma)
    with pytest.raises(ValueError, match="NaN or inf in 1 of 3 rows"):
        FeatureStatistics.from_features(np.array([[0.0, 1.0], [np.nan, 1.0], [2.0, 3.0]]))
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"sigma must have shape \(3, 3\)"):
        FeatureStatistics.load(tmp_path / "shape.npz")
    np.savez(tmp_path / "keys.npz", mean=mu, sigma=sigma)
    with pytest.raises(ValueError, match=r"missing arrays \['mu'\]"):
        FeatureStatistics.load(tmp_path / "keys.npz")
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=sigma)
    with pytest.raises(ValueError, match="unreadable array"):
        FeatureStatistics.load(tmp_path / "pickled.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        FeatureStatistics.load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureStatistics.load(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="not symmetric"):
        FeatureStatistics(mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(FeatureStatistics(mu, sigma), FeatureStatistics(np.zeros(2), np.eye(2)))


# ---------------------------------------------------------------------------------------------
# Feature extraction


def test_ensure_features_batches_and_checks():
    images = torch.rand(10, 3, 8, 8) * 2 - 1
    extractor = RandomProjection().train()
    whole = ensure_features(images, extractor, batch_size=3, progress=False)
    assert whole.shape == (10, 16) and whole.dtype == np.float64
    assert extractor.training  # mode restored
    from_iterable = ensure_features(iter(images.split(3)), extractor, progress=False)
    np.testing.assert_array_equal(whole, from_iterable)
    direct = extractor(images).detach().double().numpy()
    np.testing.assert_allclose(whole, direct, rtol=1e-5, atol=1e-6)  # other batching: round-off
    with pytest.raises(ValueError, match="returned 16 features, but its num_features is 15"):
        ensure_features(torch.zeros(4, 16), Identity(15), progress=False)


def test_inception_missing_weights_raises_clear_error(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match=rf"{INCEPTION_FILENAME}.*weights_path"):
        InceptionFeatures(weights_path=tmp_path / "absent.pt")
    with pytest.raises(RuntimeError, match=r"does not exist"):
        InceptionFeatures(weights_path=tmp_path)  # a directory without the file
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match=INCEPTION_ENV_VAR):
        InceptionFeatures()


class _StubInceptionLayers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        size = torch.full((batch, 1), float(x.shape[-1]))
        return torch.cat([x.mean(dim=(2, 3)), size, torch.zeros(batch, 2044)], dim=1)


class _StubInception(nn.Module):
    """Same interface as inception-2015-12-05.pt: `layers` on normalized 299x299 input, and
    forward(x in [0, 255], return_features) resizing inside."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _StubInceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128.0) / 128.0)


def test_inception_features_with_a_stub_torchscript_file(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_StubInception()), str(tmp_path / INCEPTION_FILENAME))
    levels = torch.tensor([0.0, 0.5, -1.0])  # -> 8-bit levels 128, 191, 0
    images = levels.reshape(1, 3, 1, 1).expand(2, 3, 8, 8)
    expected = (torch.tensor([128.0, 191.0, 0.0]) - 128.0) / 128.0
    for resize, size in (("legacy_tensorflow", 8.0), ("clean", 299.0)):
        extractor = InceptionFeatures(tmp_path, resize=resize)  # a directory holding the file
        features = ensure_features(images, extractor, progress=False)
        assert features.shape == (2, 2048) and extractor.num_features == 2048
        np.testing.assert_allclose(features[:, :3], expected.expand(2, 3), atol=1e-5)
        assert features[0, 3] == size
    grey = InceptionFeatures(tmp_path / INCEPTION_FILENAME)(torch.full((1, 1, 8, 8), 0.5))
    np.testing.assert_allclose(grey[0, :3], [63 / 128] * 3)
    uint8 = InceptionFeatures(tmp_path)(torch.full((1, 3, 8, 8), 191, dtype=torch.uint8))
    np.testing.assert_allclose(uint8[0, :3], [63 / 128] * 3)


# ---------------------------------------------------------------------------------------------
# CLIP score


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for suffix in ("", "</w>"):
        vocab.update({letter + suffix: len(vocab) + i for i, letter in enumerate(letters)})
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=77)
    assert len(tokenizer) == len(vocab)  # the files were really read
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


PROMPTS = ["the cat", "a dog", "the dog sat", "cats", "a big red cat", "the", "dog dog", "xyz"]


def test_clip_score_matches_torchmetrics_on_a_tiny_clip(tiny_clip_dir):
    from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score
    from torchmetrics.multimodal import CLIPScore

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (len(PROMPTS), 3, 20, 24), dtype=torch.uint8, generator=generator
    )
    scorer = ClipScorer.from_pretrained(tiny_clip_dir, local_files_only=True)
    cosines = scorer.similarities(images, PROMPTS, batch_size=3)
    assert (cosines > 0).any() and (cosines < 0).any()  # the clip at 0 matters here
    ours = scorer(images, PROMPTS, batch_size=3)
    assert ours == pytest.approx(float((100 * cosines.clamp(min=0)).mean()), rel=1e-12)

    loader = torchmetrics_clip_loader(scorer.model, scorer.processor)
    with torch.no_grad():
        per_sample = [
            float(torchmetrics_clip_score(image, prompt, model_name_or_path=loader))
            for image, prompt in zip(images, PROMPTS, strict=True)
        ]
    assert ours == pytest.approx(float(np.mean(per_sample)), rel=1e-5)
    # torchmetrics' batch metric clips the mean, not each sample (quirk, torchmetrics 1.9).
    metric = CLIPScore(model_name_or_path=loader)
    with torch.no_grad():
        metric.update(images, PROMPTS)
    assert float(metric.compute()) == pytest.approx(max(100 * float(cosines.mean()), 0.0), rel=1e-5)

    # Float images in [-1, 1] are the same 8-bit levels.
    as_float = (images.float() - 127.5) / 127.5
    assert scorer(as_float, PROMPTS, batch_size=3) == ours


def test_clip_features_and_missing_model(tiny_clip_dir, tmp_path):
    extractor = ClipFeatures(tiny_clip_dir, local_files_only=True, normalize=True)
    assert extractor.num_features == 16
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    features = ensure_features(images, extractor, batch_size=2, progress=False)
    assert features.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-6)
    scorer = ClipScorer.from_pretrained(tiny_clip_dir, local_files_only=True)
    np.testing.assert_allclose(features, scorer.image_embeddings(images).numpy(), atol=1e-6)
    with pytest.raises(RuntimeError, match="does not exist"):
        ClipFeatures(tmp_path / "no_such_model")
    with pytest.raises(RuntimeError, match="Could not load CLIP model"):
        ClipScorer.from_pretrained("nobody/no-such-clip-model", local_files_only=True)


# ---------------------------------------------------------------------------------------------
# Trajectory error


def test_trajectory_error_known_values():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(5, 3, 4, 4, generator=generator)
    offsets = torch.tensor([0.1, 0.2, 0.3, 0.4, 10.0], dtype=torch.float64)
    signs = torch.randint(0, 2, reference.shape, generator=generator) * 2 - 1
    samples = reference.double() + offsets.reshape(-1, 1, 1, 1) * signs
    errors = per_sample_rms_error(samples, reference)
    torch.testing.assert_close(errors, offsets, rtol=1e-12, atol=0)
    assert trajectory_error(samples, reference) == pytest.approx(0.3, rel=1e-12)
    assert trajectory_error(samples, reference, "mean") == pytest.approx(2.2, rel=1e-12)
    rms = math.sqrt(float((offsets**2).mean()))
    assert trajectory_error(samples, reference, "rms") == pytest.approx(rms, rel=1e-12)
    # Even N: the midpoint of the two middle values; numpy input is fine.
    assert trajectory_error(samples[:4].numpy(), reference[:4].numpy()) == pytest.approx(0.25)
    # A diverged sample counts as +inf: the median shrugs, the mean does not.
    diverged = samples.clone()
    diverged[0, 0, 0, 0] = float("nan")
    assert per_sample_rms_error(diverged, reference)[0] == math.inf
    assert trajectory_error(diverged, reference) == pytest.approx(0.4)
    assert trajectory_error(diverged, reference, "mean") == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        trajectory_error(samples[:3], reference)
    with pytest.raises(ValueError, match="reduction"):
        trajectory_error(samples, reference, "max")  # type: ignore[arg-type]
