"""The sample workloads load, and the figures stated in their comments are the real ones."""

from __future__ import annotations

import re

import pytest

from gemel_studio.analysis import analyze_workload
from gemel_studio.workload import load_workload

from .conftest import SAMPLES

SAMPLE_FILES = sorted(SAMPLES.glob("*.yaml"))


def _stated(text: str, pattern: str) -> int:
    match = re.search(pattern, text)
    assert match, f"figure not stated: {pattern}"
    return int(match.group(1).replace(",", ""))


def test_there_are_high_medium_and_low_potential_samples():
    names = {p.stem for p in SAMPLE_FILES}
    assert {"quickstart", "high", "medium", "low"} <= names


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_stated_figures_match_the_analysis(path):
    text = path.read_text()
    analysis = analyze_workload(load_workload(path), alignment="structure")
    assert analysis.total_param_bytes == _stated(text, r"total parameter bytes ([\d,]+)")
    assert analysis.max_savings_bytes == _stated(text, r"bound ([\d,]+) bytes")
    stated_fraction = float(re.search(r"bytes \([\d.]+ MiB\) = ([\d.]+)%", text).group(1))
    assert round(100 * analysis.max_savings_fraction, 1) == stated_fraction


def test_potentials_are_ordered_high_medium_low():
    fraction = {name: analyze_workload(load_workload(SAMPLES / f"{name}.yaml")).max_savings_fraction
                for name in ("high", "medium", "low")}
    assert fraction["high"] > fraction["medium"] > fraction["low"]


def test_largest_sample_has_five_models_and_a_detector():
    w = load_workload(SAMPLES / "low.yaml")
    assert len(w.models) >= 5 and any(m.task == "detection" for m in w.models)


def test_the_tiny_merge_workload_loads_and_shares_its_backbones(tmp_path):
    from gemel_studio.samples import TINY_TASKS, write_tiny_workload

    path = write_tiny_workload(tmp_path / "new")  # the folder is made
    assert path == tmp_path / "new" / "tiny.yaml"
    w = load_workload(path)
    assert [(m.name, m.num_classes) for m in w.models] == list(TINY_TASKS)
    assert {m.source.architecture for m in w.models} == {"resnet18"}
    assert [m.dataset.seed for m in w.models] == [0, 1, 2]  # each task its own images
    assert analyze_workload(w).max_savings_fraction > 0.5  # three ResNet-18 backbones: most of it can be shared
