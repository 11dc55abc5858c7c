"""A first run that means something: random-weight models are marked and offered fine-tuning
first, the Fine-tune tab runs `finetune_workload` with loss curves, and a merge of random
models warns in one sentence."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from gemel_studio.ui.finetune_view import LossCurves  # noqa: E402

from .test_merge_panels import proposed, tiny  # noqa: E402,F401  (fixtures)


def test_loss_curves_follow_the_models_in_training_order():
    curves = LossCurves(["a", "b"])
    for done, message in ((0, "epoch 1/2"), (3, "epoch 1/2 loss 2.0"), (0, "epoch 2/2"), (3, "epoch 2/2 loss 1.5"),
                          (0, "measuring"), (0, "epoch 1/2"), (3, "epoch 1/2 loss 3.0")):
        curves.add(done, message)
    assert curves.points == {"a": [2.0, 1.5], "b": [3.0]}


def test_random_models_are_marked_and_fine_tuning_makes_them_trained(window, open_and_wait, tiny, qtbot, tmp_path):  # noqa: F811
    open_and_wait(window, tiny)
    names = [m.name for m in window.workload.models]
    table = window.models_panel.table.model()
    headers = [table.headerData(c, Qt.Orientation.Horizontal) for c in range(table.columnCount())]
    source = headers.index("Source")
    assert [table.data(table.index(r, source)) for r in range(table.rowCount())] == \
        ["torchvision (random weights)"] * len(names)
    assert window.random_hint.isVisibleTo(window.models_panel) and "fine-tune them first" in window.random_hint.text()

    panel = window.finetune_panel
    assert "random weights" in panel.intro_label.text() and panel.start_button.isEnabled()
    panel.epochs_spin.setValue(1)
    panel.device_combo.setCurrentText("cpu")
    out = tmp_path / "tuned"
    panel.out_edit.setText(str(out))
    with qtbot.waitSignal(panel.sigFinished, timeout=180_000) as done:
        qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
        assert panel.running and not panel.start_button.isEnabled() and panel.cancel_button.isEnabled()
    assert done.args[0] == out / "workload.yaml" and (out / "workload.yaml").exists()
    assert set(panel.summary) == set(names) and all("accuracy" in row for row in panel.summary.values())
    assert all(len(panel.loss_series(n)[1]) >= 1 for n in names)
    assert panel.result_label.text().count("→") == len(names)

    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000):
        qtbot.mouseClick(panel.open_button, Qt.MouseButton.LeftButton)
    assert window.workload.path == (out / "workload.yaml").resolve()
    assert [table.data(table.index(r, source)) for r in range(table.rowCount())] == ["checkpoint"] * len(names)
    assert not window.random_hint.isVisibleTo(window.models_panel)


def test_merging_random_models_warns_in_one_sentence(proposed):  # noqa: F811
    window, _ = proposed
    label = window.retraining_panel.random_label
    assert label.isVisibleTo(window.retraining_panel)
    text = label.text()
    assert text.startswith("Warning: color, shape, size have random weights") and text.count(".") == 1
