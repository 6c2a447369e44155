"""Train the bundled digits model: a small DDPM UNet and the FD-digits classifier (CPU, seeded).

    python scripts/train_digits.py --out src/stepsearch/data --seed 0

Writes ``digits_unet.{safetensors,json}`` and ``digits_classifier.{safetensors,json}`` into
``--out`` (atomically). The default is a fixed number of UNet epochs, so the same command gives
the same weights (on CPU with the same ``--threads``, which is recorded). With ``--minutes`` the
epoch count is instead fixed after the second epoch from its wall time and recorded; pass it as
``--epochs`` to reproduce such a run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

try:
    from stepsearch import _io
    from stepsearch.testbeds import digits
except ModuleNotFoundError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from stepsearch import _io
    from stepsearch.testbeds import digits

import diffusers
from diffusers import DDPMScheduler, UNet2DModel

FORMAT_VERSION = 1
NUM_TRAIN_TIMESTEPS = 1000
CALIBRATION_EPOCHS = 2  # the first epoch pays one-off kernel set-up; time the second


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--out", type=Path, default=Path("src/stepsearch/data"), help="output directory")
    add("--seed", type=int, default=0, help="seed of every random stream and of the split")
    add("--epochs", type=int, default=90, help="UNet epochs (~8 min on 2 idle cores)")
    add("--minutes", type=float, default=None, help="UNet wall-clock budget (replaces --epochs)")
    add("--batch-size", type=int, default=128, help="UNet batch size")
    add("--lr", type=float, default=1e-3, help="UNet peak learning rate (AdamW)")
    add("--warmup-steps", type=int, default=100, help="UNet linear warm-up steps")
    add("--ema-decay", type=float, default=0.999, help="EMA decay cap of the saved weights")
    add("--classifier-epochs", type=int, default=60, help="classifier epochs")
    add("--classifier-lr", type=float, default=2e-3, help="classifier peak learning rate")
    add("--threads", type=int, default=2, help="torch.set_num_threads (results depend on it)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- helpers


def public_config(config: Any) -> dict[str, Any]:
    """A diffusers config as a plain JSON-ready dict, without the private ``_`` keys."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dict(config).items()
        if not key.startswith("_")
    }


def make_unet() -> UNet2DModel:
    """The 1.62M-parameter 8×8 UNet: channels (32, 64, 64), attention at the 2×2 level."""
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def make_noise_scheduler() -> DDPMScheduler:
    """diffusers' default 1000-step linear betas, epsilon prediction, no x0 clipping."""
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def fit_epochs(seconds_left: float, seconds_per_epoch: float, epochs_done: int) -> int:
    """How many epochs in all fit the budget, given the time left and one epoch's time."""
    return epochs_done + max(0, int(seconds_left / seconds_per_epoch))


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``peak`` at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels per axis, filling with background -1."""
    batch, _, height, width = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator)
    rows = offsets[0, :, None] + torch.arange(height)
    cols = offsets[1, :, None] + torch.arange(width)
    index = torch.arange(batch)[:, None, None]
    return padded[index, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def versions() -> dict[str, str]:
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
    }


def save_checkpoint(out: Path, stem: str, module: nn.Module, record: dict[str, Any]) -> None:
    """Write ``stem.safetensors`` then ``stem.json`` (with the weights' SHA-256), atomically."""
    from safetensors.torch import save as save_safetensors

    tensors = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    blob = save_safetensors(tensors)
    record = {**record, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    for path in (
        _io.atomic_write_bytes(out / f"{stem}.safetensors", blob),
        _io.atomic_write_json(out / f"{stem}.json", record),
    ):
        path.chmod(0o644)  # package data: the temporary file was created private (0600)


# ----------------------------------------------------------------------------- classifier


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    return (model(images).argmax(dim=1) == labels).double().mean().item()


def train_classifier(
    args: argparse.Namespace, images: Tensor, labels: Tensor
) -> tuple[digits.DigitsClassifier, dict[str, Any]]:
    """Train on the stratified split's train part (shift augmentation); score the test part."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train_index, test_index = digits.train_test_split_indices(args.seed)
    rng = np.random.default_rng([args.seed, 1])
    generator = torch.Generator().manual_seed(args.seed + 1)
    model = digits.DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.classifier_lr, weight_decay=1e-4)
    batch_size = 64
    steps_per_epoch = len(train_index) // batch_size
    total_steps = steps_per_epoch * args.classifier_epochs
    step = 0
    for _ in tqdm(range(args.classifier_epochs), desc="classifier", unit="epoch"):
        order = rng.permutation(train_index)
        for first in range(0, steps_per_epoch * batch_size, batch_size):
            batch = torch.from_numpy(order[first : first + batch_size])
            set_learning_rate(optimizer, learning_rate(step, total_steps, args.classifier_lr, 50))
            logits = model(random_shift(images[batch], 1, generator))
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()
    test = torch.from_numpy(test_index)
    train = torch.from_numpy(train_index)
    record = {
        "format_version": FORMAT_VERSION,
        "architecture": model.hyperparameters(),
        "split": {"seed": args.seed, "test_fraction": 0.2, "stratified": True},
        "test_accuracy": accuracy(model, images[test], labels[test]),
        "train_accuracy": accuracy(model, images[train], labels[train]),
        "num_test": len(test_index),
        "seed": args.seed,
        "epochs": args.classifier_epochs,
        "batch_size": batch_size,
        "learning_rate": args.classifier_lr,
        "augmentation": "random shifts of up to 1 pixel per axis",
        "num_parameters": count_parameters(model),
        "num_threads": args.threads,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "versions": versions(),
    }
    return model, record


# ----------------------------------------------------------------------------- diffusion


def diffusion_loss(
    unet: UNet2DModel, x0: Tensor, alphas_cumprod: Tensor, generator: torch.Generator
) -> Tensor:
    """Epsilon-prediction MSE at uniformly drawn training timesteps (Ho et al. 2020, Eq. 14)."""
    t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * eps
    return F.mse_loss(unet(x_t, t).sample, eps)


@torch.no_grad()
def evaluation_loss(
    unet: UNet2DModel, images: Tensor, alphas_cumprod: Tensor, seed: int, repeats: int = 4
) -> float:
    """The loss over all images with fixed noise and timesteps: comparable across runs."""
    generator = torch.Generator().manual_seed(seed)
    losses = [
        diffusion_loss(unet, images[first : first + 128], alphas_cumprod, generator).item()
        * len(images[first : first + 128])
        for _ in range(repeats)
        for first in range(0, len(images), 128)
    ]
    return sum(losses) / (repeats * len(images))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, decay_cap: float) -> None:
    """EMA with warm-up: decay ``min(cap, (1 + step) / (10 + step))``."""
    decay = min(decay_cap, (1.0 + step) / (10.0 + step))
    for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
        averaged.lerp_(current, 1.0 - decay)
    for averaged, current in zip(ema.buffers(), model.buffers(), strict=True):
        averaged.copy_(current)


def train_unet(
    args: argparse.Namespace, images: Tensor
) -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
    """Train the DDPM for ``--epochs`` (or as many as fit ``--minutes``); return EMA weights."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 2])
    generator = torch.Generator().manual_seed(args.seed + 2)
    unet, noise_scheduler = make_unet(), make_noise_scheduler()
    ema = copy.deepcopy(unet).requires_grad_(False)
    alphas_cumprod = noise_scheduler.alphas_cumprod.float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    steps_per_epoch = len(images) // args.batch_size
    epochs = None if args.minutes is not None else args.epochs
    if epochs is None and args.warmup_steps < CALIBRATION_EPOCHS * steps_per_epoch:
        raise SystemExit(f"--minutes needs --warmup-steps >= {CALIBRATION_EPOCHS} epochs of steps")
    progress = tqdm(total=epochs, desc="unet", unit="epoch")
    step, epoch, epoch_losses, epoch_start = 0, 0, [], start
    while epochs is None or epoch < epochs:
        order = torch.from_numpy(rng.permutation(len(images)))
        epoch_losses = []
        for first in range(0, steps_per_epoch * args.batch_size, args.batch_size):
            total_steps = (epochs or CALIBRATION_EPOCHS) * steps_per_epoch  # unused in warm-up
            set_learning_rate(
                optimizer, learning_rate(step, total_steps, args.lr, args.warmup_steps)
            )
            batch = images[order[first : first + args.batch_size]]
            loss = diffusion_loss(unet, batch, alphas_cumprod, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update_ema(ema, unet, step, args.ema_decay)
            epoch_losses.append(loss.item())
            step += 1
        epoch += 1
        now = time.perf_counter()
        if epochs is None and epoch == CALIBRATION_EPOCHS:
            epochs = fit_epochs(args.minutes * 60.0 - (now - start), now - epoch_start, epoch)
            progress.total = epochs
        epoch_start = now
        progress.update(1)
        progress.set_postfix(loss=f"{np.mean(epoch_losses):.4f}")
    progress.close()
    train_time = time.perf_counter() - start
    record = {
        "seed": args.seed,
        "epochs": epochs,
        "minutes_budget": args.minutes,
        "steps": step,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "lr_schedule": f"linear warm-up {args.warmup_steps} steps, cosine to 0.1x",
        "ema_decay": args.ema_decay,
        "ema_warmup": "decay = min(ema_decay, (1 + step) / (10 + step))",
        "final_loss": float(np.mean(epoch_losses)),
        "eval_loss_ema": evaluation_loss(ema, images, alphas_cumprod, args.seed + 3),
        "eval_loss_raw": evaluation_loss(unet, images, alphas_cumprod, args.seed + 3),
        "num_parameters": count_parameters(ema),
        "num_threads": args.threads,
        "wall_time_s": round(train_time, 2),
        "seconds_per_epoch": round(train_time / epochs, 3),
        "dataset": "sklearn.datasets.load_digits, all 1797 images, x / 8 - 1, no augmentation",
        "versions": versions(),
    }
    return ema, noise_scheduler, record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    images, labels = digits.real_images(), digits.real_labels()

    classifier, classifier_record = train_classifier(args, images, labels)
    save_checkpoint(args.out, "digits_classifier", classifier, classifier_record)
    print(f"classifier test accuracy {classifier_record['test_accuracy']:.4f}")

    ema, noise_scheduler, training = train_unet(args, images)
    unet_record = {
        "format_version": FORMAT_VERSION,
        "unet_config": public_config(ema.config),
        "scheduler_config": public_config(noise_scheduler.config),
        "training": training,
    }
    save_checkpoint(args.out, "digits_unet", ema, unet_record)
    print(
        f"unet: {training['epochs']} epochs, final loss {training['final_loss']:.4f}, "
        f"EMA eval loss {training['eval_loss_ema']:.4f}, {training['wall_time_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
