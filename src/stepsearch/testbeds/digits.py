"""The bundled digits models: small diffusion models on scikit-learn's 8×8 digits, and a classifier.

Three models, selected by name from :data:`MODELS` (``load("digits-flow")``), all diffusers
``UNet2DModel`` s (1.6M parameters, EMA weights) trained on the 1,797 digits:

- ``digits`` (``digits_unet.*``): DDPM on 1000 linear betas, v-prediction (``DDPMScheduler``);
- ``digits-flow`` (``digits_flow_unet.*``): rectified flow, velocity prediction
  (``FlowMatchEulerDiscreteScheduler`` with a shift);
- ``digits-cond`` (``digits_cond_unet.*``): the DDPM conditioned on the digit label, with a
  null label for classifier-free guidance (:meth:`DigitsModel.denoiser`).

``digits_classifier.*`` is a small CNN whose 64-d penultimate layer defines an offline Fréchet
distance for this domain ("FD-digits"); its accuracy on the requested digit
(:func:`class_accuracy`) is the conditional model's adherence metric. All files live in
``stepsearch/data/`` and were produced, bit for bit reproducibly on CPU, by
``python scripts/train_digits.py --out src/stepsearch/data --seed 0 --threads 1``; model cards
are in ``docs/models.md``.

Images everywhere in this module are ``(B, 1, 8, 8)`` tensors with pixel values in ``[-1, 1]``
(the dataset's 0..16 intensities mapped by ``x / 8 - 1``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from stepsearch.denoiser import ModelDenoiser, eps_from_x0
from stepsearch.guidance import GuidanceSchedule
from stepsearch.noise import DiscreteVP, FlowMatching, NoiseSchedule
from stepsearch.testbeds.gaussian_mixture import EmpiricalDenoiser

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

if TYPE_CHECKING:
    from diffusers import UNet2DModel


__all__ = [
    "CLASSIFIER_CONFIG",
    "CLASSIFIER_WEIGHTS",
    "DIAGNOSTIC_TIMESTEPS",
    "FEATURE_DIM",
    "GUIDANCE_SCALE",
    "IMAGE_SHAPE",
    "MODELS",
    "NULL_LABEL",
    "NUM_CLASSES",
    "NUM_IMAGES",
    "TRAIN_COMMAND",
    "UNET_CONFIG",
    "UNET_WEIGHTS",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "DigitsModel",
    "ModelSpec",
    "checkpoint_record",
    "class_accuracy",
    "classifier_metadata",
    "label_cycle_indices",
    "load",
    "load_classifier",
    "posterior_mean_error",
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
GUIDANCE_SCALE = 2.0
"""``digits-cond``'s default classifier-free guidance scale wherever a model is selected
(``--model digits-cond``): the smallest measured scale at which the classifier finds the requested
digit in every one of 1,000 samples (accuracy 0.91 / 1.00 / 1.00 at guidance 1 / 2 / 4)."""
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


def label_cycle_indices() -> np.ndarray:
    """Indices of real digits ordered so that row ``j`` has label ``j mod 10``: each class's
    images in data order, interleaved, as many of each as the smallest class has (174), 1,740 in
    all. The reference data of ``digits-cond``, whose sample ``i`` is asked for digit ``i mod 10``
    (so FD compares class-balanced sets, and Align Your Steps sees each image under its label)."""
    _, labels = _digits_arrays()
    by_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    per_class = min(len(rows) for rows in by_class)
    return np.stack([rows[:per_class] for rows in by_class], axis=1).reshape(-1)


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
    """A bundled digits model: an eval-mode, frozen ``UNet2DModel`` and its scheduler config.

    ``spec`` says which registry entry it is; ``scheduler_class`` names the diffusers scheduler
    whose ``scheduler_config`` it was trained with (``DDPMScheduler``: 1000 linear betas,
    ``clip_sample=False``, the ``prediction_type`` it predicts; ``FlowMatchEulerDiscreteScheduler``:
    rectified flow with a sampling ``shift``); ``metadata`` records how it was trained.
    """

    spec: ModelSpec
    unet: UNet2DModel
    scheduler_class: str
    scheduler_config: dict[str, Any]
    metadata: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def prediction_type(self) -> str:
        """The :class:`~stepsearch.denoiser.ModelDenoiser` prediction type (``flow`` for flows)."""
        if self.spec.family == "flow":
            return "flow"
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @functools.cached_property
    def noise(self) -> NoiseSchedule:
        """The training noise schedule: ``DiscreteVP`` or ``FlowMatching`` (with the shift)."""
        if self.spec.family == "flow":
            total = int(self.scheduler_config["num_train_timesteps"])
            shift = float(self.scheduler_config.get("shift", 1.0))
            return FlowMatching(shift=shift, t_min=1.0 / total, num_train_timesteps=total)
        return DiscreteVP.from_diffusers_config(self.scheduler_config)

    def make_scheduler(self) -> Any:
        """A fresh diffusers scheduler (``scheduler_class``) with the training noise schedule."""
        import diffusers

        return getattr(diffusers, self.scheduler_class).from_config(self.scheduler_config)

    def model_fn(self, labels: int | Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """``f(x, timestep) -> output`` of the UNet; ``digits-cond`` needs ``labels`` (an int for
        every sample, a ``(B,)`` tensor for a batch of ``B``, or :data:`NULL_LABEL`)."""
        if not self.spec.conditional:
            if labels is not None:
                raise ValueError(f"{self.name} is unconditional; it takes no labels")
            return lambda x, timestep: self.unet(x, timestep).sample
        if labels is None:
            raise ValueError(f"{self.name} is class-conditional: pass labels (0..9)")
        fixed = _check_labels(labels)

        def conditional(x: Tensor, timestep: Tensor) -> Tensor:
            if fixed.ndim == 0:
                class_labels = fixed.expand(x.shape[0])
            elif fixed.shape[0] == x.shape[0]:
                class_labels = fixed
            else:
                raise ValueError(
                    f"{fixed.shape[0]} labels for a batch of {x.shape[0]}: sample in one chunk"
                )
            return self.unet(x, timestep, class_labels=class_labels.to(x.device)).sample

        return conditional

    def denoiser(
        self,
        labels: int | Tensor | None = None,
        guidance: GuidanceSchedule | float = 1.0,
        guidance_rescale: float = 0.0,
    ) -> ModelDenoiser:
        """The ``x0`` denoiser; for ``digits-cond``, classifier-free guided towards ``labels``
        (``uncond + w (cond - uncond)``, Ho & Salimans 2022, Eq. 6, on the v output; ``w = 1``
        evaluates the conditional branch alone)."""
        unguided = isinstance(guidance, (int, float)) and float(guidance) == 1.0
        if not self.spec.conditional or unguided:
            if not unguided and not self.spec.conditional:
                raise ValueError(f"{self.name} is unconditional; guidance needs digits-cond")
            return ModelDenoiser(self.model_fn(labels), self.noise, self.prediction_type)
        return ModelDenoiser(
            self.model_fn(labels),
            self.noise,
            self.prediction_type,
            unconditional=self.model_fn(NULL_LABEL),
            guidance=guidance,
            guidance_rescale=guidance_rescale,
        )


def _check_labels(labels: int | Tensor) -> Tensor:
    tensor = torch.as_tensor(labels, dtype=torch.int64)
    if tensor.ndim > 1 or tensor.numel() == 0:
        raise ValueError("labels must be an int or a non-empty (B,) tensor")
    if ((tensor < 0) | (tensor > NULL_LABEL)).any():
        raise ValueError(f"labels must lie in 0..{NULL_LABEL} ({NULL_LABEL}: unconditional)")
    return tensor


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
    name: str = "digits",
    device: Device = None,
    dtype: torch.dtype = torch.float32,
    directory: DataDir = None,
) -> DigitsModel:
    """Load a bundled digits model by registry name (from package data unless ``directory``).

    The UNet is returned in eval mode with ``requires_grad`` off (gradients still flow to
    its inputs). Raises ``ValueError`` for an unknown name and ``FileNotFoundError`` naming the
    training command when the files are missing.
    """
    from diffusers import UNet2DModel

    if name not in MODELS:
        raise ValueError(f"unknown digits model {name!r}; expected one of {sorted(MODELS)}")
    spec = MODELS[name]
    tensors, config = _read_checkpoint(directory, f"{spec.stem}.safetensors", f"{spec.stem}.json")
    if config.get("model", "digits") != name:
        raise ValueError(f"{spec.stem}.json holds model {config.get('model')!r}, not {name!r}")
    unet = UNet2DModel.from_config(config["unet_config"])
    unet.load_state_dict(tensors, strict=True)
    if dtype != unet.dtype:  # diffusers warns on every `.to(dtype=...)`, even a no-op one
        unet = unet.to(dtype=dtype)
    unet = unet.to(device=device).eval().requires_grad_(False)
    return DigitsModel(
        spec=spec,
        unet=unet,
        scheduler_class=str(config.get("scheduler_class", "DDPMScheduler")),
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


def class_accuracy(classifier: DigitsClassifier, images: Tensor, labels: Tensor | int) -> float:
    """The fraction of ``images`` the classifier assigns to the requested ``labels``: the
    digits analogue of CLIP score for ``digits-cond`` (images clamped to ``[-1, 1]`` first)."""
    _check_images(images)
    requested = _check_labels(labels).expand(images.shape[0]) if isinstance(labels, int) else labels
    if requested.shape != (images.shape[0],):
        raise ValueError(f"need one label per image, got {tuple(requested.shape)} labels")
    weight = classifier.head.weight
    x = images.to(device=weight.device, dtype=weight.dtype).clamp(-1.0, 1.0)
    with torch.no_grad():
        predicted = classifier(x).argmax(dim=1).cpu()
    return (predicted == requested.cpu()).double().mean().item()


# ----------------------------------------------------------------------------- diagnostics

DIAGNOSTIC_TIMESTEPS = (50, 200, 400, 600, 800, 900, 950, 999)


def posterior_mean_error(
    model: DigitsModel,
    timesteps: tuple[int, ...] = DIAGNOSTIC_TIMESTEPS,
    num_samples: int = 256,
    seed: int = 0,
) -> list[dict[str, float]]:
    """The model's error against the exact posterior mean ``E[x0 | x_t]`` of the 1,797 digits.

    At each diffusers ``timestep`` ``n`` (DDPM: trained index, time ``t = (n + 1) / N``; flow:
    ``t = n / N``, diffusers' flow convention), ``num_samples`` digits drawn
    with ``seed`` are noised, ``x_t = alpha x0 + sigma eps``, and the model's ``x0`` (and the
    ``eps`` it implies) is compared with :class:`~stepsearch.testbeds.gaussian_mixture.
    EmpiricalDenoiser`'s, in float64. ``digits-cond`` is measured on its unconditional branch.
    Rows: ``timestep``, ``t``, ``sigma_over_alpha``, ``x0_rms``, ``eps_rms``, ``x0_max_abs``
    (the largest model ``|x0|``) and ``exact_x0_rms_to_data`` (how far the exact mean is from
    the clean digits: the part of the error no model can remove).
    """
    if num_samples < 1:
        raise ValueError("num_samples must be positive")
    data = real_images(torch.float64)
    exact = EmpiricalDenoiser(data, model.noise)
    denoiser = model.denoiser(NULL_LABEL if model.spec.conditional else None)
    generator = torch.Generator().manual_seed(seed)
    total = int(model.noise.num_train_timesteps)
    rows = []
    for timestep in timesteps:
        if not 0 <= timestep < total:
            raise ValueError(f"timestep {timestep} outside 0..{total - 1}")
        t = (timestep + 1) / total if model.spec.family == "ddpm" else timestep / total
        index = torch.randint(0, len(data), (num_samples,), generator=generator)
        x0 = data[index]
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        alpha, sigma = float(model.noise.alpha(t)), float(model.noise.sigma(t))
        x_t = alpha * x0 + sigma * eps
        with torch.no_grad():
            predicted = denoiser(x_t.float(), t).double()
        target = exact(x_t, t)
        rows.append(
            {
                "timestep": timestep,
                "t": t,
                "sigma_over_alpha": sigma / alpha,
                "x0_rms": (predicted - target).pow(2).mean().sqrt().item(),
                "eps_rms": (
                    eps_from_x0(model.noise, x_t, t, predicted)
                    - eps_from_x0(model.noise, x_t, t, target)
                )
                .pow(2)
                .mean()
                .sqrt()
                .item(),
                "x0_max_abs": predicted.abs().max().item(),
                "exact_x0_rms_to_data": (target - x0).pow(2).mean().sqrt().item(),
            }
        )
    return rows


def checkpoint_record(name: str = "digits", directory: DataDir = None) -> dict[str, Any]:
    """A bundled model's JSON record: configs, training metadata and the weights' SHA-256."""
    if name not in MODELS:
        raise ValueError(f"unknown digits model {name!r}; expected one of {sorted(MODELS)}")
    stem = MODELS[name].stem
    _, config = _read_checkpoint(directory, f"{stem}.safetensors", f"{stem}.json")
    return config


def classifier_metadata(directory: DataDir = None) -> dict[str, Any]:
    """The classifier's JSON record: architecture, split, recorded test accuracy, seed."""
    _, config = _read_checkpoint(directory, CLASSIFIER_WEIGHTS, CLASSIFIER_CONFIG)
    return config
