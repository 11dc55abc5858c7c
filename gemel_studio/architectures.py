"""The torchvision architectures by name and their task: what a workload may name.

Below `workload.py` (which validates names with it) and `models/` (which builds them), so that
neither imports the other for it.
"""

from __future__ import annotations

import difflib
from functools import lru_cache

import torchvision
from torchvision.models import list_models


@lru_cache(maxsize=None)
def classifiers() -> frozenset[str]:
    return frozenset(list_models(module=torchvision.models))


@lru_cache(maxsize=None)
def detectors() -> frozenset[str]:
    return frozenset(list_models(module=torchvision.models.detection))


def known_architectures() -> dict[str, str]:
    """Architecture name -> task, for every torchvision classifier and detector."""
    names = {n: "classification" for n in classifiers()}
    names.update({n: "detection" for n in detectors()})
    return dict(sorted(names.items()))


def check_architecture(name: str) -> None:
    """Raise a ValueError (pydantic turns it into a field error) for an unknown name."""
    known = known_architectures()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see `gemel info --architectures`"
        raise ValueError(f"unknown torchvision architecture '{name}'; {hint}")


def task_of(architecture: str) -> str:
    check_architecture(architecture)
    return "detection" if architecture in detectors() else "classification"
