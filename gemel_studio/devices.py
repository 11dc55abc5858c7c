"""The compute device a user names (`--device`, a plan's `device`), checked once for every
caller: retraining, the runtime and the benchmarks. Qt-free and merging-free, so the edge
runtime can use it."""

from __future__ import annotations

import torch

from .errors import GemelError


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when present, else the CPU; otherwise cpu, cuda or cuda:N, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise GemelError(f"device '{name}' is not one this tool runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GemelError(f"device '{name}' asked for, but this machine has no CUDA GPU; use --device cpu or auto")
    return device


def mixed_precision(device: torch.device):
    """The autocast every training and evaluation pass runs under: bfloat16 on CUDA, off on the
    CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
