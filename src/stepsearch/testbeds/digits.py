"""The bundled digits model: a small DDPM on scikit-learn's 8×8 digits, and a digit classifier.

The checkpoint files live in ``stepsearch/data/`` and were produced, bit for bit reproducibly on
CPU, by ``python scripts/train_digits.py --out src/stepsearch/data --seed 0 --threads 1``:

- ``digits_unet.safetensors`` / ``digits_unet.json``: a diffusers ``UNet2DModel`` (epsilon
  prediction, EMA weights) trained with 1000-step linear betas, its ``DDPMScheduler`` config and
  the training metadata.
- ``digits_classifier.safetensors`` / ``digits_classifier.json``: a small CNN whose 64-d
  penultimate layer defines an offline Fréchet distance for this domain ("FD-digits").

Images everywhere in this module are ``(B, 1, 8, 8)`` tensors with pixel values in ``[-1, 1]``
(the dataset's 0..16 intensities mapped by ``x / 8 - 1``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel

__all__ = [
    "CLASSIFIER_CONFIG",
    "CLASSIFIER_WEIGHTS",
    "FEATURE_DIM",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "NUM_IMAGES",
    "TRAIN_COMMAND",
    "UNET_CONFIG",
    "UNET_WEIGHTS",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "DigitsModel",
    "classifier_metadata",
    "load",
    "load_classifier",
    "real_images",
    "real_labels",
    "train_test_split_indices",
]

UNET_WEIGHTS = "digits_unet.safetensors"
UNET_CONFIG = "digits_unet.json"
CLASSIFIER_WEIGHTS = "digits_classifier.safetensors"
CLASSIFIER_CONFIG = "digits_classifier.json"
TRAIN_COMMAND = "python scripts/train_digits.py --out src/stepsearch/data --seed 0 --threads 1"

NUM_IMAGES = 1797
IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
"""The class label of the unconditional branch of ``digits-cond`` (label dropout's target)."""
FEATURE_DIM = 64
PIXEL_MAX = 16.0

Device = torch.device | str | None
DataDir = str | Path | Traversable | None




@dataclass(frozen=True)
class ModelSpec:
    """One bundled model: its name, checkpoint stem, family (``ddpm`` or ``flow``), conditioning."""

    name: str
    stem: str
    family: str
    conditional: bool
    description: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("digits", "digits_unet", "ddpm", False, "DDPM, 1000 linear betas, v-prediction"),
        ModelSpec(
            "digits-flow", "digits_flow_unet", "flow", False, "rectified flow, velocity prediction"
        ),
        ModelSpec(
            "digits-cond",
            "digits_cond_unet",
            "ddpm",
            True,
            "class-conditional DDPM (v-prediction) with classifier-free guidance",
        ),
    )
}
"""The registry of bundled models by name: ``digits | digits-flow | digits-cond``."""


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as read-only ``(images 0..16, labels)`` arrays."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the digits test bed needs scikit-learn (pip install 'stepsearch[eval]')"
        ) from error
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def real_images(dtype: torch.dtype = torch.float32) -> Tensor:
    """All 1,797 digits as a ``(1797, 1, 8, 8)`` tensor scaled from 0..16 to ``[-1, 1]``."""
    images, _ = _digits_arrays()
    return torch.from_numpy(images / (PIXEL_MAX / 2) - 1.0).to(dtype).unsqueeze(1)


def real_labels() -> Tensor:
    """The class (0..9) of every image of :func:`real_images`, as an int64 tensor."""
    _, labels = _digits_arrays()
    return torch.from_numpy(labels.copy())


def train_test_split_indices(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, test)`` indices of a stratified split, reproducible from ``seed``.

    The classifier is trained on ``train`` and its recorded accuracy is measured on ``test``.
    """
    from sklearn.model_selection import train_test_split

    _, labels = _digits_arrays()
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    return np.sort(train), np.sort(test)


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"expected images of shape (B, 1, 8, 8), got {tuple(images.shape)}")


# ----------------------------------------------------------------------------- classifier


class DigitsClassifier(nn.Module):
    """A small CNN for 8×8 digits in ``[-1, 1]``; its penultimate layer is ``feature_dim``-d.

    It has no dropout or batch norm, so training and evaluation modes compute the same function.
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 64, 64),
        feature_dim: int = FEATURE_DIM,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.channels = (c1, c2, c3)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(c3 * 4 * 4, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serializable."""
        return {
            "channels": list(self.channels),
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
        }

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features, ``(B, feature_dim)``, of images ``(B, 1, 8, 8)`` in [-1, 1]."""
        _check_images(x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` of images ``(B, 1, 8, 8)`` in [-1, 1]."""
        return self.head(self.features(x))


class DigitsFeatureExtractor(nn.Module):
    """The FD-digits feature map: frozen classifier features, usable as torchmetrics' ``feature=``.

    ``forward(images)`` takes ``(B, 1, 8, 8)`` images in ``[-1, 1]`` (values outside are clamped
    when ``clamp`` is true, as they would be when saved as pictures) and returns float32
    ``(B, 64)`` features, computed without gradients.
    """

    def __init__(self, classifier: DigitsClassifier | None = None, clamp: bool = True) -> None:
        super().__init__()
        classifier = load_classifier() if classifier is None else classifier
        self.classifier = classifier.eval().requires_grad_(False)
        self.clamp = clamp
        self.num_features: int = classifier.feature_dim

    def forward(self, images: Tensor) -> Tensor:
        """Features ``(B, 64)`` of images ``(B, 1, 8, 8)`` in ``[-1, 1]``."""
        weight = self.classifier.head.weight
        x = images.to(device=weight.device, dtype=weight.dtype)
        if self.clamp:
            x = x.clamp(-1.0, 1.0)
        with torch.no_grad():
            return self.classifier.features(x).float()


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class DigitsModel:
    """The bundled digits DDPM: an eval-mode, frozen ``UNet2DModel`` that predicts epsilon.

    ``scheduler_config`` is the ``DDPMScheduler`` config it was trained with (1000 linear betas,
    ``clip_sample=False``); ``metadata`` records how it was trained.
    """

    unet: UNet2DModel
    scheduler_config: dict[str, Any]
    metadata: dict[str, Any]

    def make_scheduler(self) -> DDPMScheduler:
        """A fresh ``DDPMScheduler`` with the training noise schedule."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)


def _data_dir(directory: DataDir) -> Traversable:
    if directory is None:
        return resources.files("stepsearch") / "data"
    return Path(directory) if isinstance(directory, str) else directory


def _read_checkpoint(
    directory: DataDir, weights_name: str, config_name: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a safetensors file and its JSON, checking the recorded SHA-256 of the weights."""
    from safetensors.torch import load as load_safetensors

    root = _data_dir(directory)
    weights_file, config_file = root / weights_name, root / config_name
    if not (weights_file.is_file() and config_file.is_file()):
        raise FileNotFoundError(
            f"digits checkpoint {weights_name} / {config_name} not found in {root}; "
            f"create it with: {TRAIN_COMMAND}"
        )
    blob = weights_file.read_bytes()
    config = json.loads(config_file.read_text(encoding="utf-8"))
    expected = config.get("weights_sha256")
    if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
        raise ValueError(
            f"{weights_name} does not match the SHA-256 recorded in {config_name}; "
            f"the pair is out of sync: re-run {TRAIN_COMMAND}"
        )
    return load_safetensors(blob), config


def load(
    device: Device = None, dtype: torch.dtype = torch.float32, directory: DataDir = None
) -> DigitsModel:
    """Load the bundled digits DDPM (from package data unless ``directory`` is given).

    The UNet is returned in eval mode with ``requires_grad`` off (gradients still flow to
    its inputs). Raises ``FileNotFoundError`` naming the training command when the files are
    missing.
    """
    from diffusers import UNet2DModel

    tensors, config = _read_checkpoint(directory, UNET_WEIGHTS, UNET_CONFIG)
    unet = UNet2DModel.from_config(config["unet_config"])
    unet.load_state_dict(tensors, strict=True)
    if dtype != unet.dtype:  # diffusers warns on every `.to(dtype=...)`, even a no-op one
        unet = unet.to(dtype=dtype)
    unet = unet.to(device=device).eval().requires_grad_(False)
    return DigitsModel(
        unet=unet,
        scheduler_config=dict(config["scheduler_config"]),
        metadata=dict(config["training"]),
    )


def load_classifier(device: Device = None, directory: DataDir = None) -> DigitsClassifier:
    """Load the bundled digit classifier (eval mode, ``requires_grad`` off)."""
    tensors, config = _read_checkpoint(directory, CLASSIFIER_WEIGHTS, CLASSIFIER_CONFIG)
    architecture = config["architecture"]
    c1, c2, c3 = (int(c) for c in architecture["channels"])
    classifier = DigitsClassifier(
        channels=(c1, c2, c3),
        feature_dim=architecture["feature_dim"],
        num_classes=architecture["num_classes"],
    )
    classifier.load_state_dict(tensors, strict=True)
    return classifier.to(device=device).eval().requires_grad_(False)


def classifier_metadata(directory: DataDir = None) -> dict[str, Any]:
    """The classifier's JSON record: architecture, split, recorded test accuracy, seed."""
    _, config = _read_checkpoint(directory, CLASSIFIER_WEIGHTS, CLASSIFIER_CONFIG)
    return config
