"""Result tables (JSON, markdown), metric-vs-NFE plots and sample grids."""

from __future__ import annotations

import io
import math
import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stepsearch import __version__
from stepsearch._io import atomic_write_bytes, atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class Cell:
    """One measured (method, NFE) cell. ``method`` names the schedule and solver, e.g.
    ``"stepsearch dpm_solver_pp_2m / logsnr_uniform"`` or ``"diffusers DDIMScheduler (leading)"``."""

    method: str
    nfe: int
    metric: str
    value: float
    std: float | None = None
    num_steps: int | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; elsewhere what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_capability() -> str | None:
    getter = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return getter() if getter is not None else None


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded beside every result. ``cpu_capability`` is the
    instruction set torch's CPU kernels use (e.g. ``AVX2``, ``AVX512``): float results, and so an
    evolutionary search's path, can differ in the last digits between machines that differ there."""
    import diffusers
    import scipy

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_capability": _cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "stepsearch": __version__,
    }


class ResultTable:
    """Cells of one metric across methods and NFEs."""

    def __init__(self, metric: str, cells: Iterable[Cell] = (), lower_is_better: bool = True):
        self.metric = metric
        self.lower_is_better = lower_is_better
        self.cells: list[Cell] = list(cells)

    def add(self, cell: Cell) -> None:
        if cell.metric != self.metric:
            raise ValueError(
                f"cell metric {cell.metric!r} does not match table metric {self.metric!r}"
            )
        self.cells.append(cell)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(cell.method for cell in self.cells))

    @property
    def nfes(self) -> list[int]:
        return sorted({cell.nfe for cell in self.cells})

    def value(self, method: str, nfe: int) -> float | None:
        for cell in self.cells:
            if cell.method == method and cell.nfe == nfe:
                return cell.value
        return None

    def best(self, nfe: int) -> str | None:
        candidates = [
            (c.value, c.method) for c in self.cells if c.nfe == nfe and math.isfinite(c.value)
        ]
        if not candidates:
            return None
        return (min if self.lower_is_better else max)(candidates)[1]

    def to_markdown(self, precision: int = 2) -> str:
        """Methods as rows, NFE as columns; the best value of each column in bold."""
        nfes = self.nfes
        lines = [
            f"| method | {' | '.join(f'NFE {n}' for n in nfes)} |",
            f"| --- |{' ---: |' * len(nfes)}",
        ]
        best = {nfe: self.best(nfe) for nfe in nfes}
        for method in self.methods:
            cells = []
            for nfe in nfes:
                value = self.value(method, nfe)
                if value is None:
                    cells.append("–")
                    continue
                text = f"{value:.{precision}f}"
                cells.append(f"**{text}**" if best[nfe] == method else text)
            lines.append(f"| {method} | {' | '.join(cells)} |")
        return "\n".join(lines) + "\n"

    def to_json_dict(self, **context: Any) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "lower_is_better": self.lower_is_better,
            "cells": [asdict(cell) for cell in self.cells],
            **context,
        }

    @classmethod
    def from_json_dict(cls, payload: dict[str, Any]) -> ResultTable:
        cells = [Cell(**cell) for cell in payload["cells"]]
        return cls(payload["metric"], cells, payload.get("lower_is_better", True))

    def save(
        self, directory: str | os.PathLike[str], stem: str, title: str, **context: Any
    ) -> dict[str, Path]:
        """Write ``stem.json``, ``stem.md`` and ``stem.png`` into ``directory`` (atomically)."""
        directory = Path(directory)
        paths = {
            "json": atomic_write_json(directory / f"{stem}.json", self.to_json_dict(**context)),
            "md": atomic_write_text(
                directory / f"{stem}.md", f"## {title}\n\n{self.to_markdown()}"
            ),
        }
        paths["png"] = plot_metric_vs_nfe(self, directory / f"{stem}.png", title)
        return paths


def plot_metric_vs_nfe(table: ResultTable, path: str | os.PathLike[str], title: str) -> Path:
    """One line per method, NFE on x, the metric on a log y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = table.methods
    height = max(4.8, 0.2 * len(methods) + 1.0)  # the legend sits beside the axes
    figure, axis = plt.subplots(figsize=(11.5, height), dpi=110)
    markers = "osD^v<>pX*"
    for index, method in enumerate(methods):
        points = sorted(
            (c.nfe, c.value) for c in table.cells if c.method == method and math.isfinite(c.value)
        )
        if not points:
            continue
        nfes, values = zip(*points, strict=True)
        style = "--" if method.startswith("diffusers") else "-"
        axis.plot(nfes, values, style, marker=markers[index // 10 % len(markers)], label=method)
    axis.set_xlabel("NFE (model evaluations)")
    axis.set_ylabel(table.metric)
    if all(c.value > 0 for c in table.cells if math.isfinite(c.value)):
        axis.set_yscale("log")
    axis.set_xticks(table.nfes)
    axis.grid(True, which="both", alpha=0.3)
    axis.set_title(title)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def image_grid(
    images: Tensor, nrow: int, padding: int = 1, value_range: tuple[float, float] = (-1.0, 1.0)
) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images into one uint8 ``(H', W', 3)`` array."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    low, high = value_range
    scaled = ((images.detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    if scaled.shape[1] == 1:
        scaled = scaled.expand(-1, 3, -1, -1)
    count, _, height, width = scaled.shape
    ncol = min(nrow, count)
    rows = math.ceil(count / ncol)
    grid = torch.ones(3, rows * (height + padding) + padding, ncol * (width + padding) + padding)
    for k in range(count):
        r, c = divmod(k, ncol)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[:, top : top + height, left : left + width] = scaled[k, :3]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_sample_grid(
    rows: Sequence[tuple[str, Tensor]],
    path: str | os.PathLike[str],
    title: str = "",
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """A labelled figure: one row of images per ``(label, images)`` pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(rows), 1, figsize=(8, 0.9 * len(rows) + 0.6), dpi=120, squeeze=False
    )
    for axis, (label, images) in zip(axes[:, 0], rows, strict=True):
        axis.imshow(
            image_grid(images, nrow=images.shape[0], value_range=value_range),
            interpolation="nearest",
        )
        axis.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())
