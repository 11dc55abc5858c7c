"""The run widgets (gauges, Streams and Models tables) read in a 1024x700 window, on the Monitor
and the Live preview: the real widgets in the real window, offscreen, with figures of a
realistic size. A gauge too narrow for its text shows a shorter one (the whole in its tooltip);
the tables hide their less-read columns until the header's menu shows them."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from gemel_studio.runtime.telemetry import MemoryReport, ModelRow, RunSnapshot, StreamRow  # noqa: E402
from gemel_studio.ui.columns import MENU_HINT  # noqa: E402
from gemel_studio.ui.run_widgets import Gauge, ModelTableModel, StreamTableModel  # noqa: E402

MIB = 2**20
STREAMS = [("synthetic:10", ["color", "shape", "size"], 10.0), ("door-left", ["color", "size"], 6.0),
           ("lobby-camera-2", ["shape"], 4.0), ("synthetic:25", ["color", "shape", "size"], 25.0)]


def _snapshot(t: float = 61.5) -> RunSnapshot:
    """A run a minute in, on four streams, its counters in the thousands, some streams ended."""
    streams = [StreamRow(name=name, models=models, fps=fps, frames_in=int(fps * t), processed=int(fps * t * 0.66),
                         dropped=int(fps * t) - int(fps * t * 0.66), dropped_late=int(fps * t * 0.3),
                         dropped_refused=int(fps * t * 0.04), dropped_error=0, latency_p50_ms=66.3,
                         latency_p99_ms=1166.7, throughput_fps=fps * 0.66, end_reason="ended" if k == 2 else None)
               for k, (name, models, fps) in enumerate(STREAMS)]
    models = {m: ModelRow(m, bytes=44_800_000, runs=960, batches=800, max_batch=16, swaps=430, load_seconds=16.2,
                          load_wait_seconds=16.21, loaded_bytes=430 * 44_800_000, infer_seconds=20.1, refused=12)
              for m in ("color", "shape", "size")}
    memory = MemoryReport(budget_bytes=64 * MIB, runtime_resident_bytes=int(62.1 * MIB),
                          runtime_peak_resident_bytes=int(62.1 * MIB), process_rss_bytes=1536 * MIB)
    return RunSnapshot(bundle="/tmp/gemel-shots-merge/tiny-bundle", policy="merged", backend="torch", device="cpu",
                       eviction="belady", state="running", last_error=None, elapsed_s=t, streams=streams,
                       models=models, memory=memory)


def _small(window, qtbot, panel) -> None:
    window.resize(1024, 700)
    window.tabs.setCurrentWidget(panel)
    qtbot.waitUntil(lambda: window.tabs.width() < 1024 and panel.isVisible())


def _shown_headers(view) -> list[str]:
    model, header = view.model(), view.horizontalHeader()
    return [h for c, (h, _) in enumerate(model.COLUMNS) if not header.isSectionHidden(c)]


def _reads_whole(view, qtbot) -> None:
    """No sideways scrolling, and every column shown as wide as its widest text."""
    qtbot.waitUntil(lambda: view.horizontalHeader().length() <= view.viewport().width())
    assert not view.horizontalScrollBar().isVisible()
    model, header, metrics = view.model(), view.horizontalHeader(), view.fontMetrics()
    for c, (name, _) in enumerate(model.COLUMNS):
        if not header.isSectionHidden(c) and name != model.STRETCH:
            widest = max(metrics.horizontalAdvance(model.text(r, name)) for r in range(model.rowCount()))
            assert header.sectionSize(c) >= widest, name


def _gauges_fit(gauges) -> None:
    for bar in (gauges.resident_bar, gauges.gpu_bar, gauges.drops_bar):
        shown, room = bar.shown_text(), bar.text_room()
        assert bar.fontMetrics().horizontalAdvance(shown) <= room, shown
        assert shown == bar.text() or bar.text() in bar.toolTip(), (shown, bar.toolTip())
        assert bar.tip in bar.toolTip()  # what it measures, as well


@pytest.mark.parametrize("tab", ["monitor_panel", "preview_panel"])
def test_the_streams_table_and_the_gauges_read_at_1024x700(window, qtbot, tab):
    panel = getattr(window, tab)
    _small(window, qtbot, panel)
    snap = _snapshot()
    panel.gauges.show_snapshot(snap)
    panel.stream_model.set_rows(snap.streams)
    panel.model_model.set_models(snap.models)
    assert _shown_headers(panel.stream_view) == ["Stream", "Models", "In", "Done", "Dropped", "p50", "p99", "fps",
                                                 "Ended"]
    _reads_whole(panel.stream_view, qtbot)
    _reads_whole(panel.model_view, qtbot)
    assert panel.stream_model.text(0, "Done") == str(snap.streams[0].processed)
    assert panel.stream_model.text(2, "Ended") == "ended"
    _gauges_fit(panel.gauges)
    bar = panel.gauges.resident_bar
    assert bar.text() == "62.1 MiB of 64.0 MiB budget (97%), peak 62.1 MiB"
    assert bar.shown_text() in bar.texts  # shortened, not cut: a figure is never half shown


def test_a_hidden_stream_column_is_in_the_header_menu_and_shows_fitted(window, qtbot):
    panel = window.monitor_panel
    _small(window, qtbot, panel)
    snap = _snapshot()
    panel.stream_model.set_rows(snap.streams)
    view, model = panel.stream_view, panel.stream_model
    header = view.horizontalHeader()
    headers = [h for h, _ in StreamTableModel.COLUMNS]
    tip = model.headerData(headers.index("p99"), Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole)
    assert "99th-percentile latency, ms" in tip and MENU_HINT in tip
    menu = view.columns_menu(None)
    actions = {a.text(): a for a in menu.actions()}
    assert list(actions) == headers
    assert [n for n, a in actions.items() if not a.isChecked()] == list(StreamTableModel.HIDDEN)
    late = headers.index("Late")
    actions["Late"].trigger()
    assert not header.isSectionHidden(late)
    assert header.sectionSize(late) >= view.fontMetrics().horizontalAdvance(model.text(0, "Late"))
    # Remembered, for the same table in the other tab too (made after the choice).
    from gemel_studio.ui.run_widgets import snapshot_table

    again = snapshot_table(StreamTableModel(), None)
    qtbot.addWidget(again)
    assert not again.horizontalHeader().isSectionHidden(late)
    assert again.horizontalHeader().isSectionHidden(headers.index("Refused"))
    assert set(ModelTableModel.HIDDEN) < {h for h, _ in ModelTableModel.COLUMNS}


def test_a_narrow_gauge_shows_a_shorter_text_then_elides_it(qtbot):
    bar = Gauge("What it measures")
    qtbot.addWidget(bar)
    texts = ("62.1 MiB of 64.0 MiB budget (97%), peak 62.1 MiB", "62.1 MiB of 64.0 MiB (97%)", "62.1 MiB (97%)")
    bar.set_texts(texts)
    bar.setValue(970)
    bar.show()
    metrics = bar.fontMetrics()
    widths = [metrics.horizontalAdvance(t) for t in texts]
    for width, expected in ((widths[0] + 40, texts[0]), (widths[1] + 40, texts[1]), (widths[2] + 40, texts[2])):
        bar.setFixedWidth(width)
        qtbot.waitUntil(lambda width=width: bar.width() == width)
        assert bar.shown_text() == expected
    bar.setFixedWidth(widths[2] // 2)
    qtbot.waitUntil(lambda: bar.width() == widths[2] // 2)
    shown = bar.shown_text()
    assert shown.endswith("…") and metrics.horizontalAdvance(shown) <= bar.text_room()
    assert bar.text() == texts[0] and bar.toolTip() == f"{texts[0]}\n\nWhat it measures"
    bar.grab()  # paints the shortened text without error
