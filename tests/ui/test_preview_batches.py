"""The Live preview's batch columns, its device-default memory budget, and a redraw that costs
only what changed (benchmarks/ui_probe.py measures the stalls; these tests pin the behaviour
that keeps them short).

The runs are real (`Engine` on the small bundle of `tests/test_bundle.py`); the table and gauge
tests drive the widgets with snapshot rows made here.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

pytest.importorskip("PySide6")

import torch  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402

from gemel_studio.runtime import telemetry  # noqa: E402
from gemel_studio.runtime.telemetry import MemoryReport, ModelRow, RunSnapshot, StreamRow  # noqa: E402
from gemel_studio.ui.run_widgets import ModelTableModel, RunGauges, StreamTableModel, snapshot_table  # noqa: E402

from ..test_bundle import bundle, merged  # noqa: E402,F401  (fixtures)
from .conftest import open_preview, write_video  # noqa: E402

MIB = 2**20
GIB = 2**30


@pytest.fixture
def preview(window, bundle):  # noqa: F811
    return open_preview(window, bundle[1], "unlimited")  # every model resident: frames queue, and batch


def _model_texts(panel, header: str) -> dict[str, str]:
    table = panel.model_model
    return {table.text(r, "Model"): table.text(r, header) for r in range(table.rowCount())}


# --- batch sizes -------------------------------------------------------------------------------


def test_the_models_table_shows_each_models_mean_and_largest_batch(window, preview, qtbot, tmp_path):
    panel = preview
    clip = write_video(tmp_path / "clip.avi", frames=12, fps=10)
    for _ in range(3):  # three streams whose frames arrive together: the models see batches
        panel.add_video_stream(clip, models=["color", "shape"])
    table = panel.model_model
    headers = [table.headerData(c, Qt.Orientation.Horizontal) for c in range(table.columnCount())]
    assert headers.index("Mean batch") == headers.index("Runs") + 1 and "Max batch" in headers
    tip = table.headerData(headers.index("Max batch"), Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole)
    assert "profile" in tip

    with qtbot.waitSignal(panel.sigRunEnded, timeout=60_000) as ended:  # the videos end: so does the run
        qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
    final = ended.args[0]
    assert final.state == "stopped: sources ended"
    used = {"color", "shape"}
    shown_mean, shown_max = _model_texts(panel, "Mean batch"), _model_texts(panel, "Max batch")
    assert set(shown_mean) == set(final.models)
    for name, row in final.models.items():
        if name not in used:  # no stream feeds it: no batch, and no profile
            assert shown_mean[name] == "-" and row.batches == 0
            continue
        assert row.batches >= 1 and row.max_batch >= 1
        assert shown_max[name] == str(row.max_batch)
        mean = float(shown_mean[name])
        assert mean == pytest.approx(row.mean_batch_size, abs=0.005)
        assert 1.0 <= mean <= row.max_batch
        assert row.mean_batch_size * row.batches == pytest.approx(row.runs)  # runs count frames


def test_batch_columns_read_a_served_snapshot_without_them(qapp):
    """A Monitor reading an older runtime's JSON (no batching fields) shows '-', not a crash."""
    table = ModelTableModel()
    table.set_models({"a": {"bytes": 10, "runs": 3}, "b": {"runs": 8, "batches": 4, "mean_batch_size": 2.0,
                                                       "max_batch": 4}})
    assert [table.text(0, "Mean batch"), table.text(0, "Max batch")] == ["-", "-"]
    assert [table.text(1, "Mean batch"), table.text(1, "Max batch")] == ["2.00", "4"]


# --- the device's budget -------------------------------------------------------------------------


def test_the_budget_defaults_to_what_the_device_holds_read_as_gemel_run_reads_it(window, preview, qtbot,
                                                                                 monkeypatch):
    panel = preview
    reads = []

    def capacity(device):
        reads.append(torch.device(device))
        return 3 * GIB + 5 * MIB + 123, "available memory"

    monkeypatch.setattr(telemetry, "device_capacity", capacity)  # the runtime's function, read where it is used
    panel.policy_combo.setCurrentText("merged")
    assert panel.device_budget_check.isChecked()  # the default, as `gemel run` without --memory-budget
    panel.show_device_budget()
    assert reads[-1] == torch.device("cpu")
    assert panel.budget_spin.value() == 3 * 1024 + 5 and not panel.budget_spin.isEnabled()
    assert panel.budget_note.text().startswith("Available memory now: 3.0 GiB")
    assert panel.budget_bytes() is None and panel.run_options().memory_budget is None  # chosen at Start

    panel.add_synthetic_stream(5, models=["color"])
    reads.clear()
    qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.last_snapshot is not None, timeout=60_000)
    assert reads == [torch.device("cpu")]  # read again as the run started, on the run's thread
    assert panel.last_snapshot.memory.budget_bytes == 3 * GIB + 5 * MIB + 123
    assert panel.budget_note.text() == "3.0 GiB: available memory at Start"
    assert not panel.device_budget_check.isEnabled() and not panel.budget_spin.isEnabled()
    with qtbot.waitSignal(panel.sigRunEnded, timeout=15_000):
        panel.stop()

    # Unchecked, the field is the budget, as --memory-budget; unlimited has none at all.
    panel.device_budget_check.setChecked(False)
    assert panel.budget_spin.isEnabled() and panel.budget_note.text() == "Set here (--memory-budget)"
    panel.budget_spin.setValue(300)
    assert panel.budget_bytes() == 300 * MIB == panel.run_options().memory_budget
    panel.device_budget_check.setChecked(True)
    panel.policy_combo.setCurrentText("unlimited")
    assert panel.budget_bytes() is None and not panel.device_budget_check.isEnabled()


def test_a_gpu_not_yet_used_is_read_at_start_not_on_the_gui_thread(window, preview, monkeypatch):
    panel = preview
    monkeypatch.setattr(panel, "budget_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def never(device):
        raise AssertionError("a CUDA context made on the GUI thread")

    monkeypatch.setattr(telemetry, "device_capacity", never)
    panel.budget_spin.setValue(256)
    panel.show_device_budget()
    assert panel.budget_note.text() == "Free GPU memory on cuda:0, read at Start"
    assert panel.budget_spin.value() == 256


def test_onnxruntime_on_auto_budgets_the_cpus_memory(window, preview):
    preview.device_combo.setCurrentText("auto")
    preview.backend_combo.setCurrentText("onnxruntime")
    assert preview.budget_device() == torch.device("cpu")


# --- CPU threads -----------------------------------------------------------------------------------


def test_cpu_threads_default_to_the_libraries_own_and_a_set_count_runs_and_is_given_back(window, preview, qtbot):
    panel = preview
    assert panel.threads_spin.value() == 0 and panel.threads_spin.text() == "one per core"
    assert panel.run_options().threads is None  # as `gemel run` without --threads

    def fresh_threads() -> int:  # torch's process setting, which a thread reads the first time it uses torch
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        return seen[0]

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not what the form asks for, whatever this machine's default; the run's thread
    try:  # reads it as it starts (with OpenMP each thread keeps its own count, seeded from that setting)
        panel.threads_spin.setValue(1)
        assert panel.run_options().threads == 1
        panel.add_synthetic_stream(5, models=["color"])
        qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: panel.last_snapshot is not None and panel.last_snapshot.threads is not None,
                        timeout=60_000)
        assert panel.last_snapshot.threads == 1  # the run's own figure, served in its snapshot
        assert not panel.threads_spin.isEnabled()  # fixed while the run works
        panel.refresh(force=True)
        assert ", 1 CPU thread, " in panel.state_label.text()
        with qtbot.waitSignal(panel.sigRunEnded, timeout=15_000):
            panel.stop()
        assert fresh_threads() == 3  # the run gave the setting back (the GUI thread's own never changed)
        assert panel.threads_spin.isEnabled()
    finally:
        torch.set_num_threads(before)


# --- what a redraw costs -------------------------------------------------------------------------


def _stream(name="cam", frames_in=10, processed=9, fps=10.0):
    return StreamRow(name=name, models=["a"], fps=fps, frames_in=frames_in, processed=processed,
                     dropped=frames_in - processed, dropped_late=frames_in - processed, throughput_fps=9.0)


class Signals:
    def __init__(self, model):
        self.resets, self.changes = 0, []
        model.modelReset.connect(self._reset)
        model.dataChanged.connect(lambda tl, br, roles=(): self.changes.append((tl.row(), tl.column(), br.row(),
                                                                                br.column())))

    def _reset(self):
        self.resets += 1


def test_a_refresh_with_the_same_figures_signals_nothing_and_a_change_only_its_cells(qapp):
    table = StreamTableModel()
    rows = [_stream("a"), _stream("b")]
    table.set_rows(rows)
    seen = Signals(table)
    table.set_rows([replace(r) for r in rows])  # new objects, the same figures
    assert seen.resets == 0 and seen.changes == []
    table.set_rows([rows[0], replace(rows[1], frames_in=11, dropped=2, dropped_late=2)])
    headers = [h for h, _ in StreamTableModel.COLUMNS]
    columns = [headers.index(h) for h in ("In", "Dropped", "Late")]
    assert seen.resets == 0 and seen.changes == [(1, min(columns), 1, max(columns))]
    assert table.text(1, "In") == "11" and table.text(0, "In") == "10"
    table.set_rows(rows[:1])  # a row fewer: the view starts over
    assert seen.resets == 1 and table.rowCount() == 1


def test_columns_widen_for_a_longer_figure_and_keep_a_users_width(qtbot):
    table = StreamTableModel()
    view = snapshot_table(table, None)
    qtbot.addWidget(view)
    view.resize(900, 200)
    view.show()
    table.set_rows([_stream("a")])
    header = view.horizontalHeader()
    col = [h for h, _ in StreamTableModel.COLUMNS].index("In")
    before = header.sectionSize(col)
    table.set_rows([_stream("a", frames_in=12_345_678_901_234, processed=9)])
    wide = header.sectionSize(col)
    assert wide > before and wide >= view.fontMetrics().horizontalAdvance("12345678901234")
    table.set_rows([_stream("a", frames_in=11)])  # a shorter figure: the column does not jump back
    assert header.sectionSize(col) == wide
    header.resizeSection(col, 300)  # the user's width survives the refreshes
    for n in range(12, 20):
        table.set_rows([_stream("a", frames_in=n)])
    assert header.sectionSize(col) == 300


def test_gauges_leave_a_bar_showing_the_same_figures_alone(qtbot, monkeypatch):
    gauges = RunGauges()
    qtbot.addWidget(gauges)
    memory = MemoryReport(budget_bytes=100 * MIB, runtime_resident_bytes=40 * MIB, runtime_peak_resident_bytes=50 * MIB)
    snap = RunSnapshot(bundle="b", policy="merged", backend="torch", device="cpu", eviction="belady", state="running",
                       last_error=None, elapsed_s=1.0, streams=[_stream()], models={"a": ModelRow("a")}, memory=memory)
    gauges.show_snapshot(snap)
    assert gauges.resident_bar.value() == 400 and gauges.resident_bar.text().startswith("40.0 MiB of 100.0 MiB")
    calls = []
    for bar in (gauges.resident_bar, gauges.gpu_bar, gauges.drops_bar):
        monkeypatch.setattr(bar, "setValue", lambda v, bar=bar: calls.append((bar, v)))
        monkeypatch.setattr(bar, "setFormat", lambda t, bar=bar: calls.append((bar, t)))
    gauges.show_snapshot(replace(snap))
    assert calls == []
    gauges.show_snapshot(replace(snap, streams=[_stream(frames_in=20, processed=10)]))
    assert {bar for bar, _ in calls} == {gauges.drops_bar}


def test_a_hidden_preview_takes_no_snapshot_and_catches_up_when_shown(window, qtbot):
    panel = window.preview_panel
    window.tabs.setCurrentIndex(0)
    assert window.tabs.currentWidget() is not panel and not panel.isVisible()
    memory = MemoryReport(budget_bytes=None)
    snap = RunSnapshot(bundle="b", policy="unlimited", backend="torch", device="cpu", eviction="belady",
                       state="running", last_error=None, elapsed_s=1.0, streams=[_stream("cam")], models={},
                       memory=memory)

    class Engine:
        calls = 0
        latest = [None]

        def snapshot(self):
            Engine.calls += 1
            return snap

    panel.engine = Engine()
    try:
        panel.refresh()
        assert Engine.calls == 0 and panel.stream_model.rowCount() == 0
        window.tabs.setCurrentWidget(panel)
        assert Engine.calls == 1 and panel.stream_model.text(0, "Stream") == "cam"
        window.tabs.setCurrentIndex(0)
        panel.refresh(force=True)  # the run's end: its final counters, shown or not
        assert Engine.calls == 2
    finally:
        panel.engine = None


def test_frames_redraw_every_refresh_and_figures_every_fourth(window, qtbot):
    from gemel_studio.ui.preview_view import FIGURES_EVERY

    panel = window.preview_panel
    window.tabs.setCurrentWidget(panel)
    snaps = [RunSnapshot(bundle="b", policy="unlimited", backend="torch", device="cpu", eviction="belady",
                         state="running", last_error=None, elapsed_s=float(i), models={}, memory=MemoryReport(),
                         streams=[_stream("cam", frames_in=10 + i)]) for i in range(2 * FIGURES_EVERY + 1)]

    class Engine:
        latest = [None]
        taken = 0

        def snapshot(self):
            Engine.taken += 1
            return snaps[Engine.taken - 1]

    panel.engine, panel.refreshes = Engine(), 0
    try:
        shown = []
        for _ in range(2 * FIGURES_EVERY):
            panel.refresh()
            shown.append(panel.stream_model.text(0, "In"))
        assert Engine.taken == 2 * FIGURES_EVERY and panel.last_snapshot is snaps[-2]  # every refresh reads the run
        assert shown == ["10"] * FIGURES_EVERY + [str(10 + FIGURES_EVERY)] * FIGURES_EVERY
        panel.refresh(force=True)
        assert panel.stream_model.text(0, "In") == str(10 + 2 * FIGURES_EVERY)
    finally:
        panel.engine = None


def test_a_tile_redraws_its_frame_each_time_and_its_counters_with_the_figures(qtbot):
    from gemel_studio.ui.preview_view import StreamTile

    tile = StreamTile("synthetic:10", ["a"])
    qtbot.addWidget(tile)
    tile.show()
    frame = {"timestamp": 1.0, "frame": torch.zeros(3, 8, 8),
             "outputs": {"a": {"task": "classification", "label": "red", "score": 0.5}}}
    tile.show_state(_stream(frames_in=10, processed=9), frame, {})
    assert tile.stats_label.text() == "9.0 of 10 fps processed · 10.0% dropped (1/10)"
    newer = {**frame, "timestamp": 2.0, "outputs": {"a": {"task": "classification", "label": "blue", "score": 0.7}}}
    tile.show_state(_stream(frames_in=20, processed=18), newer, {}, figures=False)
    assert tile.outputs_label.text() == "a: blue (0.70)" and tile.timestamp == 2.0  # the frame: at once
    assert tile.stats_label.text().endswith("(1/10)")  # the counters: with the next figures
    tile.show_state(_stream(frames_in=20, processed=18), newer, {})
    assert tile.stats_label.text().endswith("(2/20)")
