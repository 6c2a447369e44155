"""``stepsearch stats``: reference feature statistics of real images, for FID."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepsearch.cli import options
from stepsearch.cli._common import console, usage_errors
from stepsearch.cli.checks import check_out_file
from stepsearch.eval.evaluate import compute_statistics


def stats_command(
    images: Annotated[
        Path,
        typer.Argument(
            metavar="IMAGES",
            help="A folder of images (PNG, JPG, ...) or a .safetensors of images.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            metavar="FILE", help="Where to write the statistics (.npz).", parser=check_out_file
        ),
    ],
    features: Annotated[
        str,
        typer.Option(metavar="NAME", help="inception (FID) or digits (FD-digits)."),
    ] = "inception",
    inception_weights: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="inception-2015-12-05.pt (with --features inception)."),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(metavar="N", help="Images per feature batch.", min=1)
    ] = 250,
    device: options.Device = "cpu",
) -> None:
    """Reference statistics (feature mean and covariance, .npz) of real images, for
    `stepsearch eval --metric fid --reference-stats`; written atomically."""
    with usage_errors():
        if out.suffix != ".npz":
            raise ValueError(f"--out must end in .npz, got '{out}'")
        statistics = compute_statistics(images, features, inception_weights, batch_size, device)
        statistics.save(out)
    console.print(
        f"wrote [bold]{out}[/]: {features} features ({statistics.num_features}) "
        f"of {statistics.n} images"
    )
