"""Feature extractors for FID / KID / CLIP metrics, and a batching helper.

Every extractor is a ``torch.nn.Module`` mapping a batch of images to ``(B, F)`` float features and
carrying an integer attribute ``num_features`` (``F``), the contract that torchmetrics'
``FrechetInceptionDistance(feature=module)`` and our :mod:`stepsearch.eval.fid` both accept. Any
module that keeps it works, e.g. ``stepsearch.testbeds.digits.DigitsFeatureExtractor``.

Image convention (all extractors here): a float tensor ``(B, C, H, W)`` with values in ``[-1, 1]``
(the range diffusion models produce), or a ``uint8`` tensor with values in ``[0, 255]``; ``C`` is 1
(grey, repeated to RGB) or 3. Float images are quantized to 8-bit levels first, like the PNG files
every published FID is computed from (EDM: ``(x * 127.5 + 128).clip(0, 255).to(uint8)``).

Nothing here downloads anything unless asked to: missing weights raise a ``RuntimeError`` that names
the file that is needed and how to pass it. ``transformers`` is imported only when a CLIP model is
loaded.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import urllib.request
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INCEPTION_ENV_VAR",
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "ClipFeatures",
    "InceptionFeatures",
    "ensure_features",
    "find_inception_weights",
    "load_clip",
    "to_uint8_levels",
]

INCEPTION_FILENAME = "inception-2015-12-05.pt"
"""TorchScript port of the TF Inception-v3 FID network (NVIDIA; used by clean-fid and StyleGAN)."""
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    + INCEPTION_FILENAME
)
INCEPTION_ENV_VAR = "STEPSEARCH_INCEPTION_WEIGHTS"
INCEPTION_SIZE = 299

ImageBatches = torch.Tensor | np.ndarray | Iterable[torch.Tensor]


def to_uint8_levels(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """Map images to float values in ``[0, 255]`` (8-bit levels when ``quantize``).

    ``uint8`` input is taken as ``[0, 255]``; floating input as ``[-1, 1]`` and mapped with EDM's
    ``x * 127.5 + 128`` then clipped and, if ``quantize``, floored to integer levels.
    """
    if images.dtype == torch.uint8:
        return images.float()
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    levels = (images.float() * 127.5 + 128.0).clamp(0.0, 255.0)
    return levels.floor() if quantize else levels


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    channels = images.shape[1]
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    return images


# ----------------------------------------------------------------------------------------------
# Inception-v3 (FID network)


def _default_inception_locations() -> list[Path]:
    """Where a copy may already lie: clean-fid's download cache, then ours."""
    clean_fid_dir = Path("./") if platform.system() == "Windows" else Path("/tmp")
    return [
        clean_fid_dir / INCEPTION_FILENAME,
        Path.home() / ".cache" / "stepsearch" / INCEPTION_FILENAME,
    ]


def _explicit_weights_file(path: str | os.PathLike[str]) -> Path:
    candidate = Path(path).expanduser()
    return candidate / INCEPTION_FILENAME if candidate.is_dir() else candidate


def find_inception_weights(weights_path: str | os.PathLike[str] | None = None) -> Path | None:
    """Locate ``inception-2015-12-05.pt`` without touching the network.

    Order: ``weights_path`` (a file, or a directory holding the file; when given, nothing else is
    searched), the environment variable ``STEPSEARCH_INCEPTION_WEIGHTS``, clean-fid's cache
    (``/tmp/inception-2015-12-05.pt``), ``~/.cache/stepsearch/inception-2015-12-05.pt``.
    Returns ``None`` when no file exists.
    """
    if weights_path is not None:
        candidate = _explicit_weights_file(weights_path)
        return candidate if candidate.is_file() else None
    from_env = os.environ.get(INCEPTION_ENV_VAR)
    if from_env:
        candidate = _explicit_weights_file(from_env)
        return candidate if candidate.is_file() else None
    return next((c for c in _default_inception_locations() if c.is_file()), None)


def _missing_inception_error(weights_path: str | os.PathLike[str] | None) -> RuntimeError:
    from_env = os.environ.get(INCEPTION_ENV_VAR)
    if weights_path is not None:
        where = f"'{_explicit_weights_file(weights_path)}' does not exist"
    elif from_env:
        where = (
            f"${INCEPTION_ENV_VAR} gives '{_explicit_weights_file(from_env)}', which does not exist"
        )
    else:
        searched = ", ".join(str(p) for p in _default_inception_locations())
        where = f"not found (${INCEPTION_ENV_VAR} is unset; searched {searched})"
    return RuntimeError(
        f"Inception FID weights are missing: {where}. The file needed is '{INCEPTION_FILENAME}' "
        f"(TorchScript), from {INCEPTION_URL} . Download it on a machine with internet and "
        f"pass it as InceptionFeatures(weights_path='/path/to/{INCEPTION_FILENAME}') (a directory "
        f"holding it also works), or set ${INCEPTION_ENV_VAR} to that path, or use "
        "InceptionFeatures(download=True) where the network is reachable."
    )


def _download_inception(timeout_s: float) -> Path:
    target = _default_inception_locations()[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with (
            os.fdopen(handle, "wb") as file,
            urllib.request.urlopen(INCEPTION_URL, timeout=timeout_s) as response,
        ):
            shutil.copyfileobj(response, file)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


class InceptionFeatures(nn.Module):
    """The standard FID Inception-v3 pool features (2048-d), from a local TorchScript file.

    The network is NVIDIA's TorchScript port of the TensorFlow Inception graph used by the original
    FID (Heusel et al., NeurIPS 2017, "GANs Trained by a Two Time-Scale Update Rule ...") and loaded
    the same way as clean-fid (Parmar et al., CVPR 2022, "On Aliased Resizing and Surprising
    Subtleties in GAN Evaluation"). Input: see the module docstring (float ``[-1, 1]`` or uint8).

    Args:
        weights_path: ``inception-2015-12-05.pt`` or a directory holding it; when ``None``, the
            places listed in :func:`find_inception_weights` are searched.
        resize: ``"legacy_tensorflow"`` (default) lets the network resize to 299x299 with its
            TF1-compatible bilinear filter, as EDM / StyleGAN / the original TF FID do, so numbers
            compare with published FIDs and reference statistics such as EDM's ``cifar10-32x32.npz``.
            ``"clean"`` resizes outside with PIL-equivalent antialiased bicubic (clean-fid's
            "clean" mode); the two give different FIDs, so never mix them in one comparison.
        download: fetch the file into ``~/.cache/stepsearch`` when it is missing (default: never).
        download_timeout_s: network timeout of that download.

    Raises:
        RuntimeError: the weights file is absent (and not downloaded); the message names the file
            and how to pass it.
    """

    num_features: int = 2048

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        *,
        resize: Literal["legacy_tensorflow", "clean"] = "legacy_tensorflow",
        download: bool = False,
        download_timeout_s: float = 60.0,
    ) -> None:
        super().__init__()
        if resize not in ("legacy_tensorflow", "clean"):
            raise ValueError(f"resize must be 'legacy_tensorflow' or 'clean', got {resize!r}")
        path = find_inception_weights(weights_path)
        if path is None and download and weights_path is None:
            try:
                path = _download_inception(download_timeout_s)
            except OSError as error:
                raise RuntimeError(
                    f"{_missing_inception_error(None)} (download failed: {error})"
                ) from error
        if path is None:
            raise _missing_inception_error(weights_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.14 deprecates jit
            warnings.simplefilter("ignore", FutureWarning)
            self.network = torch.jit.load(str(path), map_location="cpu").eval()
        self.weights_file = path
        self.resize = resize

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stay in evaluation mode whatever is asked (the network has batch norm)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(iter(self.network.parameters()), torch.empty(0)).device
        levels = _as_rgb(to_uint8_levels(images.to(device)))
        batch = levels.shape[0]
        if self.resize == "legacy_tensorflow":
            features = self.network(levels, return_features=True)
        else:
            if levels.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                levels = F.interpolate(
                    levels,
                    size=(INCEPTION_SIZE, INCEPTION_SIZE),
                    mode="bicubic",
                    align_corners=False,
                    antialias=True,
                ).clamp(0.0, 255.0)
            features = self.network.layers.forward((levels - 128.0) / 128.0)
        return features.reshape(batch, self.num_features).float()


# ----------------------------------------------------------------------------------------------
# CLIP


def _looks_like_filesystem_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or Path(name).is_absolute()


def load_clip(
    model_name_or_path: str | os.PathLike[str],
    *,
    local_files_only: bool = False,
    with_tokenizer: bool = True,
) -> tuple[Any, Any]:
    """Load a transformers ``CLIPModel`` and its processor (``CLIPProcessor``, or only the
    ``CLIPImageProcessor`` when ``with_tokenizer`` is false), in eval mode.

    ``model_name_or_path`` is a local directory (``save_pretrained`` output: config.json, weights,
    processor config; plus vocab.json / merges.txt or tokenizer.json for text) or a hub id such as
    ``openai/clip-vit-large-patch14`` (downloaded unless ``local_files_only`` or ``HF_HUB_OFFLINE``).
    A path that does not exist is never looked up on the network.

    Raises:
        RuntimeError: the model cannot be loaded; the message says what is needed.
    """
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    name = os.fspath(model_name_or_path)
    local = Path(name).expanduser()
    if not local.exists() and (
        isinstance(model_name_or_path, os.PathLike) or _looks_like_filesystem_path(name)
    ):
        raise RuntimeError(
            f"CLIP model directory '{local}' does not exist. Pass a directory written by "
            "CLIPModel.save_pretrained + CLIPProcessor.save_pretrained (config.json, "
            "model.safetensors, processor/preprocessor config, vocab.json + merges.txt), e.g. made "
            "on a machine with internet from 'openai/clip-vit-large-patch14'."
        )
    source = str(local) if local.exists() else name
    processor_class = CLIPProcessor if with_tokenizer else CLIPImageProcessor
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=local_files_only)
        processor = processor_class.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        kind = "local directory" if local.exists() else "hub id"
        raise RuntimeError(
            f"Could not load CLIP model from {kind} '{source}' ({type(error).__name__}: {error}). "
            "Offline, pass a local directory holding config.json, model.safetensors, the "
            "processor config and (for text) vocab.json + merges.txt or tokenizer.json."
        ) from error
    return model.eval(), processor


def clip_embedding_tensor(output: Any) -> torch.Tensor:
    """The projected embedding from ``get_image_features`` / ``get_text_features``.

    transformers < 5 returns a tensor; transformers 5 returns a ``BaseModelOutputWithPooling``
    whose ``pooler_output`` holds the projected embedding.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"cannot find a CLIP embedding in {type(output).__name__}")
    return pooled


def clip_pixel_values(processor: Any, images: torch.Tensor) -> torch.Tensor:
    """Run the CLIP image processor (resize, center crop, normalize) on 8-bit images."""
    levels = _as_rgb(to_uint8_levels(images.detach())).to("cpu", torch.uint8)
    image_processor = getattr(processor, "image_processor", processor)
    processed = image_processor(
        images=list(levels), return_tensors="pt", input_data_format="channels_first"
    )
    return processed["pixel_values"]


class ClipFeatures(nn.Module):
    """CLIP image embeddings (Radford et al., ICML 2021) with transformers, ``(B, projection_dim)``.

    Images (convention above) go through the model's own ``CLIPImageProcessor`` as 8-bit images,
    exactly as for a PNG on disk. Useful for FD in CLIP space (Kynkäänniemi et al., ICLR 2023).

    Args:
        model_name_or_path: local directory or hub id, see :func:`load_clip`.
        local_files_only: never use the network.
        normalize: return unit-norm embeddings.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike[str],
        *,
        local_files_only: bool = False,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        model, processor = load_clip(
            model_name_or_path, local_files_only=local_files_only, with_tokenizer=False
        )
        self.model = model
        self.processor = processor
        self.normalize = normalize
        self.num_features = int(model.config.projection_dim)

    def train(self, mode: bool = True) -> ClipFeatures:
        """Stay in evaluation mode."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixel_values = clip_pixel_values(self.processor, images).to(device)
        embedding = clip_embedding_tensor(self.model.get_image_features(pixel_values=pixel_values))
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        return embedding.float()


# ----------------------------------------------------------------------------------------------
# Batching


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def _batches(images: ImageBatches, batch_size: int) -> tuple[Iterator[torch.Tensor], int | None]:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        if images.ndim < 2:
            raise ValueError(f"images must be batched (N, ...), got shape {tuple(images.shape)}")
        chunks = images.split(batch_size)
        return iter(chunks), len(chunks)
    total = len(images) if hasattr(images, "__len__") else None
    return iter(images), total


def ensure_features(
    images: ImageBatches,
    extractor: nn.Module,
    batch_size: int = 250,
    progress: bool = True,
    *,
    desc: str = "features",
) -> np.ndarray:
    """Features ``(N, F)`` float64 of ``images`` through ``extractor``, batched, under no-grad.

    ``images`` is a tensor / array ``(N, ...)`` cut into ``batch_size`` chunks, or an iterable of
    batches (e.g. a sampler's output, a DataLoader), taken as they come. Each batch is moved to the
    extractor's device; the extractor runs in eval mode (its mode is restored afterwards). Outputs
    are flattened to ``(B, F)``; ``F`` is checked against ``extractor.num_features`` when present.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from stepsearch._progress import progress_bar

    batches, total = _batches(images, batch_size)
    device = _module_device(extractor)
    expected = getattr(extractor, "num_features", None)
    expected = int(expected) if expected is not None else None
    was_training = extractor.training
    extractor.eval()
    chunks: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for batch in progress_bar(
                batches, total=total, desc=desc, disable=not progress, leave=False
            ):
                batch = torch.as_tensor(batch)
                features = extractor(batch if device is None else batch.to(device))
                features = features.reshape(features.shape[0], -1)
                if expected is not None and features.shape[1] != expected:
                    raise ValueError(
                        f"extractor returned {features.shape[1]} features, but its "
                        f"num_features is {expected}"
                    )
                chunks.append(features.detach().to("cpu", torch.float64).numpy())
    finally:
        extractor.train(was_training)
    if not chunks:
        raise ValueError("no images given")
    return np.concatenate(chunks, axis=0)
