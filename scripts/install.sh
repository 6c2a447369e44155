#!/usr/bin/env bash
# Install stepsearch into the active Python environment (make and activate a venv first), with the
# torch build this machine can use:
#   a GPU (nvidia-smi lists one): torch 2.14.1 + torchvision 0.29.1 (the CUDA build, ~5.5 GB) and
#     every extra (eval with clean-fid, dist, dev);
#   CPU only: the CPU build of torch 2.13.0 (~0.7 GB) and every extra but clean-fid, which needs
#     torchvision; everything stepsearch does runs without it (FD-digits, trajectory error, FID / KID
#     through the Inception TorchScript file); only the two tests that cross-check FID / KID against
#     clean-fid are skipped.
# Usage: scripts/install.sh [--cpu | --gpu]   (default: by nvidia-smi)
# Elsewhere than this project's machines, PyPI's torch==2.13.0 is a CUDA build: set
# TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu to take the CPU build from PyTorch's index.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=auto
case "${1:-}" in
    --cpu) mode=cpu ;;
    --gpu) mode=gpu ;;
    "") ;;
    *) echo "usage: scripts/install.sh [--cpu | --gpu]" >&2; exit 2 ;;
esac
if [ "$mode" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
        mode=gpu
    else
        mode=cpu
    fi
fi

if [ "$mode" = gpu ]; then
    echo "stepsearch: a GPU is here: torch 2.14.1 + torchvision 0.29.1 (CUDA build), all extras"
    python -m pip install torch==2.14.1 torchvision==0.29.1
    python -m pip install -e ".[eval,dist,dev]"
else
    echo "stepsearch: no GPU: the CPU build of torch 2.13.0, all extras but clean-fid"
    python -m pip install torch==2.13.0 ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX"}
    # the eval extra without clean-fid (which would pull torchvision and a CUDA torch)
    python -m pip install -e ".[dist,dev]" "torchmetrics>=1.4" "transformers>=4.40" "matplotlib>=3.7"
fi
