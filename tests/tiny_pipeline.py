"""An offline, random-weight, tiny Stable Diffusion pipeline for integration tests.

Everything is built from configs (no hub access): a UNet2DConditionModel with block_out_channels
(4, 8), an AutoencoderKL with the same widths (32x32 images, 16x16 latents), a 2-layer
CLIPTextModel of width 8 and a CLIPTokenizer read from a hand-written byte-level vocab.json +
merges.txt (transformers 5 ignores ``vocab_file=`` / ``merges_file=`` keywords, so the files are
loaded with ``from_pretrained(directory)``).

The judges of text-to-image runs, offline too: a tiny random CLIP saved like a real one
(:func:`save_tiny_clip`) and a scripted stand-in for the FID Inception file
(:func:`save_stub_inception`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

IMAGE_SIZE = 32
LATENT_SIZE = 16
CROSS_ATTENTION_DIM = 8

SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}
"""Stable Diffusion 1.x's ``scheduler/scheduler_config.json`` (a PNDMScheduler)."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in characters), strict=True))


def write_tokenizer_files(directory: Path) -> Path:
    """A byte-level CLIP vocabulary (every byte alone and word-final, a few merges): 2 + 512 + merges
    tokens, under the text encoder's ``vocab_size`` of 1000."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)]
    merges = [("a", "n"), ("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("c", "a"), ("ca", "t</w>")]
    tokens += [left + right for left, right in merges]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    return directory


def text_config(**extra: Any) -> Any:
    """The 2-layer CLIP text config of width 8 of the tiny pipelines (``extra``: e.g. the
    ``projection_dim`` of SDXL's second encoder)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def tiny_vae() -> Any:
    """The AutoencoderKL of the tiny pipelines: widths (4, 8), 32x32 images, 16x16 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        sample_size=IMAGE_SIZE,
    )


def tiny_components(directory: Path, seed: int = 0) -> dict[str, Any]:
    """UNet, VAE, text encoder and tokenizer of a tiny SD pipeline (no scheduler, no safety
    checker); random weights from ``seed``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=2,
        norm_num_groups=2,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(text_config())
    tokenizer = tiny_tokenizer(directory)
    for module in (unet, vae, text_encoder):
        module.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def tiny_pipeline(directory: Path, scheduler: Any, seed: int = 0) -> Any:
    """A ``StableDiffusionPipeline`` of :func:`tiny_components` with ``scheduler``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **tiny_components(directory, seed),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: Any, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """One prompt, ``output_type="pt"``, 32x32; returns the (1, 3, 32, 32) image tensor."""
    generator = torch.Generator().manual_seed(seed)
    arguments: dict[str, Any] = {
        "prompt": "a cat",
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "guidance_scale": 2.0,
        "output_type": "pt",
        "generator": generator,
    }
    arguments.update(kwargs)
    return pipe(**arguments).images


def tiny_sdxl_pipeline(directory: Path, scheduler: Any, seed: int = 0) -> Any:
    """A ``StableDiffusionXLPipeline`` of the same widths: two text encoders (the second with a
    projection, for SDXL's pooled embedding) concatenated to a cross-attention width of 16, and
    the ``text_time`` added conditioning (pooled text embedding + size / crop ids)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)

    projection = 8
    time_embed = 4
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=2 * CROSS_ATTENTION_DIM,
        attention_head_dim=2,
        norm_num_groups=2,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + projection,
    )
    vae = tiny_vae().eval()
    tokenizer = tiny_tokenizer(directory)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=projection)).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_tokenizer(directory: Path) -> Any:
    """The byte-level tokenizer of :func:`write_tokenizer_files` under ``directory``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(write_tokenizer_files(directory / "tokenizer")), model_max_length=77
    )


def save_tiny_clip(directory: Path) -> Path:
    """A tiny random-weight CLIP (32x32 images, seed 0) saved like a real one (``CLIPModel`` and
    ``CLIPProcessor`` ``save_pretrained``) into ``directory``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update(
            {c + suffix: len(vocab) + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
        )
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=77)
    layers = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={
            **layers,
            "vocab_size": len(vocab),
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**layers, "image_size": 32, "patch_size": 8, "num_attention_heads": 2},
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


class _StubInceptionLayers(torch.nn.Module):
    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).reshape(batch, 12)
        padding = torch.zeros(batch, self.num_features - 24)
        return torch.cat([pooled, pooled.square(), padding], dim=1)


class _StubInception(torch.nn.Module):
    """The interface of inception-2015-12-05.pt (``forward(x in [0, 255], return_features)`` and
    ``layers``) with 24 informative features: 2x2 average pools per channel and their squares,
    then zeros up to ``num_features``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.layers = _StubInceptionLayers(num_features)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128.0) / 128.0)


def save_stub_inception(path: Path, num_features: int = 2048) -> Path:
    """The scripted stand-in for the Inception file at ``path`` (``num_features`` >= 24; the
    real network's 2048, or fewer where the test also sets ``InceptionFeatures.num_features``:
    a Fréchet distance in 2048 dimensions costs seconds on one core)."""
    import warnings

    if num_features < 24:
        raise ValueError(f"num_features must be >= 24, got {num_features}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_StubInception(num_features)), str(path))
    return path
