"""The model of an optimize run: a bundled model, a local UNet directory, a text-to-image
pipeline (with its prompts and guidance scale) or any sample source."""

from __future__ import annotations

from pathlib import Path

from stepsearch.models import ImageModel, PipelineModel, load_model
from stepsearch.models.source import SampleSource
from stepsearch.search.optimize.settings import Model
from stepsearch.testbeds import digits


def _resolve_model(
    model: str | Path | Model | SampleSource,
    device: str,
    guidance_scale: float | None = None,
    dtype: str | None = None,
) -> SampleSource:
    """The run's one model object: a loaded :class:`ImageModel` / :class:`PipelineModel` (each a
    sample source that also runs diffusers' loop; its network in ``dtype``), or the sample source
    given."""
    if guidance_scale is not None and not isinstance(model, (str, Path)):
        raise ValueError(
            "guidance_scale goes with a model name (--model digits-cond) or --pipeline"
        )
    if dtype is not None and not isinstance(model, (str, Path)):
        raise ValueError("--dtype goes with a model name or directory (--model) or --pipeline")
    if isinstance(model, PipelineModel):
        model.noise  # noqa: B018 - a flow-matching config fails here, before any work
        model.check_denoiser()
        return model
    if isinstance(model, (str, Path)):
        spec = str(model)
        if spec not in digits.MODELS:
            root = Path(spec)
            if not root.is_dir():
                raise ValueError(
                    f"--model {spec}: expected 'digits' or a local diffusers model directory"
                )
            if not any(
                p.is_file()
                for p in (root / "scheduler" / "scheduler_config.json",
                          root / "scheduler_config.json")
            ):  # fmt: skip
                raise ValueError(
                    f"--model {spec}: no scheduler config (scheduler_config.json at its root or in "
                    "scheduler/): the noise schedule the model was trained on is needed"
                )
        loaded = load_model(spec, device=device, guidance_scale=guidance_scale, torch_dtype=dtype)
        assert isinstance(loaded, ImageModel)
        return loaded
    return model


def _is_conditional(source: SampleSource) -> bool:
    """A pipeline (prompts) or a class-conditional model (labels), both guided."""
    return bool(getattr(source, "conditional", False))
