"""The guidance schedule of an optimize run (``optimize(..., guidance_schedule=...)``,
``stepsearch optimize --guidance-schedule search|FILE``).

A class-conditional model (or a pipeline, with a file) can sample with a classifier-free guidance
weight per noise level (:class:`~stepsearch.guidance.GuidanceSchedule`) instead of one scale. The
run's sample source then carries it, so every sampler of the run - searched or diffusers built-in -
samples with it, and the run's fingerprint and schedule files name it.

- A **file** (``guidance.json``) is loaded and used as it is.
- **search** runs :func:`~stepsearch.search.guidance.search_guidance` first, in ``out/guidance/``:
  the guidance shape and step spacing searched jointly at twice the run's largest NFE in network
  passes (a guided step costs two), the run's search / selection / report sample counts and seeds
  (0, 1, 2), the pick (lowest FD at accuracy >= constant guidance at the model's own weight, on
  the selection seed) used by the whole run. The report's ``guidance`` section says what it bought:
  the pick and constant guidance at the model's weight on the report seed. A rerun reads the
  finished search back from ``out/guidance/result.json``; with many workers
  (``storage=``) one worker runs it as a task of the run's study and the others read its files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepsearch.guidance import GuidanceSchedule, load_guidance
from stepsearch.models.source import SampleSource
from stepsearch.search.guidance import GuidanceSearchSettings, search_guidance

__all__ = [
    "GUIDANCE_SOLVER",
    "RunGuidance",
    "file_entry",
    "resolve_guidance",
    "run_guidance_search",
]

GUIDANCE_SOLVER = "dpm_solver_pp_2m"
"""The solver the guidance search samples with (the guidance schedule is on the noise level, so it
transfers to the run's other solvers and step counts)."""

FOLDER = "guidance"


@dataclass(frozen=True)
class RunGuidance:
    """What a run does about its guidance schedule (:func:`resolve_guidance`)."""

    origin: str
    """``file`` or ``search``."""
    fingerprint: dict[str, Any]
    """What the run's fingerprint records of it."""
    schedule: GuidanceSchedule | None = None
    """The schedule of a file (a search's is known once it ran)."""
    passes: int | None = None
    """A search's budget of network passes per sample."""
    settings: GuidanceSearchSettings | None = None
    path: str | None = None
    """Where a file came from (the report names it; the fingerprint holds its content)."""

    def apply(self, source: SampleSource, schedule: GuidanceSchedule) -> SampleSource:
        """``source`` sampling with ``schedule``."""
        if hasattr(source, "with_options"):  # a pipeline
            return source.with_options(guidance_schedule=schedule)
        return dataclasses.replace(source, guidance_schedule=schedule)  # type: ignore[type-var]


def resolve_guidance(
    source: SampleSource,
    choice: str | os.PathLike[str] | GuidanceSchedule,
    nfes: Sequence[int],
    settings: GuidanceSearchSettings | None = None,
) -> RunGuidance:
    """Check ``choice`` (``"search"``, a guidance file, a schedule) against ``source`` before
    anything is written; ``ValueError`` names what does not fit."""
    if not hasattr(source, "guidance_schedule"):
        raise ValueError(
            f"--guidance-schedule needs a class-conditional model or a pipeline; "
            f"{source.identity.name!r} has no guidance"
        )
    conditional = getattr(source, "conditional", True)
    if not conditional:
        raise ValueError(
            f"--guidance-schedule needs a class-conditional model (--model digits-cond) or a "
            f"pipeline; {source.identity.name!r} is unconditional"
        )
    if isinstance(choice, str) and choice == "search":
        if getattr(source, "classifier", None) is None:
            raise ValueError(
                "--guidance-schedule search needs a class-conditional model with a classifier "
                "(--model digits-cond); for a pipeline run `stepsearch search guidance` and pass "
                "its guidance.json"
            )
        settings = settings or GuidanceSearchSettings()
        passes = 2 * max(int(n) for n in nfes)
        fingerprint = {
            "origin": "search",
            "unet_passes": passes,
            "solver": GUIDANCE_SOLVER,
            "settings": settings.to_json_dict(),
        }
        return RunGuidance("search", fingerprint, passes=passes, settings=settings)
    if isinstance(choice, GuidanceSchedule):
        schedule, path = choice, None
    else:
        schedule, path = load_guidance(choice), str(choice)
    made_for = schedule.provenance.get("model") if schedule.provenance else None
    if made_for is not None and made_for != source.identity.to_json_dict():
        raise ValueError(
            f"guidance schedule {path or ''!s} was searched for another model "
            f"({made_for.get('name')!r}, not {source.identity.name!r}): its weights fit that "
            "model's guidance; search one for this model (stepsearch search guidance)"
        )
    fingerprint = {
        "origin": "file",
        "schedule": {"shape": schedule.shape, "parameters": dict(schedule.parameters)},
    }
    return RunGuidance("file", fingerprint, schedule=schedule, path=path)


def run_guidance_search(
    source: SampleSource,
    guidance: RunGuidance,
    out: Path,
    counts: dict[str, int],
    seeds: dict[str, int],
    progress: bool,
    shared: Callable[[str, Callable[[], dict[str, Any]]], None] | None = None,
) -> tuple[GuidanceSchedule, dict[str, Any]]:
    """The searched schedule and the report's ``guidance`` entry: read back from
    ``out/guidance/result.json`` when it is this search's, else searched (through ``shared(key,
    work)`` with many workers: one runs ``work``, every worker gets its files)."""
    folder = out / FOLDER
    assert guidance.settings is not None and guidance.passes is not None

    def finished() -> dict[str, Any] | None:
        path = folder / "result.json"
        if not path.is_file():
            return None
        summary = json.loads(path.read_text())
        same = (
            summary.get("unet_passes") == guidance.passes
            and summary.get("search", {}).get("settings") == guidance.settings.to_json_dict()
            and summary.get("model") == source.identity.to_json_dict()
            and summary.get("seeds") == seeds
            and summary["held_out"]["pick"]["num_samples"] == counts["held_out_samples"]
        )
        return summary if same else None

    def work() -> dict[str, Any]:
        if finished() is None:
            search_guidance(
                source, GUIDANCE_SOLVER, guidance.passes, folder, settings=guidance.settings,
                num_samples=counts["num_samples"], select_samples=counts["select_samples"],
                held_out_samples=counts["held_out_samples"], search_seed=seeds["search"],
                select_seed=seeds["select"], held_out_seed=seeds["held_out"],
                progress=progress,
            )  # fmt: skip
        names = ("guidance.json", "result.json")
        return {"files": {f"{FOLDER}/{n}": (folder / n).read_text() for n in names}}

    if finished() is None:
        if shared is not None:
            shared("guidance", work)
        else:
            work()
    summary = finished()
    assert summary is not None, "the guidance search wrote its result"
    schedule = load_guidance(folder / "guidance.json")
    default = summary["reference"]["parameters"]["weight"]
    entry = {
        "origin": "search",
        "schedule": schedule.describe(),
        "file": f"{FOLDER}/guidance.json",
        "unet_passes": guidance.passes,
        "solver": GUIDANCE_SOLVER,
        "num_steps": summary["num_steps"],
        "pick_rule": summary["pick_rule"],
        "default_weight": default,
        "held_out": {
            "pick": summary["held_out"]["pick"],
            f"constant w={default:g}": summary["held_out"][f"constant w={default:g}"],
        },
        "seed": seeds["held_out"],
    }
    return schedule, entry


def file_entry(guidance: RunGuidance) -> dict[str, Any]:
    """The report's ``guidance`` entry for a schedule given to the run."""
    assert guidance.schedule is not None
    return {
        "origin": "file",
        "schedule": guidance.schedule.describe(),
        "file": guidance.path,
    }
