"""Shared fixtures: workloads written to temporary folders, small models, sample paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_workloads"


def run_python_blocking(blocked: tuple[str, ...], body: str, timeout: float = 120):
    """Run `body` in a fresh interpreter in which importing any module named in `blocked`
    (or below it) fails, as on a box where that code is not installed."""
    import subprocess
    import sys

    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + '.') for b in {blocked!r}):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
""" + body
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


EDGE_BLOCKED = ("gemel_studio.merging", "gemel_studio.export", "gemel_studio.ui", "PySide6")


@pytest.fixture(autouse=True)
def seeded():
    """Random weights (model construction draws from torch's global generator) are the same
    whatever ran before: a test's outcome must not depend on test order."""
    torch.manual_seed(0)


@pytest.fixture
def write_workload(tmp_path):
    """write_workload(models, **top) -> path of a YAML workload in tmp_path."""

    def write(models: list[dict], name: str = "test.yaml", **top) -> Path:
        data = {"version": 1, "name": "test", "input_size": [3, 64, 64], **top, "models": models}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def tv(name: str, architecture: str, **extra) -> dict:
    """A torchvision model entry for a workload."""
    return {"name": name, "source": {"kind": "torchvision", "architecture": architecture}, **extra}


class SmallNet(torch.nn.Module):
    """A tiny classifier with conv, batch-norm and linear layers."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def described_outputs(bundle, names: list[str], frames: list, backend: str):
    """Each frame run at once through `names` on `backend` (merged policy, CPU): the engine and,
    per frame, what each model said (`describe_output`'s answer)."""
    from gemel_studio.runtime.engine import Engine
    from gemel_studio.runtime.sources import SyntheticSource

    engine = Engine(bundle, [(SyntheticSource(), names)], "merged", 200 * 2**20, "cpu", backend)
    outs = []
    for frame in frames:
        engine.process_frame(frame)
        outs.append({m: engine.latest[0]["outputs"][m] for m in names})
    return engine, outs
