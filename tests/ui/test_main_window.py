"""The main window driven through its real widgets, checked against the core's own figures."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import yaml

pytest.importorskip("PySide6")

from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDropEvent  # noqa: E402

from gemel_studio.analysis import analyze_workload  # noqa: E402
from gemel_studio.units import human_bytes  # noqa: E402
from gemel_studio.ui.models_view import RAW_ROLE  # noqa: E402
from gemel_studio.ui.sharing_view import LAYER_ROLE, MEMBER_ROLE  # noqa: E402
from gemel_studio.workload import load_workload  # noqa: E402

from .conftest import QUICKSTART, ROOT  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    """The quick-start analysis computed directly by the core, without Qt."""
    return analyze_workload(load_workload(QUICKSTART))


def _column(model, header: str) -> int:
    return [model.headerData(c, Qt.Orientation.Horizontal) for c in range(model.columnCount())].index(header)


def test_open_shows_the_analysis_of_the_core(window, open_and_wait, reference):
    shown = open_and_wait(window, QUICKSTART)
    assert window.workload.path == QUICKSTART.resolve()
    assert not window.busy and window.progress_bar.isHidden() and window.cancel_button.isHidden()

    matrix = window.sharing_panel.matrix
    assert matrix.rowCount() == len(reference.groups) == 41
    assert matrix.columnCount() == len(reference.models) == 4
    names = [m.name for m in reference.models]
    assert [matrix.headerData(c, Qt.Orientation.Horizontal) for c in range(4)] == names
    for row, group in enumerate(reference.groups):
        for column, name in enumerate(names):
            index = matrix.index(row, column)
            assert matrix.data(index, MEMBER_ROLE) == (group.layer_of(name) is not None)
            assert matrix.data(index, LAYER_ROLE) == group.layer_of(name)
    top = reference.groups[0]
    member = names.index(top.members[0].model)
    tip = matrix.data(matrix.index(0, member), Qt.ItemDataRole.ToolTipRole)
    assert top.members[0].layer in tip and top.signature in tip and human_bytes(top.bytes_per_copy) in tip
    assert matrix.data(matrix.index(0, member), Qt.ItemDataRole.BackgroundRole) is not None
    empty = [c for c in range(4) if top.layer_of(names[c]) is None]
    assert all(matrix.data(matrix.index(0, c), Qt.ItemDataRole.BackgroundRole) is None for c in empty)

    panel = window.models_panel
    assert panel.total_label.text() == f"Total parameters: {human_bytes(reference.total_param_bytes)}"
    assert human_bytes(reference.max_savings_bytes) in panel.bound_label.text()
    assert f"{reference.max_savings_fraction:.1%}" in panel.bound_label.text()
    assert panel.groups_label.text() == "Share groups: 41"
    table = panel.model
    assert table.rowCount() == 4
    for row, inv in enumerate(reference.models):
        assert table.data(table.index(row, _column(table, "Model"))) == inv.name
        assert table.data(table.index(row, _column(table, "Param bytes")), RAW_ROLE) == inv.param_bytes
        assert table.data(table.index(row, _column(table, "Param bytes"))) == human_bytes(inv.param_bytes)
        assert table.data(table.index(row, _column(table, "Parameters")), RAW_ROLE) == inv.param_count
        assert table.data(table.index(row, _column(table, "Peak activations")), RAW_ROLE) == inv.activation_bytes
        assert table.data(table.index(row, _column(table, "Architecture"))) == inv.architecture

    memory = window.memory_panel
    x, saved = memory.savings_series()
    assert len(x) == len(reference.groups) + 1
    assert saved[-1] * 2**20 == pytest.approx(reference.max_savings_bytes)
    assert memory.bound_line.value() * 2**20 == pytest.approx(reference.max_savings_bytes)
    assert memory.bound_line.isVisible()
    assert human_bytes(reference.max_savings_bytes) in memory.bound_line.label.toPlainText()
    params, activations = memory.layer_series()
    first = reference.models[0]
    assert len(params) == len(first.layers)
    assert params.sum() * 2**20 == pytest.approx(first.param_bytes)
    memory.show_model(reference.models[2].name)
    params, _ = memory.layer_series()
    assert params.sum() * 2**20 == pytest.approx(reference.models[2].param_bytes)
    assert shown.total_param_bytes == reference.total_param_bytes


def test_selecting_a_group_highlights_its_layer_in_each_model(window, open_and_wait, reference):
    open_and_wait(window, QUICKSTART)
    lists = window.sharing_panel.layer_lists
    assert set(lists) == {m.name for m in reference.models}
    for row in (0, 4, len(reference.groups) - 1):
        group = reference.groups[row]
        window.sharing_panel.view.selectRow(row)  # as a click on the row would
        assert window.sharing_panel.selected_group() == row
        for name, panel in lists.items():
            layer = group.layer_of(name)
            highlighted = panel.highlighted_rows()
            selected = [i.row() for i in panel.view.selectionModel().selectedRows()]
            if layer is None:
                assert highlighted == [] and selected == []
            else:
                assert [panel.layers.data(panel.layers.index(r, 0), LAYER_ROLE) for r in highlighted] == [layer]
                assert selected == highlighted
    window.sharing_panel.select_group(-1)
    assert all(panel.highlighted_rows() == [] for panel in lists.values())


def _long_workload(tmp_path, models=150):
    data = {"version": 1, "name": "long", "input_size": [3, 64, 64],
            # Distinct class counts: identical models would share one inventory and finish at once.
            "models": [{"name": f"cam{i}", "source": {"kind": "torchvision", "architecture": "resnet18"},
                        "num_classes": 2 + i} for i in range(models)]}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_cancel_a_long_analysis_keeps_what_was_shown(window, open_and_wait, qtbot, tmp_path):
    before = open_and_wait(window, QUICKSTART)
    long_path = _long_workload(tmp_path)
    with qtbot.waitSignal(window.sigWorkerStarted, timeout=10_000) as started:
        assert window.open_path(long_path)
    worker = started.args[0]
    assert window.busy and not window.cancel_button.isHidden() and not window.progress_bar.isHidden()
    qtbot.waitUntil(lambda: window.progress_bar.value() >= 1, timeout=30_000)  # it really runs
    with qtbot.waitSignal(worker.sigCancelled, timeout=30_000):
        qtbot.mouseClick(window.cancel_button, Qt.MouseButton.LeftButton)
    assert not window.busy
    assert window.cancel_button.isHidden() and window.progress_bar.isHidden()
    assert window.analysis is before
    assert window.workload.path == QUICKSTART.resolve()
    assert window.sharing_panel.matrix.rowCount() == len(before.groups)
    assert window.models_panel.model.rowCount() == 4
    assert "Cancelled" in window.statusBar().currentMessage()
    assert window.banner.isHidden()


@pytest.mark.parametrize("content", [None, "models: [unclosed\n", "models:\n  - name: x\n    source: {kind: torchvision, architecture: resnet_nope}\n"])
def test_a_failed_open_shows_a_message_and_keeps_the_workload(window, open_and_wait, tmp_path, content):
    before = open_and_wait(window, QUICKSTART)
    path = tmp_path / "broken.yaml"
    if content is not None:
        path.write_text(content)
    assert not window.open_path(path)
    assert not window.banner.isHidden()
    assert str(path) in window.banner.message
    assert window.statusBar().currentMessage() == ""  # shown once, in the banner
    assert window.analysis is before and window.workload.path == QUICKSTART.resolve()
    assert window.sharing_panel.matrix.rowCount() == len(before.groups)


def test_a_failed_analysis_keeps_the_workload(window, open_and_wait, qtbot, tmp_path):
    before = open_and_wait(window, QUICKSTART)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with qtbot.waitSignal(window.sigError, timeout=30_000) as blocker:
        window.open_paths([bad])
    assert "bad" in blocker.args[0] and "ONNX" in blocker.args[0]
    assert not window.banner.isHidden()
    assert window.analysis is before and len(window.workload.models) == 4


def test_add_and_remove_models_then_save_as(window, open_and_wait, qtbot, tmp_path):
    from gemel_studio.ui.dialogs import AddModelDialog

    open_and_wait(window, QUICKSTART)
    window.add_action.trigger()
    dialog = window.findChild(AddModelDialog)
    assert dialog is not None and dialog.isVisible()
    dialog.architecture_combo.setCurrentText("mobilenet_v2")
    qtbot.keyClicks(dialog.name_edit, "")
    dialog.name_edit.setText("shape")  # taken: OK is refused
    assert not dialog.buttons.button(dialog.buttons.StandardButton.Ok).isEnabled()
    dialog.name_edit.clear()
    qtbot.keyClicks(dialog.name_edit, "plates")
    dialog.classes_spin.setValue(7)
    ok = dialog.buttons.button(dialog.buttons.StandardButton.Ok)
    assert ok.isEnabled()
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000) as blocker:
        qtbot.mouseClick(ok, Qt.MouseButton.LeftButton)
    added = blocker.args[0]
    assert [m.name for m in added.models] == ["shape", "count", "color", "size", "plates"]
    assert added.model("plates").architecture == "mobilenet_v2"
    assert window.sharing_panel.matrix.columnCount() == 5
    assert window.isWindowModified()

    window.tabs.setCurrentWidget(window.models_panel)
    window.models_panel.select_model("count")
    assert window.models_panel.remove_button.isEnabled()
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000) as blocker:
        qtbot.mouseClick(window.models_panel.remove_button, Qt.MouseButton.LeftButton)
    assert [m.name for m in blocker.args[0].models] == ["shape", "color", "size", "plates"]
    assert window.models_panel.model.rowCount() == 4

    out = tmp_path / "sub" / "edited.yaml"
    out.parent.mkdir()
    assert window.save_as(out)
    assert not window.isWindowModified()
    saved = load_workload(out)
    assert [m.name for m in saved.models] == ["shape", "color", "size", "plates"]
    plates = saved.model("plates")
    assert plates.source.architecture == "mobilenet_v2" and plates.num_classes == 7
    assert saved.model("shape").dataset == window.workload.model("shape").dataset
    assert window.recent_paths_in_menu()[0] == out.resolve()


def _drop(window, paths):
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    event = QDropEvent(QPointF(20, 20), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    window.dropEvent(event)
    return event


def test_drop_a_workload_opens_it(window, qtbot):
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000) as blocker:
        _drop(window, [QUICKSTART])
    assert [m.name for m in blocker.args[0].models] == ["shape", "count", "color", "size"]
    assert window.workload.path == QUICKSTART.resolve()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    path = tmp_path_factory.mktemp("onnx") / "tiny_cam.onnx"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 64 * 64, 4)).eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and quick and quiet
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros(1, 3, 64, 64),), str(path), dynamo=False)
    return path


def test_drop_an_onnx_file_adds_a_model(window, open_and_wait, qtbot, tiny_onnx):
    open_and_wait(window, QUICKSTART)
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000) as blocker:
        _drop(window, [tiny_onnx])
    analysis = blocker.args[0]
    assert [m.name for m in analysis.models][-1] == "tiny_cam"
    spec = window.workload.model("tiny_cam")
    assert spec.source.kind == "onnx" and window.workload.resolve(spec.source.path) == tiny_onnx
    assert analysis.model("tiny_cam").param_bytes == (8 * 3 * 9 + 8 + 8 * 64 * 64 * 4 + 4) * 4
    assert window.models_panel.model.rowCount() == 5


def test_drop_a_checkpoint_asks_its_architecture(window, open_and_wait, qtbot, tmp_path):
    import torch
    import torchvision

    from gemel_studio.ui.dialogs import AddModelDialog

    open_and_wait(window, QUICKSTART)
    checkpoint = tmp_path / "gate_cam.pt"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), checkpoint)
    _drop(window, [checkpoint])
    dialog = window.findChild(AddModelDialog)
    assert dialog is not None and dialog.checkpoint == checkpoint.resolve()
    assert dialog.name_edit.text() == "gate_cam"
    dialog.architecture_combo.setCurrentText("resnet18")
    dialog.classes_spin.setValue(5)
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000) as blocker:
        dialog.accept()
    assert blocker.args[0].model("gate_cam").param_bytes == (
        blocker.args[0].model("color").param_bytes + (512 * 2 + 2) * 4)  # 5 classes against 3
    assert window.workload.model("gate_cam").source.kind == "checkpoint"


def test_theme_switch_changes_the_stylesheet_and_persists(window, qtbot):
    from gemel_studio.ui.main_window import MainWindow
    from gemel_studio.ui.settings import PALETTES, stylesheet

    assert window.theme == "dark"  # the default
    window.theme_actions["light"].trigger()
    assert window.styleSheet() == stylesheet("light") != stylesheet("dark")
    background = window.memory_panel.layers_plot.backgroundBrush().color().name()
    assert background == PALETTES["light"]["background"]
    again = MainWindow()
    qtbot.addWidget(again)
    assert again.theme == "light" and again.theme_actions["light"].isChecked()
    assert again.styleSheet() == stylesheet("light")
    window.theme_actions["dark"].trigger()
    assert window.memory_panel.layers_plot.backgroundBrush().color().name() == PALETTES["dark"]["background"]


def test_recent_files_list_opened_files_and_reopen(window, open_and_wait, qtbot, tmp_path):
    assert window.recent_paths_in_menu() == []
    copy = tmp_path / "copy.yaml"
    copy.write_text(QUICKSTART.read_text())
    open_and_wait(window, QUICKSTART)
    open_and_wait(window, copy)
    assert window.recent_paths_in_menu() == [copy.resolve(), QUICKSTART.resolve()]
    action = next(a for a in window.recent_menu.actions() if a.data() == str(QUICKSTART.resolve()))
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000):
        action.trigger()
    assert window.workload.path == QUICKSTART.resolve()
    assert window.recent_paths_in_menu()[0] == QUICKSTART.resolve()
    copy.unlink()
    action = next(a for a in window.recent_menu.actions() if a.data() == str(copy.resolve()))
    action.trigger()
    assert "no such workload file" in window.banner.message
    assert copy.resolve() not in window.recent_paths_in_menu()


def test_window_geometry_is_kept(window, qtbot):
    from gemel_studio.ui.main_window import MainWindow

    screen = window.screen().availableGeometry()  # restoreGeometry keeps a window on its screen
    size = (min(screen.width(), window.minimumSizeHint().width() + 13), min(screen.height(), 517))
    window.resize(*size)
    assert (window.width(), window.height()) == size
    window.tabs.setCurrentIndex(2)
    window.close()
    again = MainWindow()
    qtbot.addWidget(again)
    assert (again.width(), again.height()) == size
    assert again.tabs.currentIndex() == 2


def test_status_bar_device_shortcuts_and_about(window):
    from PySide6.QtGui import QKeySequence

    from gemel_studio.system import versions

    gpus = versions()["gpus"]
    assert (gpus[0]["name"] in window.device_label.text()) if gpus else window.device_label.text() == "Device: CPU"
    assert window.open_action.shortcut() == QKeySequence(QKeySequence.StandardKey.Open)
    assert window.save_action.shortcut() == QKeySequence(QKeySequence.StandardKey.Save)
    assert window.save_as_action.shortcut() == QKeySequence("Ctrl+Shift+S")
    box = window.show_about()
    assert "torch" in box.text() and "GEMEL Studio" in box.text()
    box.close()


def test_studio_without_a_display_says_so(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "gemel_studio.cli", "studio"], env=env, capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert "no display" in result.stderr and "xvfb-run" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_edit_still_being_analysed_counts_as_unsaved_and_saves(window, open_and_wait, qtbot, tmp_path,
                                                                   monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    open_and_wait(window, QUICKSTART)
    assert not window.unsaved
    assert window.remove_model("count")  # analysis of the edit starts; nothing is committed yet
    assert window.busy and not window.isWindowModified() and window.unsaved

    asked = []
    monkeypatch.setattr(QMessageBox, "question",
                        lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Cancel)
    window.ask_before_discard = True
    assert not window.open_path(QUICKSTART)  # the user cancels: the pending edit stays
    assert len(asked) == 1 and window.busy

    out = tmp_path / "pending.yaml"
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000):
        assert window.save_as(out)  # saves the edit the user made, not the committed workload
    window.ask_before_discard = False
    assert [m.name for m in load_workload(out).models] == ["shape", "color", "size"]
    assert [m.name for m in window.workload.models] == ["shape", "color", "size"]
    assert not window.unsaved and window.workload.path == out.resolve()


def test_an_empty_workload_is_not_saved(window, qtbot, tmp_path):
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000):
        window.new_workload()
    out = tmp_path / "empty.yaml"
    assert not window.save_as(out)
    assert not out.exists() and "no models" in window.banner.message


def test_memory_bars_are_named_on_the_axis_and_on_hover(window, open_and_wait, reference, qtbot):
    open_and_wait(window, QUICKSTART)
    window.tabs.setCurrentWidget(window.memory_panel)
    memory = window.memory_panel
    first = reference.models[0]
    axis = memory.layer_axis
    assert axis.names == [layer.name for layer in first.layers]
    # Names where they fit: at this width every n-th layer, n as small as keeps them apart.
    window.resize(1024, 700)
    qtbot.waitUntil(lambda: axis.width() < 1000)
    (step, ticks), = axis.tickValues(-1, len(first.layers), axis.width())
    assert 1 <= step < len(first.layers) and ticks[0] == 0 and all(b - a == step for a, b in zip(ticks, ticks[1:]))
    assert axis.tickStrings(ticks[:2], 1, step) == [first.layers[0].name, first.layers[int(step)].name]
    widest = max(axis.name_step(0, len(first.layers) - 1, 1e6), 1)
    assert widest == 1  # with room for every name, each bar gets its own
    # Hovering a bar names it, in the line above the plot and in the tooltip.
    item = memory.layers_item
    scene = item.vb.mapViewToScene(QPointF(3, 0.0))
    memory._mouse_moved(scene)
    assert memory.hover.text().startswith(f"3: {first.layers[3].name} ")
    assert memory.layers_plot.toolTip() == memory.hover.text() == memory.layer_text(3)


def test_the_error_banner_floats_and_points_to_the_tab_that_fixes_it(window, qtbot):
    window.resize(1024, 700)
    qtbot.waitUntil(lambda: window.tabs.width() < 1024)
    before = window.tabs.geometry()
    window.show_error("nothing to merge: accept groups in the Proposals tab to merge again")
    banner = window.banner
    assert banner.isVisible() and window.tabs.geometry() == before  # nothing moved
    assert before.contains(banner.geometry()) and banner.geometry().bottom() > before.center().y()
    assert banner.go_button.isVisible() and banner.go_button.text() == "Go to Proposals"
    qtbot.mouseClick(banner.go_button, Qt.MouseButton.LeftButton)
    assert window.tabs.currentWidget() is window.proposals_panel and banner.isHidden()
    window.show_error("x.yaml: no such file")
    assert not banner.go_button.isVisibleTo(banner)
    window.show_error("model 'a': merging needs a torchvision or checkpoint source; reject its groups in the plan")
    assert banner.tab == "Proposals"
    window.resize(1400, 900)  # it follows the window
    qtbot.waitUntil(lambda: banner.geometry().right() > 1100)
    assert window.tabs.geometry().contains(banner.geometry())


def test_the_random_weights_hint_moves_nothing_above_the_table(window, open_and_wait, qtbot, write_workload):
    from ..conftest import tv

    panel = window.models_panel
    path = write_workload([tv("a", "resnet18", num_classes=2), tv("b", "resnet18", num_classes=2)],
                          input_size=[3, 16, 16])
    y = panel.add_button.mapTo(window, panel.add_button.rect().topLeft()).y()
    open_and_wait(window, path)
    assert window.random_hint.isVisibleTo(panel)
    assert panel.add_button.mapTo(window, panel.add_button.rect().topLeft()).y() == y
    assert window.random_hint.geometry().top() >= panel.table.geometry().bottom()


def test_help_opens_the_readme(window, monkeypatch):
    opened = []
    monkeypatch.setattr(window, "open_url", lambda url: opened.append(url) or True)
    window.readme_action.trigger()
    assert len(opened) == 1 and opened[0].isLocalFile()
    assert opened[0].toLocalFile() == str(ROOT / "README.md")
    assert "GEMEL" in (ROOT / "README.md").read_text(encoding="utf-8")[:2000]


def test_spin_box_arrows_are_images_of_each_theme(window):
    import re

    from PySide6.QtCore import QFile

    from gemel_studio.ui import settings

    for theme in settings.THEMES:
        names = re.findall(r"url\(gemel:([\w.-]+)\)", settings.stylesheet(theme))
        assert {f"arrow-{d}-{theme}{s}.svg" for d in ("up", "down") for s in ("", "-disabled")} <= set(names)
        assert all(QFile.exists(f"gemel:{n}") for n in names)
