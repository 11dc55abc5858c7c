"""Merge risk per group without retraining: linear CKA and the accuracy drop of a group tied alone."""

from __future__ import annotations

import pytest
import torch

from gemel_studio.merging import load_plan
from gemel_studio.merging.risk import linear_cka
from gemel_studio.workload import load_workload

from .conftest import tv


def test_cka_of_a_layer_with_itself_is_one_and_of_independent_features_near_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    assert linear_cka(x, x) == pytest.approx(1.0)
    # Invariant to rotation and scale: the same function up to them is as similar.
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)
    y = torch.randn(2000, 8, generator=g)
    assert linear_cka(x, y) < 0.05
    # Activations of any shape are flattened per sample.
    assert linear_cka(torch.randn(50, 2, 3, 3, generator=g), torch.randn(50, 4, generator=g)) < 0.5


def test_propose_records_risk_per_group_and_no_risk_skips_it(tmp_path, write_workload):
    from gemel_studio.analysis import analyze_workload
    from gemel_studio.cli import main

    entries = [tv(t, "resnet18", num_classes=n, dataset={"kind": "synthetic", "task": t, "samples": 40, "seed": i})
               for i, (t, n) in enumerate([("color", 3), ("shape", 3)])]
    w = load_workload(write_workload(entries, input_size=[3, 16, 16]))
    analysis = analyze_workload(w)
    assert main(["propose", str(w.path), "-o", str(tmp_path / "plain.yaml"), "--no-risk"]) == 0
    assert all(g.risk is None for g in load_plan(tmp_path / "plain.yaml", w, analysis).groups)
    assert main(["propose", str(w.path), "-o", str(tmp_path / "risk.yaml"), "--init", "mean",
                 "--risk-min-fraction", "0.05", "--limit", "20"]) == 0
    plan = load_plan(tmp_path / "risk.yaml", w, analysis)
    assert plan.init.method == "mean"
    bound = sum(g.savings_bytes for g in plan.groups)
    for g in plan.groups:  # CKA for every group, the drop for those saving at least 5% of the bound
        assert g.risk is not None and g.risk.init == "mean" and -1.0 <= g.risk.cka <= 1.0 + 1e-6
        heavy = g.savings_bytes >= int(0.05 * bound)
        assert set(g.risk.drop) == ({"color", "shape"} if heavy else set())
        assert all(-1.0 <= d <= 1.0 for d in g.risk.drop.values())
    assert any(g.risk.drop for g in plan.groups)
    # Two independently initialised ResNet-18s: their first convolutions compute different features.
    conv1 = next(g for g in plan.groups if g.members[0].layer == "conv1")
    assert conv1.risk.cka < 0.99
    assert main(["propose", str(w.path), "-o", str(tmp_path / "t.yaml"), "--init", "ties"]) == 2  # no base named
