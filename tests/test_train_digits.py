"""``scripts/train_digits.py`` is reproducible: the same command gives the same weights, bit for bit.

One epoch of the ``digits-cond`` fine-tune (from the bundled ``digits`` weights), run twice in fresh
folders, writes byte-identical checkpoints; the label embedding trains in its own parameter group
(its learning rate recorded), the unconditional models keep one group.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from stepsearch.testbeds import digits

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_digits.py"
DATA = Path(str(importlib.resources.files("stepsearch") / "data"))


@pytest.fixture(scope="module")
def train_digits():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_digits"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_digits", None)


def _one_epoch(train_digits, folder: Path, extra: tuple[str, ...] = ()) -> bytes:
    folder.mkdir()
    stem = digits.MODELS["digits"].stem
    for suffix in (".safetensors", ".json"):
        shutil.copy(DATA / f"{stem}{suffix}", folder / f"{stem}{suffix}")
    previous = torch.get_num_threads()
    try:
        train_digits.main(
            ["--models", "digits-cond", "--epochs", "1", "--out", str(folder), "--threads", "1", *extra]
        )
    finally:
        torch.set_num_threads(previous)
    return (folder / f"{digits.MODELS['digits-cond'].stem}.safetensors").read_bytes()


def test_the_same_command_gives_the_same_weights_bit_for_bit(train_digits, tmp_path):
    first = _one_epoch(train_digits, tmp_path / "a")
    second = _one_epoch(train_digits, tmp_path / "b", ("--snapshot-epochs", "1"))
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    # a snapshot does not change the run, and after the last epoch it is the saved EMA weights
    snapshot = tmp_path / "b" / "snapshots" / "digits-cond_epoch0001"
    assert (snapshot / "digits_cond_unet.safetensors").read_bytes() == second
    assert digits.load("digits-cond", directory=snapshot).spec.conditional
    record = json.loads((tmp_path / "a" / "digits_cond_unet.json").read_text())
    assert record["training"]["epochs"] == 1
    assert record["training"]["label_learning_rate"] == pytest.approx(1e-2)


def test_label_embedding_has_its_own_learning_rate(train_digits):
    conditional = train_digits.make_unet(digits.NUM_CLASSES + 1)
    groups = train_digits.parameter_groups(conditional, 5e-4, 1e-2)
    assert [len(group["params"]) for group in groups] == [len(list(conditional.parameters())) - 1, 1]
    optimizer = torch.optim.AdamW(groups, lr=5e-4)
    train_digits.set_learning_rate(optimizer, 2.5e-4)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([2.5e-4, 5e-3])
    unconditional = train_digits.make_unet()
    assert list(train_digits.parameter_groups(unconditional, 1e-3, 1e-2)) == list(
        unconditional.parameters()
    )
