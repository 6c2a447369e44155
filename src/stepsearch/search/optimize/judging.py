"""The judges of an optimize run: every candidate scored on the selection seed and the report
seed (``judged.json``), the converged reference, the winner's files and sample grid."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from stepsearch._io import atomic_write_bytes, atomic_write_json, run_relative
from stepsearch.eval.objective import Objective, Score
from stepsearch.models import ImageModel, PipelineModel
from stepsearch.models.pipeline import generate_images
from stepsearch.models.source import SampleSource
from stepsearch.schedule_file import ScheduleFile
from stepsearch.search.job import SearchProgress
from stepsearch.search.optimize.candidates import (
    Candidate,
    _write_diffusers_scheduler,
    load_scheduler_dir,
)
from stepsearch.search.optimize.settings import REPORT_SEED, SELECT_SEED, Model, _Run


def _judges(run: _Run) -> dict[str, Objective]:
    """The selection / report objectives: FD (where the source has features) and trajectory
    error, both on seeds 1 (selection) and 2 (report)."""
    metrics = ["traj"]
    if run.source.features is not None and run.source.reference_data is not None:
        metrics.insert(0, "fd")
    return {
        metric: Objective(
            run.source,
            metric,
            num_samples=run.settings.select_samples,
            search_seed=SELECT_SEED,
            held_out_seed=REPORT_SEED,
            held_out_samples=run.settings.held_out_samples,
            cache=run.cache,
            chunk_size=run.settings.chunk_size,
            bootstrap=20,
            progress=run.progress,
        )
        for metric in metrics
    }


def _judge(
    run: _Run, nfe: int, candidates: list[Candidate], judges: dict[str, Objective]
) -> dict[str, dict[str, Any]]:
    """Scores of every candidate on both judges' splits (``judged.json``: reused on resume where
    the candidate and the judges are the same: model, conditioning, seeds, sample counts)."""
    path = run.out / f"nfe-{nfe}" / "judged.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    described = json.dumps({m: j.describe() for m, j in judges.items()}, sort_keys=True)
    judged_by = "sha256:" + hashlib.sha256(described.encode("utf-8")).hexdigest()
    selection = next(iter(judges))
    bar = SearchProgress(
        len(candidates), f"judging NFE {nfe} ({selection}, seed {SELECT_SEED})",
        enabled=run.progress,
    )  # fmt: skip
    first = next(iter(judges.values()))
    results: dict[str, dict[str, Any]] = {}
    with bar.running():
        for index, candidate in enumerate(candidates):
            key = candidate.key()
            entry = stored.get(candidate.label)
            if entry is None or entry.get("key") != key or entry.get("judges") != judged_by:
                entry = {"key": key, "judges": judged_by}
                for split, seed in (("search", SELECT_SEED), ("held_out", REPORT_SEED)):
                    count = first.num_samples if split == "search" else first.held_out_samples
                    samples = candidate.samples(
                        run.model, run.source, count, seed, run.settings.chunk_size
                    )
                    entry["select" if split == "search" else "report"] = {
                        metric: judge.score_samples(samples, nfe, split=split).to_json_dict()
                        for metric, judge in judges.items()
                    }
                stored[candidate.label] = entry
                atomic_write_json(path, stored)
            results[candidate.label] = entry
            bar.update(index + 1, _value(entry["select"][selection]))
    return results


def _value(score: dict[str, Any]) -> float:
    value = score.get("value")
    return math.inf if value is None else float(value)


def _reference(run: _Run, judges: dict[str, Objective]) -> dict[str, Any]:
    """The converged solve's scores on the report seed (its FD is the floor a sampler can reach)."""
    path = run.out / "reference.json"
    traj = judges["traj"]
    key = {name: judge.describe() for name, judge in judges.items()}
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored
    teacher = traj.teacher("held_out")
    spec = traj.teacher_spec
    payload: dict[str, Any] = {"key": key, "sampler": spec.to_json_dict()}
    if "fd" in judges:
        payload["fd"] = (
            judges["fd"].score_samples(teacher, spec.num_steps, split="held_out").to_json_dict()
        )
    atomic_write_json(path, payload)
    return payload


def _write_winner(
    run: _Run, winner: Candidate, scores: dict[str, Any], folder: Path, selection: str
) -> tuple[dict[str, str], int | None]:
    """The winner's scheduler directory, schedule file (with the judges' scores added to its
    provenance) and ``winner.json``."""
    files: dict[str, str] = {}
    prediction = run.source.describe().get("prediction_type")
    steps: int | None = None
    if winner.method is not None:
        assert run.model is not None
        path, steps = _write_diffusers_scheduler(winner, run.model, folder / "scheduler")
        files["scheduler"] = str(path)
    else:
        written = winner.write_scheduler(folder / "scheduler", prediction)
        if written is not None:
            files["scheduler"] = str(written[0])
            steps = written[1]
        assert winner.solver is not None and winner.schedule is not None
        judged = {"selection": scores["select"], "report": scores["report"],
                  "selected_by": selection, "label": winner.label}  # fmt: skip
        if winner.schedule_file is not None:
            provenance = winner.schedule_file.provenance
            provenance = replace(provenance, extra={**provenance.extra, "optimize": judged})
        else:
            judge = next(iter(_judges(run).values()))
            provenance = judge.provenance(
                winner.solver,
                _score(scores["select"][selection]),
                _score(scores["report"][selection]),
                "builtin",
                {"label": winner.label, "spacing": winner.schedule.metadata.get("name")},
                prediction_type=prediction,
                extra={"optimize": judged},
            )
        path = folder / "best_schedule.json"
        ScheduleFile(winner.runs, _conditioned(provenance, run.source)).save(path)
        files["schedule"] = str(path)
    winner_path = folder / "winner.json"
    atomic_write_json(
        winner_path,
        {"label": winner.label, "family": winner.family, "nfe": winner.nfe,
         "num_inference_steps": steps, "partial": winner.partial,
         "files": {role: run_relative(path, folder) for role, path in files.items()},
         "selection": scores["select"], "report": scores["report"]},
    )  # fmt: skip
    files["winner"] = str(winner_path)
    return files, steps


def _conditioned(provenance: Any, source: SampleSource) -> Any:
    """A pipeline's guidance scale, image size and prompts (their digest), a class-conditional
    model's guidance scale and labels, in a provenance."""
    if not getattr(source, "conditional", False):
        return provenance
    changes: dict[str, Any] = {
        "guidance_scale": float(source.guidance_scale),  # type: ignore[attr-defined]
        "extra": {**provenance.extra, "conditioning": source.describe()},
    }
    if isinstance(source, PipelineModel):
        changes["resolution"] = tuple(source.image_size)
    return replace(provenance, **changes)


def _score(payload: dict[str, Any]) -> Score:
    return Score(
        _value(payload), payload.get("std"), str(payload["metric"]), str(payload["split"]),
        int(payload["num_samples"]), int(payload["nfe"]), float(payload.get("seconds", 0.0)),
    )  # fmt: skip


def _grid_samples(
    run: _Run, winner: Candidate, baseline: Candidate, folder: Path, files: dict[str, str]
) -> dict[str, Tensor] | None:
    """The report's sample grid: the first ``grid_rows * grid_cols`` samples of the report seed
    (``samples.safetensors``: ``winner`` and ``baseline``, their ``num_inference_steps`` in its
    metadata, and for a pipeline its guidance scale, size and the grid's prompts), made by the
    written scheduler directories in diffusers' own loop (so the directory loaded into a pipeline
    reproduces them bit for bit); ``None`` for sources without a UNet."""
    if run.model is None or "scheduler" not in files:
        return None
    from safetensors.torch import save

    count = run.settings.grid_rows * run.settings.grid_cols
    prediction = run.source.describe().get("prediction_type")
    made, steps_of = {}, {}
    for role, candidate, directory in (
        ("winner", winner, Path(files["scheduler"])),
        ("baseline", baseline, folder / "baseline_scheduler"),
    ):
        if role == "baseline":
            if candidate.method is not None:
                _write_diffusers_scheduler(candidate, run.model, directory)
            elif candidate.write_scheduler(directory, prediction) is None:
                return None
        scheduler = load_scheduler_dir(directory)
        steps = _inference_steps(candidate, run.model)
        made[role] = _diffusers_loop(run.model, scheduler, steps, count).contiguous()
        steps_of[f"steps_{role}"] = str(steps)
    path = folder / "samples.safetensors"
    metadata = {"seed": str(REPORT_SEED), "count": str(count), **steps_of}
    if isinstance(run.model, PipelineModel):  # what a replay passes the pipeline
        height, width = run.model.image_size
        metadata.update(
            guidance_scale=repr(float(run.model.guidance_scale)), height=str(height),
            width=str(width),
            prompts=json.dumps(run.model.prompts_for(range(count)), ensure_ascii=False),
        )  # fmt: skip
    elif isinstance(run.model, ImageModel) and run.model.conditional:
        labels = run.model.labels_for(range(count))
        assert labels is not None
        metadata.update(
            guidance_scale=repr(float(run.model.guidance_scale)),
            labels=json.dumps(labels.tolist()),
        )
    atomic_write_bytes(path, save(made, metadata=metadata))  # fsynced, then renamed
    files["samples"] = str(path)
    return made


def _diffusers_loop(model: Model, scheduler: Any, steps: int, count: int) -> Tensor:
    """``count`` samples of the report seed in diffusers' own loop with ``scheduler``, in one
    batch: the model's plain denoising loop, or the pipeline's ``__call__`` (decoded images)."""
    if isinstance(model, PipelineModel):
        return generate_images(
            model, scheduler, count, num_inference_steps=steps, seed=REPORT_SEED,
            chunk_size=count, progress=False,
        )  # fmt: skip
    return model.sample_diffusers(scheduler, steps, count, REPORT_SEED, None, count, False)


def _inference_steps(candidate: Candidate, model: Model) -> int:
    if candidate.method is not None:
        found = candidate.method.diffusers_scheduler_for(model.scheduler_config, candidate.nfe)
        assert found is not None
        return found[1]
    assert candidate.schedule is not None
    return candidate.schedule.num_steps
