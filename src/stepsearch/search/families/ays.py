"""The Align Your Steps family: :func:`stepsearch.ays.search.search_ays` (KLUB coordinate search
with early stopping on the objective's search seed) as a direct
:class:`~stepsearch.search.family.SearchFamily`: it keeps its own checkpoint
(``out/ays.ckpt.json``, resumed by a rerun); the runner scores the starting points and writes the
files.

On a text-to-image pipeline the KL upper bound needs (prompt, image) pairs: :meth:`prepare_inputs`
encodes them (``inputs`` = the captioned source and the latents); without them the family is not
applicable there (:meth:`applicable` says why)."""

from __future__ import annotations

import math
import os
from typing import Any

from torch import Tensor

from stepsearch.ays.search import AYSConfig, search_ays
from stepsearch.cache import tensor_digest
from stepsearch.models.pipeline import PipelineModel, encode_images, load_prompt_image_pairs
from stepsearch.search.family import FamilyBase, Found, JobContext

__all__ = ["AYS_NEEDS_DATA", "AYSFamily"]

AYS_NEEDS_DATA = (
    "Align Your Steps skipped: on a text-to-image pipeline its KL upper bound needs (prompt, "
    "image) pairs; pass ays_data= (--data DIR: images with a metadata.jsonl of "
    '{"file_name": ..., "text": ...} lines)'
)


class AYSFamily(FamilyBase):
    """Align Your Steps (Sabour, Fidler & Kreis, ICML 2024)."""

    name = "ays"
    label = "AYS"
    settings_type = AYSConfig
    default_solvers = ("dpm_solver_pp_2m",)
    uses_store = False

    def applicable(self, source: Any, inputs: Any = None) -> str | None:
        if isinstance(source, PipelineModel) and inputs is None:
            return AYS_NEEDS_DATA
        return None

    def prepare_inputs(
        self, source: Any, data: str | os.PathLike[str], progress: bool
    ) -> tuple[Any, Tensor]:
        """The KLUB's source and data on a pipeline: the (prompt, image) pairs of ``data`` resized
        to the source's image size and encoded by its VAE, on a source over the same pipeline
        (same weights, guidance and size) whose prompt ``i`` is pair ``i``'s caption."""
        if not isinstance(source, PipelineModel):
            raise ValueError("ays_data (--data) is for text-to-image pipelines (--pipeline)")
        pairs = load_prompt_image_pairs(data, size=source.image_size)
        captioned = source.with_options(prompts=pairs.prompts, reference_data=None, features=None)
        captioned.check_denoiser()
        latents = encode_images(source.pipeline, pairs.images, progress=progress)
        return captioned, latents

    def inputs_digest(self, inputs: tuple[Any, Tensor]) -> dict[str, Any]:
        """What the pairs change: their captions and their latents."""
        data_source, latents = inputs
        return {
            "prompts": data_source.describe().get("prompts"),
            "latents": "sha256:" + tensor_digest({"data": latents.detach().cpu().contiguous()}),
        }

    def search(self, job: JobContext) -> Found:
        data_source, data = job.inputs or (job.objective.source, None)
        proxies: list[float] = []
        base = len(job.values)

        def on_progress(strategy: str, stage: int, state: Any) -> None:
            proxy = state.history[-1].get("proxy")
            proxies.append(math.nan if proxy is None else float(proxy))
            job.bar.budget = max(job.bar.budget, base + len(proxies))
            job.bar.update(base + len(proxies), math.inf if proxy is None else float(proxy))

        result = search_ays(
            data_source,
            job.solver,
            job.nfe,
            data=data,
            objective=job.objective,
            config=job.settings,
            checkpoint=job.out / "ays.ckpt.json",
            on_progress=on_progress,
            held_out=False,  # the runner scores it after writing it
        )
        return Found(
            result.schedule,
            result.runs[result.chosen].score,
            dict(result.schedule_file.provenance.search["settings"]),
            summary={
                "chosen": result.chosen,
                "klub_evaluations": result.klub_evaluations,
                "best": {"strategy": result.chosen},
            },
            values=[*job.values, *proxies],
            seconds={"ays": result.seconds},
            details=result,
        )
