"""Seed-deterministic sample generation, optionally split across processes with ``accelerate``.

Sample ``i`` always starts from the noise of its own generator, seeded from ``(seed, i)``; samples are
generated in fixed chunks of ``chunk_size`` indices handed round-robin to the processes. So the set of
images is the same whatever the number of processes (``accelerate launch --num_processes K``) and
the same for every candidate schedule (common random numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch._progress import progress_bar
from stepsearch.schedule import StepSchedule
from stepsearch.solvers.base import Solver, schedule_facts


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of sample ``index`` under ``seed`` (independent streams via SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def unit_noise(
    indices: Sequence[int], shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normal noise of shape ``(len(indices), *shape)``, row ``k`` from sample ``indices[k]``."""
    rows = [
        torch.randn(tuple(shape), generator=sample_generator(seed, i), dtype=dtype) for i in indices
    ]
    return torch.stack(rows) if rows else torch.empty(0, *shape, dtype=dtype)


def chunks_for_process(
    num_samples: int, chunk_size: int, process_index: int = 0, num_processes: int = 1
) -> list[range]:
    """The index chunks process ``process_index`` of ``num_processes`` generates."""
    if num_samples < 0 or chunk_size < 1:
        raise ValueError("need num_samples >= 0 and chunk_size >= 1")
    chunks = [
        range(start, min(start + chunk_size, num_samples))
        for start in range(0, num_samples, chunk_size)
    ]
    return chunks[process_index::num_processes]


def _distributed(accelerator: Any | None) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return int(accelerator.process_index), int(accelerator.num_processes)


def generate_chunks(
    make_chunk: Callable[[range], Tensor],
    num_samples: int,
    chunk_size: int = 250,
    accelerator: Any | None = None,
    progress: bool | str = True,
) -> Tensor:
    """Run ``make_chunk(indices) -> samples`` over all chunks (this process's share), gather the
    results from every process and return all ``num_samples`` samples in index order."""
    process_index, num_processes = _distributed(accelerator)
    mine = chunks_for_process(num_samples, chunk_size, process_index, num_processes)
    description = progress if isinstance(progress, str) else "sampling"
    show = bool(progress) and process_index == 0
    results = [
        (chunk.start, make_chunk(chunk).cpu())
        for chunk in progress_bar(mine, desc=description, disable=not show, leave=False)
    ]
    if num_processes > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    results.sort(key=lambda item: item[0])
    if not results:
        raise ValueError("num_samples must be positive")
    return torch.cat([samples for _, samples in results])


def generate_with_diffusers_scheduler(
    model: Callable[[Tensor, Tensor], Tensor] | None,
    scheduler: Any,
    num_inference_steps: int,
    num_samples: int,
    sample_shape: Sequence[int],
    *,
    seed: int = 0,
    chunk_size: int = 250,
    device: torch.device | str = "cpu",
    accelerator: Any | None = None,
    progress: bool | str = True,
    conditioned: Callable[[range], Callable[[Tensor, Tensor], Tensor]] | None = None,
) -> tuple[Tensor, int]:
    """The plain diffusers loop (``set_timesteps``, ``scale_model_input``, ``step``) with the same
    per-index noise, for side-by-side baselines. Returns samples and the NFE used.

    ``model(x, timestep) -> output`` serves every sample; a conditional model is given as
    ``conditioned(indices) -> model`` instead (``model=None``): the network of one chunk of sample
    indices, with their labels or prompts and guidance applied to its output. Schedulers without
    ``init_noise_sigma`` / ``scale_model_input`` (``FlowMatchEulerDiscreteScheduler``) start from
    the unit noise and feed the model ``x`` unscaled, as diffusers' flow pipelines do.
    """
    if (model is None) == (conditioned is None):
        raise ValueError("give a model or a conditioned(indices) -> model, not both")
    scheduler.set_timesteps(num_inference_steps)
    nfe = len(scheduler.timesteps)
    init_noise_sigma = getattr(scheduler, "init_noise_sigma", 1.0)
    scale_model_input = getattr(scheduler, "scale_model_input", lambda x, timestep: x)

    def make_chunk(indices: range) -> Tensor:
        network = model if conditioned is None else conditioned(indices)
        assert network is not None
        scheduler.set_timesteps(num_inference_steps)
        x = unit_noise(indices, sample_shape, seed).to(device) * init_noise_sigma
        with torch.inference_mode():
            for timestep in scheduler.timesteps:
                model_input = scale_model_input(x, timestep)
                output = network(model_input, timestep.expand(x.shape[0]).to(device))
                x = scheduler.step(output, timestep, x, return_dict=False)[0]
        return x

    return generate_chunks(make_chunk, num_samples, chunk_size, accelerator, progress), nfe


def steps_for_nfe(
    solver: Solver, make_schedule: Callable[[int], StepSchedule], nfe: int
) -> int | None:
    """``solver.num_steps_for_nfe(nfe)`` (the one NFE -> step-count rule) with the clean end and
    ``alpha = 0`` start of the schedules ``make_schedule`` makes (read from ``make_schedule(1)``),
    or ``None`` where no step count spends exactly ``nfe`` (e.g. Heun with a clean end spends
    ``2 n - 1``)."""
    _, clean_end, alpha_zero_start = schedule_facts(make_schedule(1), None, None)
    try:
        return solver.num_steps_for_nfe(nfe, clean_end=clean_end, alpha_zero_start=alpha_zero_start)
    except ValueError:
        return None
