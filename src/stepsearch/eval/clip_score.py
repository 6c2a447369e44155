"""CLIP score of images against their prompts, computed directly with transformers.

CLIPScore (Hessel et al., EMNLP 2021), with the scale ``w = 100`` used by torchmetrics and most
text-to-image papers:

    CLIP-S = mean_i 100 · max(cos(E_I(image_i), E_T(prompt_i)), 0)

where ``E_I`` / ``E_T`` are CLIP's projected image / text embeddings. The clip at 0 is applied per
sample, as in the paper. torchmetrics 1.9 instead clips the *mean* (``max(mean_i 100 cos_i, 0)``);
the two agree whenever every cosine is positive, which holds for real CLIP models and real prompts.

We do not call torchmetrics' ``CLIPScore``: with transformers 5, ``get_image_features`` returns a
``BaseModelOutputWithPooling`` instead of a tensor and torchmetrics 1.9 fails on it.
:func:`torchmetrics_clip_loader` builds the callable that makes torchmetrics work anyway.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stepsearch.eval.features import clip_embedding_tensor, clip_pixel_values, load_clip

__all__ = ["ClipScorer", "clip_score", "torchmetrics_clip_loader"]


class ClipScorer:
    """Holds a CLIP model and processor; scores (image, prompt) pairs.

    Images: float ``(N, C, H, W)`` in ``[-1, 1]`` or uint8 in ``[0, 255]`` (see
    :mod:`stepsearch.eval.features`), quantized to 8 bits and preprocessed by the model's own image
    processor. Prompts longer than the text model's context are truncated.
    """

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str | os.PathLike[str], *, local_files_only: bool = False
    ) -> ClipScorer:
        """Load from a local directory or hub id (see :func:`stepsearch.eval.features.load_clip`)."""
        model, processor = load_clip(model_name_or_path, local_files_only=local_files_only)
        return cls(model, processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected image embeddings ``(N, projection_dim)``."""
        pixel_values = clip_pixel_values(self.processor, images).to(self.device)
        output = self.model.get_image_features(pixel_values=pixel_values)
        return F.normalize(clip_embedding_tensor(output).double(), dim=-1)

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings ``(N, projection_dim)``."""
        tokens = self.processor.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        output = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return F.normalize(clip_embedding_tensor(output).double(), dim=-1)

    def similarities(
        self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64
    ) -> torch.Tensor:
        """Per-sample cosine similarity of image and prompt embeddings, float64 ``(N,)``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        parts = []
        for start in range(0, len(prompts), batch_size):
            image_emb = self.image_embeddings(images[start : start + batch_size])
            text_emb = self.text_embeddings(prompts[start : start + batch_size])
            parts.append((image_emb * text_emb).sum(dim=-1))
        return torch.cat(parts).cpu()

    def scores(
        self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64
    ) -> torch.Tensor:
        """Per-sample CLIP scores ``100 · max(cos, 0)``, float64 ``(N,)``."""
        return 100.0 * self.similarities(images, prompts, batch_size).clamp(min=0.0)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> float:
        """Mean CLIP score (module docstring)."""
        return float(self.scores(images, prompts, batch_size).mean())


def clip_score(
    images: torch.Tensor,
    prompts: Sequence[str],
    model_name_or_path: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    local_files_only: bool = False,
) -> float:
    """One-shot ``mean_i 100 · max(cos, 0)``; load a :class:`ClipScorer` to score many sets."""
    scorer = ClipScorer.from_pretrained(model_name_or_path, local_files_only=local_files_only)
    return scorer(images, prompts, batch_size)


class _TensorFeaturesCLIP(nn.Module):
    """CLIPModel whose ``get_*_features`` return tensors again (transformers 5 -> torchmetrics)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return clip_embedding_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return clip_embedding_tensor(self.model.get_text_features(*args, **kwargs))


def torchmetrics_clip_loader(model: nn.Module, processor: Any) -> Callable[[], tuple[Any, Any]]:
    """``model_name_or_path`` callable for torchmetrics' ``CLIPScore`` / ``clip_score``.

    torchmetrics 1.9 calls ``.norm`` on ``get_image_features``' result, which transformers 5 made
    an output object; the returned callable yields a wrapper that returns tensors again.
    """
    wrapped = _TensorFeaturesCLIP(model).eval()
    return lambda: (wrapped, processor)
