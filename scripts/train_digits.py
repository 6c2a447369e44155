"""Train the bundled digits models and the FD-digits classifier (CPU, seeded).

    python scripts/train_digits.py --out src/stepsearch/data --seed 0 --threads 1
    python scripts/train_digits.py --models digits-flow --threads 1   # one model only

``--models`` picks from ``classifier`` and the registry of :mod:`stepsearch.testbeds.digits`:

- ``digits``: DDPM on 1000 linear betas with v-prediction (Salimans & Ho 2022), the default model;
- ``digits-flow``: rectified flow ``x_t = (1 - t) x0 + t eps`` with velocity ``u = eps - x0``
  (Liu et al. 2022; Esser et al. 2024), a ``FlowMatchEulerDiscreteScheduler`` config;
- ``digits-cond``: the DDPM conditioned on the digit label, with label dropout for the
  unconditional branch of classifier-free guidance (Ho & Salimans 2022).

``digits-flow`` and ``digits-cond`` are fine-tunes: they start from ``digits``' weights in
``--out`` (so train ``digits`` first, as the default order does; 2 CPU cores shared with other
work left no time to train them from scratch). Each writes ``<stem>.{safetensors,json}`` into
``--out`` (atomically). Every model draws from its own seeded streams, so training one alone
(from the same ``digits`` checkpoint) gives the same weights as training all of them. The
default is a fixed number of epochs, so the same command gives the same weights (on CPU with the
same ``--threads``, which is recorded). With ``--minutes`` the epoch count is instead fixed after
the second epoch from its wall time and recorded; pass it as ``--epochs`` to reproduce such a run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import platform
import sys
import time
from dataclasses import dataclass
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
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

FORMAT_VERSION = 2
NUM_TRAIN_TIMESTEPS = 1000
CALIBRATION_EPOCHS = 2  # the first epoch pays one-off kernel set-up; time the second
TARGETS = ("classifier", *digits.MODELS)
DEFAULT_EPOCHS = {"digits": 600, "digits-flow": 12, "digits-cond": 40}
FINE_TUNED = ("digits-flow", "digits-cond")
"""Models that start from ``digits``' EMA weights (read from ``--out``) instead of a random init."""
FLOW_SHIFT = 1.0
DDPM_BETAS = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}
OBJECTIVE_TEXT = {
    "digits": "v-prediction MSE, timesteps uniform over 1000 linear betas",
    "digits-flow": "rectified-flow velocity (eps - x0) MSE, t ~ U[0, 1), timestep 1000 t; "
    "fine-tuned from digits",
    "digits-cond": "v-prediction MSE on the digit label, label dropped to the null label w.p. p; "
    "fine-tuned from digits (label embedding zero-initialized, trained at its own learning rate)",
}
STREAM = {"digits": 2, "digits-flow": 4, "digits-cond": 6}
"""Each model's seed offset: its RNG streams are ``seed + STREAM``, independent of the others."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--out", type=Path, default=Path("src/stepsearch/data"), help="output directory")
    add("--seed", type=int, default=0, help="seed of every random stream and of the split")
    add("--models", nargs="+", choices=TARGETS, default=list(TARGETS), help="what to train")
    add("--epochs", type=int, default=None, help="UNet epochs (default: each model's own)")
    add("--minutes", type=float, default=None, help="UNet wall-clock budget (replaces --epochs)")
    add("--batch-size", type=int, default=128, help="UNet batch size")
    add("--lr", type=float, default=1e-3, help="UNet peak learning rate (AdamW)")
    add("--fine-tune-lr", type=float, default=5e-4, help="peak learning rate of fine-tunes")
    add("--warmup-steps", type=int, default=100, help="UNet linear warm-up steps")
    add("--ema-decay", type=float, default=0.999, help="EMA decay cap of the saved weights")
    add("--label-dropout", type=float, default=0.1, help="digits-cond: P(label -> null label)")
    add("--label-lr", type=float, default=1e-2, help="digits-cond: label embedding's peak lr")
    add("--flow-shift", type=float, default=FLOW_SHIFT, help="digits-flow: scheduler shift")
    add("--classifier-epochs", type=int, default=60, help="classifier epochs")
    add("--classifier-lr", type=float, default=2e-3, help="classifier peak learning rate")
    add("--threads", type=int, default=2, help="torch.set_num_threads (results depend on it)")
    add(
        "--snapshot-epochs",
        type=int,
        nargs="*",
        default=[],
        help="also write the EMA weights after these epochs to OUT/snapshots/<model>_epochNNNN/ "
        "(for FD-vs-training-length studies; the run itself is unchanged)",
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- helpers


def public_config(config: Any) -> dict[str, Any]:
    """A diffusers config as a plain JSON-ready dict, without the private ``_`` keys."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dict(config).items()
        if not key.startswith("_")
    }


def make_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    """The 1.62M-parameter 8×8 UNet: channels (32, 64, 64), attention at the 2×2 level.

    ``num_class_embeds`` adds a label embedding to the time embedding (``class_embed_type=None``).
    """
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    )


def make_noise_scheduler(name: str, flow_shift: float) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The scheduler whose config ships with ``name``.

    DDPM models: diffusers' default 1000-step linear betas, v-prediction, no x0 clipping. Flow:
    ``FlowMatchEulerDiscreteScheduler`` with ``shift`` (applied at sampling only).
    """
    if digits.MODELS[name].family == "flow":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=flow_shift
        )
    return DDPMScheduler(**DDPM_BETAS, prediction_type="v_prediction", clip_sample=False)


def initialize_from_digits(unet: UNet2DModel, directory: Path) -> str:
    """Copy ``digits``' EMA weights from ``directory`` into ``unet``; a label embedding that
    ``digits`` lacks stays zero, so the fine-tune starts from the unconditional model.

    Returns the SHA-256 of the weights it started from (recorded in the model's JSON)."""
    source = digits.load("digits", directory=directory)
    missing, unexpected = unet.load_state_dict(source.unet.state_dict(), strict=False)
    if unexpected or any(not key.startswith("class_embedding.") for key in missing):
        raise SystemExit(f"digits weights do not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key in missing:
            unet.get_parameter(key).zero_()
    return digits.checkpoint_record("digits", directory)["weights_sha256"]


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
    """Set every parameter group's learning rate to ``value`` times its ``lr_scale`` (1 if unset)."""
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)


def parameter_groups(unet: UNet2DModel, peak_lr: float, label_lr: float) -> Any:
    """The UNet's parameters for AdamW: one group, or for a conditional model the label embedding
    in a group of its own at peak ``label_lr``.

    The label embedding of a fine-tune starts at zero; at the fine-tune's learning rate Adam moves
    each entry by about ``lr`` per step, so in a few hundred steps it would stay far below the
    scale of the time embedding it is added to, and the model would ignore its labels."""
    if unet.class_embedding is None:
        return unet.parameters()
    labels = list(unet.class_embedding.parameters())
    label_ids = {id(parameter) for parameter in labels}
    rest = [parameter for parameter in unet.parameters() if id(parameter) not in label_ids]
    return [{"params": rest}, {"params": labels, "lr_scale": label_lr / peak_lr}]


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


@dataclass(frozen=True)
class Objective:
    """What one model regresses on: ``family`` ``ddpm`` (v-prediction on ``alphas_cumprod``) or
    ``flow`` (velocity), optionally on labels dropped to the null label with ``label_dropout``."""

    family: str
    alphas_cumprod: Tensor
    conditional: bool = False
    label_dropout: float = 0.0


def training_batch(
    objective: Objective, x0: Tensor, labels: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(x_t, timestep, target, class_labels)`` for a batch of clean images ``x0``.

    ``ddpm``: ``t`` uniform over the 1000 trained steps, ``x_t = alpha x0 + sigma eps``, target
    ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, Sec. 4). ``flow``: ``t ~ U[0, 1)``,
    ``x_t = (1 - t) x0 + t eps``, target ``u = eps - x0`` at timestep ``1000 t`` (Liu et al. 2022,
    Eq. 1; diffusers' flow convention).
    """
    batch = len(x0)
    if objective.family == "flow":
        t = torch.rand(batch, generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        t_ = t.view(-1, 1, 1, 1)
        x_t, timestep, target = (1.0 - t_) * x0 + t_ * eps, NUM_TRAIN_TIMESTEPS * t, eps - x0
    else:
        index = torch.randint(0, len(objective.alphas_cumprod), (batch,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        alpha_bar = objective.alphas_cumprod[index].view(-1, 1, 1, 1)
        alpha, sigma = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        x_t, timestep, target = alpha * x0 + sigma * eps, index, alpha * eps - sigma * x0
    class_labels = None
    if objective.conditional:
        dropped = torch.rand(batch, generator=generator) < objective.label_dropout
        class_labels = torch.where(dropped, digits.NULL_LABEL, labels)
    return x_t, timestep, target, class_labels


def diffusion_loss(
    unet: UNet2DModel,
    objective: Objective,
    x0: Tensor,
    labels: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """MSE of the network output against the objective's target, uniform over time."""
    x_t, timestep, target, class_labels = training_batch(objective, x0, labels, generator)
    return F.mse_loss(unet(x_t, timestep, class_labels=class_labels).sample, target)


@torch.no_grad()
def evaluation_loss(
    unet: UNet2DModel,
    objective: Objective,
    images: Tensor,
    labels: Tensor,
    seed: int,
    repeats: int = 4,
) -> float:
    """The loss over all images with fixed noise and timesteps: comparable across runs."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        for first in range(0, len(images), 128):
            x0, y = images[first : first + 128], labels[first : first + 128]
            total += diffusion_loss(unet, objective, x0, y, generator).item() * len(x0)
    return total / (repeats * len(images))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, decay_cap: float) -> None:
    """EMA with warm-up: decay ``min(cap, (1 + step) / (10 + step))``."""
    decay = min(decay_cap, (1.0 + step) / (10.0 + step))
    for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
        averaged.lerp_(current, 1.0 - decay)
    for averaged, current in zip(ema.buffers(), model.buffers(), strict=True):
        averaged.copy_(current)


def checkpoint_record(
    name: str, ema: nn.Module, noise_scheduler: Any, training: dict[str, Any]
) -> dict[str, Any]:
    """The JSON record beside a UNet's weights: configs (what ``digits.load`` reads) and training."""
    return {
        "format_version": FORMAT_VERSION,
        "model": name,
        "unet_config": public_config(ema.config),
        "scheduler_class": type(noise_scheduler).__name__,
        "scheduler_config": public_config(noise_scheduler.config),
        "training": training,
    }


def save_snapshot(
    args: argparse.Namespace, name: str, ema: nn.Module, noise_scheduler: Any, epoch: int, step: int
) -> None:
    """The EMA weights after ``epoch``, loadable with ``digits.load(name, directory=...)``."""
    directory = args.out / "snapshots" / f"{name}_epoch{epoch:04d}"
    directory.mkdir(parents=True, exist_ok=True)
    training = {"snapshot_after_epoch": epoch, "steps": step, "seed": args.seed}
    record = checkpoint_record(name, ema, noise_scheduler, training)
    save_checkpoint(directory, digits.MODELS[name].stem, ema, record)


def train_unet(
    args: argparse.Namespace, name: str, images: Tensor, labels: Tensor
) -> tuple[UNet2DModel, Any, dict[str, Any]]:
    """Train model ``name`` for its epochs (or as many as fit ``--minutes``); return EMA weights."""
    start = time.perf_counter()
    spec = digits.MODELS[name]
    stream = args.seed + STREAM[name]
    torch.manual_seed(stream - 2)  # digits: `seed`, as before the registry existed
    rng = np.random.default_rng([args.seed, STREAM[name]])
    generator = torch.Generator().manual_seed(stream)
    unet = make_unet(digits.NUM_CLASSES + 1 if spec.conditional else None)
    initialized_from = initialize_from_digits(unet, args.out) if name in FINE_TUNED else None
    peak_lr = args.fine_tune_lr if initialized_from else args.lr
    noise_scheduler = make_noise_scheduler(name, args.flow_shift)
    objective = Objective(
        family=spec.family,
        alphas_cumprod=DDPMScheduler(**DDPM_BETAS).alphas_cumprod.float(),
        conditional=spec.conditional,
        label_dropout=args.label_dropout if spec.conditional else 0.0,
    )
    ema = copy.deepcopy(unet).requires_grad_(False)
    groups = parameter_groups(unet, peak_lr, args.label_lr)
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, weight_decay=0.0)
    steps_per_epoch = len(images) // args.batch_size
    epochs = None if args.minutes is not None else (args.epochs or DEFAULT_EPOCHS[name])
    if epochs is None and args.warmup_steps < CALIBRATION_EPOCHS * steps_per_epoch:
        raise SystemExit(f"--minutes needs --warmup-steps >= {CALIBRATION_EPOCHS} epochs of steps")
    progress = tqdm(total=epochs, desc=name, unit="epoch")
    step, epoch, epoch_losses, epoch_start = 0, 0, [], start
    while epochs is None or epoch < epochs:
        order = torch.from_numpy(rng.permutation(len(images)))
        epoch_losses = []
        for first in range(0, steps_per_epoch * args.batch_size, args.batch_size):
            total_steps = (epochs or CALIBRATION_EPOCHS) * steps_per_epoch  # unused in warm-up
            set_learning_rate(
                optimizer, learning_rate(step, total_steps, peak_lr, args.warmup_steps)
            )
            batch = order[first : first + args.batch_size]
            loss = diffusion_loss(unet, objective, images[batch], labels[batch], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update_ema(ema, unet, step, args.ema_decay)
            epoch_losses.append(loss.item())
            step += 1
        epoch += 1
        if epoch in args.snapshot_epochs:
            save_snapshot(args, name, ema, noise_scheduler, epoch, step)
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
        "model": name,
        "objective": OBJECTIVE_TEXT[name],
        "seed": args.seed,
        "epochs": epochs,
        "minutes_budget": args.minutes,
        "steps": step,
        "batch_size": args.batch_size,
        "learning_rate": peak_lr,
        "initialized_from": initialized_from,
        "lr_schedule": f"linear warm-up {args.warmup_steps} steps, cosine to 0.1x",
        "ema_decay": args.ema_decay,
        "ema_warmup": "decay = min(ema_decay, (1 + step) / (10 + step))",
        "final_loss": float(np.mean(epoch_losses)),
        "eval_loss_ema": evaluation_loss(ema, objective, images, labels, args.seed + 3),
        "eval_loss_raw": evaluation_loss(unet, objective, images, labels, args.seed + 3),
        "num_parameters": count_parameters(ema),
        "num_threads": args.threads,
        "wall_time_s": round(train_time, 2),
        "seconds_per_epoch": round(train_time / epochs, 3),
        "dataset": "sklearn.datasets.load_digits, all 1797 images, x / 8 - 1, no augmentation",
        "versions": versions(),
    }
    if spec.conditional:
        record["label_dropout"] = args.label_dropout
        record["label_learning_rate"] = args.label_lr
        record["null_label"] = digits.NULL_LABEL
    return ema, noise_scheduler, record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    if not 0.0 <= args.label_dropout < 1.0:
        raise SystemExit("--label-dropout must lie in [0, 1)")
    torch.set_num_threads(args.threads)
    images, labels = digits.real_images(), digits.real_labels()

    if "classifier" in args.models:
        classifier, classifier_record = train_classifier(args, images, labels)
        save_checkpoint(args.out, "digits_classifier", classifier, classifier_record)
        print(f"classifier test accuracy {classifier_record['test_accuracy']:.4f}")

    for name in digits.MODELS:
        if name not in args.models:
            continue
        ema, noise_scheduler, training = train_unet(args, name, images, labels)
        record = checkpoint_record(name, ema, noise_scheduler, training)
        save_checkpoint(args.out, digits.MODELS[name].stem, ema, record)
        print(
            f"{name}: {training['epochs']} epochs, final loss {training['final_loss']:.4f}, "
            f"EMA eval loss {training['eval_loss_ema']:.4f}, {training['wall_time_s']:.0f} s"
        )


if __name__ == "__main__":
    main()
