"""The Retraining, Monitor and Sharing tabs read in a 1024x700 window: the real widgets,
offscreen, with figures of a realistic size; whatever a short column leaves out is in a
tooltip or a column the header's menu shows."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from gemel_studio.runtime.metrics import example_snapshot  # noqa: E402
from gemel_studio.units import human_bytes  # noqa: E402

from .conftest import QUICKSTART  # noqa: E402

MODELS = ["color", "shape", "size", "count"]
ACTIONS = ["banked", "split into 2 + 1 groups", "halved: retry the heavier 2 groups", "dropped (single group failed)"]


def _steps(rounds: int = 14) -> list[dict]:
    """A search's rounds as the core logs them (`heuristic.Step`), with its longest texts."""
    steps = []
    for r in range(1, rounds + 1):
        models = MODELS if r % 3 == 0 else MODELS[: 2 + r % 2]
        kept = r % 4 != 3
        steps.append({"round": r, "groups": [f"g{r:03d}"] if r % 3 else [f"g{r:03d}", f"g{r + 20:03d}", "g041"],
                      "models": models, "savings_bytes": 28_311_552 // r, "outcome": "kept" if kept else "failed",
                      "next_action": ACTIONS[0] if kept else ACTIONS[1 + r % 3],
                      "accuracy": {m: 0.61 - 0.013 * i for i, m in enumerate(models)},
                      "retrain_seconds": 12.25 * r, "saved_bytes_after": 9 * 2**20 * r,
                      "elapsed_seconds": 20.5 * r, "epochs": 2, "initial_accuracy": {}, "init": "first"})
    return steps


def _small(window, qtbot, panel) -> None:
    window.resize(1024, 700)
    window.tabs.setCurrentWidget(panel)
    qtbot.waitUntil(lambda: window.tabs.width() < 1024 and panel.isVisible())


def _fits(view) -> None:
    """Every column shown lies inside the table's width: no sideways scrolling."""
    assert view.horizontalHeader().length() <= view.viewport().width()
    assert not view.horizontalScrollBar().isVisible()


def test_the_step_log_reads_whole_at_1024x700(window, qtbot):
    panel = window.retraining_panel
    _small(window, qtbot, panel)
    steps = _steps()
    panel.steps_model.set_steps(steps)
    view, model = panel.steps_view, panel.steps_model
    header = view.horizontalHeader()
    qtbot.waitUntil(lambda: view.verticalScrollBar().isVisible())  # more rounds than rows: it scrolls down
    _fits(view)
    shown = [model.HEADERS[c] for c in range(model.columnCount()) if not header.isSectionHidden(c)]
    assert shown == ["#", "Groups", "Saves", "Outcome", "Lowest", "Next"]
    # Each column shows its texts whole, the longest next action included.
    metrics = view.fontMetrics()
    for c, name in enumerate(model.HEADERS):
        if name in shown:
            widest = max(metrics.horizontalAdvance(model.text(r, name)) for r in range(model.rowCount()))
            assert header.sectionSize(c) >= widest, name
    assert model.text(2, "Groups") == "3 groups" and model.text(0, "Lowest") == "0.584 size"
    assert model.text(0, "Saves") == human_bytes(steps[0]["savings_bytes"])

    # What the short columns leave out is in every cell's tooltip, and in the header's menu.
    tip = model.data(model.index(2, 0), Qt.ItemDataRole.ToolTipRole)
    assert model.data(model.index(2, 4), Qt.ItemDataRole.ToolTipRole) == tip
    for fact in ("Round 3: g003, g023, g041", "Models: color, shape, size, count", "color 0.610", "count 0.571",
                 "Retraining 36.8 s (2 epochs), 61.5 s into the search", "failed; next: split into 2 + 1 groups",
                 f"Saved after the round: {human_bytes(steps[2]['saved_bytes_after'])}"):
        assert fact in tip
    assert "right-click" in model.headerData(0, Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole)
    menu = panel.step_columns_menu(None)
    actions = {a.text(): a for a in menu.actions()}
    assert list(actions) == list(model.HEADERS)
    assert [n for n, a in actions.items() if not a.isChecked()] == ["Saved after", "Retrain", "Elapsed", "Models"]
    actions["Models"].trigger()  # shown now, and remembered
    assert not header.isSectionHidden(model.HEADERS.index("Models"))
    assert model.text(2, "Models") == "color, shape, size, count"
    from gemel_studio.ui.retraining_view import RetrainingPanel

    again = RetrainingPanel()
    qtbot.addWidget(again)
    hidden = [n for c, n in enumerate(model.HEADERS) if again.steps_view.horizontalHeader().isSectionHidden(c)]
    assert hidden == ["Saved after", "Retrain", "Elapsed"]


def test_the_report_sits_under_the_controls_and_fits(window, qtbot):
    panel = window.retraining_panel
    _small(window, qtbot, panel)
    view = panel.report_view
    assert panel.start_button.mapTo(panel, panel.start_button.rect().bottomLeft()).y() < view.mapTo(panel, view.rect(
        ).topLeft()).y()
    headers = [panel.report_model.headerData(c, Qt.Orientation.Horizontal) for c in range(5)]
    assert headers == ["Model", "Before", "After", "Target", "Met"]
    assert "unmerged" in panel.report_model.headerData(1, Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole)
    _fits(view)


def _snapshot(t: float, instance: str | None) -> dict:
    snap = example_snapshot()
    if instance:
        snap["instance"] = instance
    row = snap["streams"][0]
    snap.update(elapsed_s=t, state="running")
    snap["streams"] = [{**row, "name": f"cam-{k}", "frames_in": int(40 * t) + 3, "processed": int(38 * t),
                        "dropped": 2} for k in range(2)]
    snap["memory"] = {"budget_bytes": 64 << 20, "runtime_resident_bytes": 40 << 20,
                      "runtime_peak_resident_bytes": 40 << 20}
    return snap


def test_the_monitor_titles_and_boxes_fit_at_1024x700(window, qtbot):
    panel = window.monitor_panel
    _small(window, qtbot, panel)
    boxes = [("10.0.0.11:9400", "edge-07"), ("10.0.0.12:9400", "jetson-lobby"), ("10.0.0.13:9400", None)]
    for t in range(4):
        for key, instance in boxes:
            panel.show_snapshot(_snapshot(0.5 * t, instance), key)
    qtbot.waitUntil(lambda: panel.fps_plot.width() < 400)
    for item, plot in ((panel.fps_item, panel.fps_plot), (panel.resident_item, panel.resident_plot)):
        assert item.titleLabel.item.boundingRect().width() <= plot.width() - 40  # room for the axis
    assert "over 2 s" in panel.fps_item.getAxis("left").labelText
    view, model = panel.box_view, panel.box_model
    _fits(view)
    metrics = view.fontMetrics()
    for c, (name, _) in enumerate(model.COLUMNS):
        widest = max(metrics.horizontalAdvance(model.text(r, name)) for r in range(model.rowCount()))
        assert view.horizontalHeader().sectionSize(c) >= widest, name
    # A box is named by the instance its snapshot reports; the address stays in its tooltip.
    assert [panel.box_row_text(k, "Box") for k, _ in boxes] == ["edge-07", "jetson-lobby", "10.0.0.13:9400"]
    tip = model.data(model.index(1, 0), Qt.ItemDataRole.ToolTipRole)
    assert tip.startswith("jetson-lobby at 10.0.0.12:9400\nstatus: connected") and "2 streams" in tip
    assert panel.box_row_text("10.0.0.12:9400", "Status") == "running"
    assert panel.box_row_text("10.0.0.12:9400", "Dropped") == f"{4 / 126:.1%}"
    panel.select_box("10.0.0.12:9400")
    assert panel.state_label.text().startswith("jetson-lobby (10.0.0.12:9400): running")
    assert [item[1].text for item in panel.resident_legend.items] == ["edge-07", "jetson-lobby", "10.0.0.13:9400"]


def test_the_sharing_rows_name_their_layer_and_the_bound_shows(window, open_and_wait, qtbot):
    analysis = open_and_wait(window, QUICKSTART)
    panel = window.sharing_panel
    _small(window, qtbot, panel)
    matrix = panel.matrix
    for row in (0, len(analysis.groups) - 1):
        group = analysis.groups[row]
        assert matrix.headerData(row, Qt.Orientation.Vertical) == (
            f"{row + 1}. {group.members[0].layer} ({group.kind}) · {len(group.members)} models · saves "
            f"{human_bytes(group.savings_bytes)}")
    assert panel.bound_label.isVisible()
    assert f"all-shareable bound {human_bytes(analysis.max_savings_bytes)} " in panel.bound_label.text()
    assert f"({analysis.max_savings_fraction:.1%} of" in panel.bound_label.text()
    panel.select_group(0)
    assert panel.detail.text().startswith(f"Group 1: {analysis.groups[0].members[0].layer} ")
    for label in (panel.bound_label, panel.detail):
        assert label.sizeHint().width() <= label.width(), label.text()
    # The row names are whole: the vertical header is as wide as its longest name.
    header = panel.view.verticalHeader()
    widest = max(header.fontMetrics().horizontalAdvance(matrix.headerData(r, Qt.Orientation.Vertical))
                 for r in range(matrix.rowCount()))
    assert header.width() >= widest


def test_the_preview_settings_are_not_cut_at_1024x700(window, qtbot):
    panel = window.preview_panel
    _small(window, qtbot, panel)
    scroll = panel.settings_scroll
    settings = scroll.widget()
    # The settings column is as wide as its widgets need: none is cut at its right edge.
    assert settings.width() >= settings.minimumSizeHint().width()
    assert scroll.viewport().width() >= settings.minimumSizeHint().width()
    for widget in (panel.device_budget_check, panel.budget_spin):
        assert widget.mapTo(settings, widget.rect().topRight()).x() <= scroll.viewport().width()
