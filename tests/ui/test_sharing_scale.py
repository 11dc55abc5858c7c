"""The Sharing tab with a fleet: the matrix is virtualised, what it draws is capped, and a note
says what the caps left out."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QCoreApplication, QEvent, Qt  # noqa: E402
from PySide6.QtWidgets import QWidget  # noqa: E402

from gemel_studio.analysis import GroupMember, LayerRecord, ModelInventory, ShareGroup, WorkloadAnalysis  # noqa: E402
from gemel_studio.units import human_bytes  # noqa: E402
from gemel_studio.ui.sharing_view import (LAYER_ROLE, MAX_GROUPS, MAX_LAYER_LISTS, MAX_MODELS,  # noqa: E402
                                          MEMBER_ROLE, SharingPanel)

LAYERS = [LayerRecord(name=f"stage{i}.conv", kind="Conv2d", signature=f"Conv2d(in={i},out={i + 1},float32)",
                      param_bytes=4096 * (i + 1), buffer_bytes=0, activation_bytes=1024, trainable=True, executed=True)
          for i in range(8)]


def _analysis(models: int, groups: int) -> WorkloadAnalysis:
    """`models` hand-made inventories; group 0 holds every model, the others three each."""
    names = [f"cam{k:04d}" for k in range(models)]
    inventories = [ModelInventory(name=n, architecture="synthetic", task="classification", source_kind="torchvision",
                                  input_size=(3, 32, 32), batch_size=1, layers=list(LAYERS),
                                  param_bytes=sum(r.param_bytes for r in LAYERS), buffer_bytes=0,
                                  activation_bytes=2048, built_on="meta") for n in names]
    out = [ShareGroup(LAYERS[7].signature, "Conv2d", [GroupMember(n, LAYERS[7].name) for n in names],
                      LAYERS[7].param_bytes)]
    for g in range(1, groups):
        layer = LAYERS[g % 7]
        members = [GroupMember(names[(g + k) % models], layer.name) for k in range(3)]
        out.append(ShareGroup(layer.signature, "Conv2d", members, layer.param_bytes))
    return WorkloadAnalysis(workload="fleet", alignment="structure", models=inventories, groups=out)


def _widgets(panel: QWidget) -> int:
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    return len(panel.findChildren(QWidget))


@pytest.fixture
def panel(qtbot):
    p = SharingPanel()
    qtbot.addWidget(p)
    p.resize(1200, 800)
    p.show()
    return p


def test_a_fleet_is_drawn_within_the_limits_and_says_so(panel):
    analysis = _analysis(1000, MAX_GROUPS + 500)
    panel.set_analysis(analysis)
    matrix = panel.matrix
    assert matrix.columnCount() == MAX_MODELS < 1000
    assert matrix.rowCount() == MAX_GROUPS < len(analysis.groups)
    assert [matrix.headerData(c, Qt.Orientation.Horizontal) for c in (0, MAX_MODELS - 1)] == ["cam0000", "cam0199"]
    assert not panel.limit_note.isHidden()
    note = panel.limit_note.text()
    assert f"{MAX_MODELS} of 1,000 models" in note and f"{MAX_GROUPS:,} of {MAX_GROUPS + 500:,} groups" in note
    assert f"layer lists of the first {MAX_LAYER_LISTS}" in note and "gemel analyze WORKLOAD --json" in note
    assert list(panel.layer_lists) == [m.name for m in analysis.models[:MAX_LAYER_LISTS]]

    # Every drawn cell still answers: membership, layer, tooltip; and no cell owns a widget.
    top, last = matrix.index(0, MAX_MODELS - 1), matrix.index(MAX_GROUPS - 1, 0)
    assert matrix.data(top, MEMBER_ROLE) and matrix.data(top, LAYER_ROLE) == LAYERS[7].name
    tip = matrix.data(top, Qt.ItemDataRole.ToolTipRole)
    assert "cam0199" in tip and LAYERS[7].signature in tip and human_bytes(LAYERS[7].param_bytes) in tip
    assert matrix.data(last, LAYER_ROLE) == analysis.groups[MAX_GROUPS - 1].layer_of("cam0000")
    assert all(panel.view.indexWidget(matrix.index(r, c)) is None for r in (0, 50, MAX_GROUPS - 1) for c in (0, 199))
    header = matrix.headerData(0, Qt.Orientation.Vertical)
    assert header == (f"1. {LAYERS[7].name} (Conv2d) · 1000 models · saves "
                      f"{human_bytes(LAYERS[7].param_bytes * 999)}")
    assert matrix.headerData(1, Qt.Orientation.Vertical).startswith(f"2. {analysis.groups[1].members[0].layer} "
                                                                     "(Conv2d) · 3 models · saves ")
    bound = analysis.max_savings_bytes
    assert panel.bound_label.text() == (f"{MAX_GROUPS + 500:,} groups; all-shareable bound {human_bytes(bound)} "
                                        f"({analysis.max_savings_fraction:.1%} of "
                                        f"{human_bytes(analysis.total_param_bytes)} parameters)")
    panel.view.scrollTo(matrix.index(MAX_GROUPS - 1, MAX_MODELS - 1))
    assert not panel.grab().isNull()  # paints the visible cells only

    # Selecting a group highlights its layer in every layer list shown.
    panel.select_group(0)
    assert panel.selected_group() == 0
    for name, layer_list in panel.layer_lists.items():
        rows = layer_list.highlighted_rows()
        assert [layer_list.layers.data(layer_list.layers.index(r, 0), LAYER_ROLE) for r in rows] == [LAYERS[7].name]
    assert panel.detail.text().startswith(f"Group 1: {LAYERS[7].name} (Conv2d) in 1000 models, ")
    panel.select_group(-1)
    assert all(p.highlighted_rows() == [] for p in panel.layer_lists.values())


def test_widgets_do_not_grow_with_the_cells(panel):
    panel.set_analysis(_analysis(20, 50))
    small = _widgets(panel)
    panel.set_analysis(_analysis(1000, MAX_GROUPS + 500))
    assert _widgets(panel) == small
    panel.set_analysis(_analysis(300, 800))
    assert _widgets(panel) == small


def test_a_small_workload_is_drawn_whole_without_a_note(panel):
    panel.set_analysis(_analysis(1000, 10))
    assert not panel.limit_note.isHidden()
    panel.set_analysis(_analysis(4, 10))
    assert panel.limit_note.isHidden() and panel.limit_note.text() == ""
    assert panel.matrix.columnCount() == 4 and panel.matrix.rowCount() == 10
    assert len(panel.layer_lists) == 4
    panel.set_analysis(None)
    assert panel.limit_note.isHidden() and panel.matrix.rowCount() == 0 and panel.layer_lists == {}
    assert panel.bound_label.text() == ""


def _count_layer_data(monkeypatch) -> list:
    """Every LayerTableModel.data call from now on, as (model name, role)."""
    from gemel_studio.ui import sharing_view

    calls, original = [], sharing_view.LayerTableModel.data

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        calls.append((self.inventory.name, role))
        return original(self, index, role)

    monkeypatch.setattr(sharing_view.LayerTableModel, "data", data)
    return calls


def _flush() -> None:
    from PySide6.QtCore import QCoreApplication

    for _ in range(3):  # posted events may post more (a layout requests a repaint)
        QCoreApplication.sendPostedEvents()
        QCoreApplication.processEvents()


def test_a_hidden_sharing_tab_never_asks_its_layer_lists_for_cells(window, qtbot, monkeypatch):
    # The lists are made when an analysis arrives, whatever tab is shown; until the Sharing tab
    # is, nothing measures or paints their cells (a run in the Live preview paid for that).
    window.tabs.setCurrentIndex(0)
    panel = window.sharing_panel
    assert window.tabs.currentWidget() is not panel
    calls = _count_layer_data(monkeypatch)
    analysis = _analysis(6, 40)
    panel.set_analysis(analysis)
    _flush()  # the delayed layouts and any queued repaint run now, not after some wait
    for row in (0, 5, 9, -1, 3):  # the selection moves: each list's highlight changes
        panel.select_group(row)
        _flush()
    assert not panel.isVisible() and calls == []
    # Shown, the lists draw their cells, Kind and Params each whole.
    window.tabs.setCurrentWidget(panel)
    qtbot.waitUntil(lambda: len(calls) > 0)
    for layer_list in panel.layer_lists.values():
        view, model = layer_list.view, layer_list.layers
        metrics = view.fontMetrics()
        for column in (1, 2):
            widest = max(metrics.horizontalAdvance(model.data(model.index(r, column))) for r in range(model.rowCount()))
            assert view.horizontalHeader().sectionSize(column) >= widest


def test_a_new_highlight_signals_only_the_rows_it_changes(panel):
    panel.set_analysis(_analysis(4, 10))
    layers = panel.layer_lists["cam0000"].layers
    changes = []
    layers.dataChanged.connect(lambda a, b, roles=(): changes.append((a.row(), b.row(), a.column(), b.column())))
    assert layers.set_highlighted(LAYERS[3].name) == 3
    assert layers.set_highlighted(LAYERS[5].name) == 5
    assert layers.set_highlighted(None) is None
    assert sorted(changes[:1]) == [(3, 3, 0, 2)] and sorted(changes[1:3]) == [(3, 3, 0, 2), (5, 5, 0, 2)]
    assert changes[3:] == [(5, 5, 0, 2)]
