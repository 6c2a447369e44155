"""Reading images from disk for reference statistics: folders of image files or safetensors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
"""Image files :func:`iter_image_batches` reads from a folder."""


def _read_image(path: Path) -> Tensor:
    """One image file as uint8 ``(C, H, W)``: ``C = 1`` for grey images, else 3 (RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        grey = image.mode in ("1", "L", "LA")
        array = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def image_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`) under ``directory``, recursively, sorted."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under '{root}'")
    return files


def _safetensors_images(path: Path) -> Tensor:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    key = next((k for k in ("samples", "images") if k in tensors), None)
    if key is None and len(tensors) == 1:
        key = next(iter(tensors))
    if key is None:
        raise ValueError(
            f"{path}: expected a tensor named 'samples' or 'images', found {sorted(tensors)}"
        )
    images = tensors[key]
    if images.ndim != 4:
        raise ValueError(f"{path}: images must have shape (N, C, H, W), got {tuple(images.shape)}")
    return images


def _as_model_range(images: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float ``[-1, 1]`` (exactly the same 8-bit levels); floats unchanged."""
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()


def iter_image_batches(
    source: str | os.PathLike[str], batch_size: int = 250, progress: bool = True
) -> Iterator[Tensor]:
    """Batches of float ``(B, C, H, W)`` images in ``[-1, 1]`` from a folder of image files (PNG,
    JPG, ...; read with PIL, grey images as one channel) or a ``.safetensors`` file (a tensor named
    ``samples`` or ``images``, e.g. ``stepsearch eval --save-samples`` output; uint8 ``[0, 255]``
    or float ``[-1, 1]``). Images of different sizes go in different batches.
    """
    path = Path(source)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if path.is_file() and path.suffix == ".safetensors":
        images = _safetensors_images(path)
        for batch in tqdm(images.split(batch_size), desc="reading images", disable=not progress):
            yield _as_model_range(batch)
        return
    if not path.is_dir():
        raise FileNotFoundError(
            f"'{path}' is neither a folder of images nor a .safetensors file of images"
        )
    pending: list[Tensor] = []
    for file in tqdm(image_files(path), desc="reading images", disable=not progress):
        image = _read_image(file)
        if pending and (len(pending) == batch_size or image.shape != pending[0].shape):
            yield _as_model_range(torch.stack(pending))
            pending = []
        pending.append(image)
    if pending:
        yield _as_model_range(torch.stack(pending))
