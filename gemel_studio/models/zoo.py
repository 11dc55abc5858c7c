"""The torchvision model zoo by name: which architectures exist, and building one.

Architectures are built with torchvision's own constructors; on the meta device when the
constructor allows it (no weight memory), else on the CPU and moved to meta.
"""

from __future__ import annotations

import torch
from torchvision.models import get_model

from ..architectures import (  # noqa: F401  (re-exported: the names models/ always had)
    check_architecture, classifiers as _classifiers, detectors as _detectors, known_architectures, task_of)
from ..errors import ModelLoadError


def _constructor_kwargs(architecture: str, num_classes: int) -> dict:
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if architecture in _detectors():
        kwargs["weights_backbone"] = None
    if architecture in ("inception_v3", "googlenet"):
        # Their default init draws from scipy's truncated normal: slow and not needed here.
        kwargs["init_weights"] = False
    return kwargs


def construct(architecture: str, num_classes: int, device: str) -> tuple[torch.nn.Module, str]:
    """Build an untrained architecture; returns the module and the device it was built on.

    With device='meta', a constructor that computes with tensors while building (RegNet)
    is built on the CPU instead and moved to meta; the second value says 'cpu' then.
    """
    kwargs = _constructor_kwargs(architecture, num_classes)
    try:
        if device == "meta":
            try:
                with torch.device("meta"):
                    return get_model(architecture, **kwargs), "meta"
            except (NotImplementedError, RuntimeError):
                return get_model(architecture, **kwargs).to("meta"), "cpu"
        with torch.device(device):
            return get_model(architecture, **kwargs), device
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{architecture}: torchvision cannot build it with {num_classes} classes: {exc}") from None
