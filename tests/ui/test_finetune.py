"""A first run that means something: random-weight models are marked and offered fine-tuning
first, the Fine-tune tab runs `finetune_workload` with accuracy and loss curves per epoch,
and a merge of random models warns in one sentence."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from gemel_studio.merging.retrain import EpochRecord  # noqa: E402
from gemel_studio.ui.finetune_view import EpochCurves  # noqa: E402

from .test_merge_panels import proposed, tiny  # noqa: E402,F401  (fixtures)


def test_epoch_curves_take_each_record_for_the_model_it_names():
    curves = EpochCurves(["a", "b"])
    assert curves.add(EpochRecord(epoch=1, seconds=1.0, loss={"a": 2.0}, accuracy={"a": 0.4})) == ["a"]
    assert curves.add(EpochRecord(epoch=2, seconds=1.0, loss={"a": 1.5}, accuracy={"a": 0.6})) == ["a"]
    assert curves.add(EpochRecord(epoch=1, seconds=1.0, loss={"b": 3.0}, accuracy={"b": 0.3})) == ["b"]
    assert curves.add(EpochRecord(epoch=1, seconds=1.0, loss={"z": 3.0}, accuracy={"z": 0.3})) == []
    assert curves.epochs == {"a": [1, 2], "b": [1]}
    assert curves.loss == {"a": [2.0, 1.5], "b": [3.0]} and curves.accuracy == {"a": [0.4, 0.6], "b": [0.3]}


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
    epochs = 2
    panel.epochs_spin.setValue(epochs)
    panel.device_combo.setCurrentText("cpu")
    out = tmp_path / "tuned"
    panel.out_edit.setText(str(out))
    live = []  # at each epoch's record: still running, and the points drawn so far
    with qtbot.waitSignal(panel.sigFinished, timeout=180_000) as done:
        qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
        assert panel.running and not panel.start_button.isEnabled() and panel.cancel_button.isEnabled()
        panel.task_worker.sigPartial.connect(
            lambda record: live.append((panel.running, sum(len(panel.curve(n)[0]) for n in names))))
    assert done.args[0] == out / "workload.yaml" and (out / "workload.yaml").exists()
    assert set(panel.summary) == set(names) and all("accuracy" in row for row in panel.summary.values())
    # One point per epoch on both plots, drawn while the models train.
    assert live == [(True, i + 1) for i in range(epochs * len(names))]
    for n in names:
        for which in ("accuracy", "loss"):
            x, y = panel.curve(n, which)
            assert list(x) == [1.0, 2.0] and len(y) == epochs
        assert panel.curve(n, "accuracy")[1][-1] == pytest.approx(panel.summary[n]["accuracy"])
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
