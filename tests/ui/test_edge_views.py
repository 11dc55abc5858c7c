"""The edge screens driven through their real widgets: Live preview, Export and Monitor.

They run the runtime for real on the small bundle of `tests/test_bundle.py` (three ResNet-18
at 16x16 sharing layers, and a MobileNet that shares nothing): the preview runs `Engine` on
synthetic and video streams, the export runs `export_bundle`, and the monitor polls a real
`MetricsServer` over a real engine. Figures on screen are compared with the runtime's own.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from gemel_studio.units import human_bytes  # noqa: E402
from gemel_studio.runtime import load_bundle  # noqa: E402
from gemel_studio.runtime.engine import Engine  # noqa: E402
from gemel_studio.runtime.metrics import MetricsServer  # noqa: E402
from gemel_studio.runtime.sources import SyntheticSource  # noqa: E402
from gemel_studio.runtime.telemetry import StreamRow  # noqa: E402
from gemel_studio.ui.preview_view import StreamTile  # noqa: E402
from gemel_studio.ui.run_widgets import RunGauges  # noqa: E402

from ..test_bundle import bundle, merged  # noqa: E402,F401  (fixtures)
from .conftest import open_preview, write_video  # noqa: E402

MIB = 2**20
MODELS = ["color", "shape", "size", "spare"]


def _click(qtbot, button) -> None:
    assert button.isEnabled(), button.text()
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message


@pytest.fixture
def preview(window, bundle):  # noqa: F811
    """The Preview tab on the exported bundle, settings for a short CPU run."""
    panel = open_preview(window, bundle[1], "merged")
    panel.device_budget_check.setChecked(False)  # a budget set here, not the device's
    panel.budget_spin.setValue(256)
    return panel


def _run_until_frames(qtbot, panel, streams: list[int], timeout=30_000) -> None:
    """Wait until the tiles of `streams` show a processed frame and their counters moved."""
    def shown():
        snap = panel.last_snapshot
        return (snap is not None and len(panel.tiles) == len(panel.streams)
                and all(panel.tiles[i].frame_view.has_frame and snap.streams[i].processed >= 3
                        for i in streams))
    qtbot.waitUntil(shown, timeout=timeout)


# --- Live preview ------------------------------------------------------------------------------


def test_preview_shows_frames_labels_and_counters_and_stops_cleanly(window, preview, qtbot, tmp_path):
    panel = preview
    assert "4 models (color, shape, size, spare)" in panel.bundle_label.text()
    # Two synthetic streams through the buttons; the second goes through color and size only.
    panel.fps_spin.setValue(5)  # slow streams: a busy machine still meets their deadlines
    _click(qtbot, panel.add_synthetic_button)
    panel.fps_spin.setValue(4)
    _click(qtbot, panel.add_synthetic_button)
    panel.streams_list.setCurrentRow(1)
    assert [panel.models_list.item(i).text() for i in range(panel.models_list.count())] == MODELS
    for i in (1, 3):  # uncheck shape and spare
        panel.models_list.item(i).setCheckState(Qt.CheckState.Unchecked)
    assert panel.streams[0].models == [] and panel.streams[1].models == ["color", "size"]
    panel.models_list.item(0).setCheckState(Qt.CheckState.Unchecked)
    panel.models_list.item(2).setCheckState(Qt.CheckState.Unchecked)  # the last one: refused
    assert panel.streams[1].models == ["size"]
    assert panel.models_list.item(2).checkState() == Qt.CheckState.Checked
    panel.models_list.item(0).setCheckState(Qt.CheckState.Checked)
    assert panel.streams[1].models == ["color", "size"]
    # A short video that ends while the others go on.
    panel.add_video_stream(write_video(tmp_path / "clip.avi", frames=10, fps=20), models=["size"])
    assert panel.streams_list.count() == 3

    with qtbot.waitSignal(panel.sigWorkerStarted):
        _click(qtbot, panel.start_button)
    assert not panel.start_button.isEnabled() and not panel.add_synthetic_button.isEnabled()
    _run_until_frames(qtbot, panel, [0, 1])
    qtbot.waitUntil(lambda: not panel.tiles[2].ended_label.isHidden(), timeout=15_000)
    assert panel.stop_button.isEnabled()

    engine = panel.engine
    manifest = {m.name: m for m in panel.manifest.models}
    tiles = panel.tiles
    assert [t.title.text() for t in tiles] == ["synthetic:5 → color, shape, size, spare",
                                              "synthetic:4 → color, size", "clip.avi → size"]
    for tile in tiles[:2]:
        lines = tile.outputs_label.text().splitlines()
        assert [line.split(":")[0] for line in lines] == tile.models
        for model, line in zip(tile.models, lines):  # 'color: 2 (0.41)': a label of the model's, a score
            label, score = line.split(": ", 1)[1].rsplit(" (", 1)
            assert label in manifest[model].labels and 0 < float(score.rstrip(")")) <= 1
        assert f"of {tile.name.split(':')[1]} fps processed · " in tile.stats_label.text()
        assert "dropped (" in tile.stats_label.text()
        assert tile.frame_view.image.width() == 64  # the synthetic frame itself, drawn scaled up
        assert tile.frame_view.image_rect().width() > 64
    assert tiles[2].ended_label.text() == "ended: ended"
    assert " of 256.0 MiB budget (" in panel.gauges.resident_bar.text()
    assert panel.gauges.gpu_bar.text() == "no GPU (device cpu)" and not panel.gauges.gpu_bar.isEnabled()
    assert "frames (" in panel.gauges.drops_bar.text()

    with qtbot.waitSignal(panel.sigRunEnded, timeout=15_000) as ended:
        _click(qtbot, panel.stop_button)
        assert not panel.stop_button.isEnabled()  # while it stops
    final = ended.args[0]
    assert panel.worker is None and not panel._pool.activeThreadCount()
    assert final.state == "stopped: cancelled" and engine.stopped == "cancelled"
    assert panel.start_button.isEnabled() and not panel.stop_button.isEnabled()
    assert panel.add_synthetic_button.isEnabled() and panel.policy_combo.isEnabled()
    assert "Stopped after" in panel.status_label.text()
    resident = human_bytes(final.memory.runtime_resident_bytes)
    assert panel.gauges.resident_bar.text().startswith(f"{resident} of 256.0 MiB budget")
    # The tables show the final counters: every frame that came in, processed or dropped.
    table = panel.stream_model
    for row, s in enumerate(final.streams):
        assert s.frames_in == s.processed + s.dropped
        assert table.text(row, "In") == str(s.frames_in) and table.text(row, "Done") == str(s.processed)
    assert final.streams[2].frames_in == 10 and table.text(2, "Ended") == "ended"
    assert {panel.model_model.text(r, "Model") for r in range(4)} == set(MODELS)
    assert window.banner.message == ""


def test_preview_errors_are_one_line(window, preview, qtbot, tmp_path):
    panel = preview
    panel.add_synthetic_stream(5)
    panel.budget_spin.setValue(1)  # far below one ResNet-18
    with qtbot.waitSignal(window.sigError, timeout=30_000) as error:
        _click(qtbot, panel.start_button)
    qtbot.waitUntil(lambda: panel.worker is None)
    message = error.args[0]
    assert _one_line(message) and "memory budget" in message and window.banner.message == message
    assert panel.tiles == [] and panel.start_button.isEnabled()

    # Unlimited needs no budget: the field is off.
    panel.policy_combo.setCurrentText("unlimited")
    assert not panel.budget_spin.isEnabled() and panel.budget_bytes() is None

    assert not panel.set_bundle_path(tmp_path / "nowhere")
    assert _one_line(window.banner.message) and "no such bundle" in window.banner.message
    assert not panel.set_bundle_path(tmp_path)  # a folder, but not a bundle
    assert _one_line(window.banner.message) and "manifest.json" in window.banner.message
    assert not panel.start_button.isEnabled()
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not an archive" * 100)
    assert not panel.set_bundle_path(junk)
    assert _one_line(window.banner.message) and "bundle archive" in window.banner.message


def test_closing_the_window_stops_a_running_preview(window, preview, qtbot):
    panel = preview
    panel.add_synthetic_stream(10, models=["color"])
    _click(qtbot, panel.start_button)
    _run_until_frames(qtbot, panel, [0])
    engine = panel.engine
    window.close()  # stop_work: cancel and wait for the run's thread
    assert engine.stopped == "cancelled" and not panel._pool.activeThreadCount()
    qtbot.waitUntil(lambda: panel.worker is None)


def test_loop_acts_on_the_selected_stream_and_a_non_video_is_refused(window, preview, tmp_path):
    panel = preview
    junk = tmp_path / "notes.avi"
    junk.write_text("not a video\n" * 50)
    assert panel.add_video_stream(junk) is None
    assert _one_line(window.banner.message) and "not a video" in window.banner.message and panel.streams == []

    clip = write_video(tmp_path / "clip.avi", frames=10, fps=20)
    first, second = panel.add_video_stream(clip), panel.add_video_stream(clip)
    assert first.fps == 20 and "clip.avi, 20 fps" in panel.streams_list.item(0).text()
    panel.streams_list.setCurrentRow(1)
    panel.loop_check.setChecked(True)  # acts on the selected stream, the second
    assert second.loop and not first.loop and "(loop)" in panel.streams_list.item(1).text()
    panel.streams_list.setCurrentRow(0)
    assert not panel.loop_check.isChecked()  # the box shows the selected stream's setting
    panel.streams_list.setCurrentRow(1)
    assert panel.loop_check.isChecked()
    assert second.source(seed=0).loop and not first.source(seed=0).loop


def test_preview_runs_the_chosen_backend_and_loading(window, preview, qtbot):
    panel = preview
    panel.backend_combo.setCurrentText("onnxruntime")
    assert not panel.load_combo.isEnabled() and panel.load_combo.currentText() == "whole"
    panel.backend_combo.setCurrentText("torch")
    assert panel.load_combo.isEnabled()
    panel.load_combo.setCurrentText("layered")
    panel.policy_combo.setCurrentText("time-sharing")
    panel.budget_spin.setValue(50)  # one resnet18 at a time: every switch loads layer by layer
    panel.add_synthetic_stream(4, models=["color", "shape"])
    _click(qtbot, panel.start_button)
    _run_until_frames(qtbot, panel, [0], timeout=60_000)
    engine = panel.engine
    assert engine.load == "layered" and engine.backend == "torch"
    rows = panel.model_model.rows
    assert {panel.model_model.text(r, "Loading") for r in range(len(rows))} == {"layered"}
    panel.stop(wait_ms=10_000)
    qtbot.waitUntil(lambda: panel.worker is None)


def test_file_dialogs_start_where_the_last_choice_was(window, preview, qtbot, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    (tmp_path / "clips").mkdir()
    video = write_video(tmp_path / "clips" / "a.avi", frames=3, fps=10)
    starts = []

    def answer(parent, title, start, file_filter):
        starts.append(start)
        return str(video), file_filter

    monkeypatch.setattr(QFileDialog, "getOpenFileName", answer)
    preview.choose_video()
    preview.choose_video()  # the second dialog opens in the first answer's folder
    assert [c.path for c in preview.streams] == [video, video]
    assert starts[1] == str(video.parent)
    # Export's merged-folder dialog keeps its own place.
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda parent, title, start: starts.append(start) or "")
    window.export_panel.choose_merged_dir()
    assert starts[2] == "" and window.export_panel.merged_edit.text() == ""


def test_a_folder_of_images_plays_as_a_stream_to_its_end(window, preview, qtbot, tmp_path, monkeypatch):
    from PIL import Image
    from PySide6.QtWidgets import QFileDialog

    folder = tmp_path / "stills"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(folder / f"{i:02d}.png")
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda parent, title, start: str(folder))
    _click(qtbot, preview.add_images_button)
    assert preview.streams[0].path == folder
    assert preview.streams_list.item(0).text() == "1. stills/ → all models"
    with qtbot.waitSignal(preview.sigWorkerStarted):
        _click(qtbot, preview.start_button)
    assert not preview.add_images_button.isEnabled()
    with qtbot.waitSignal(preview.sigRunEnded, timeout=30_000) as ended:
        pass
    stream = ended.args[0].streams[0]
    assert stream.frames_in == 6 == stream.processed + stream.dropped
    assert preview.add_images_button.isEnabled()


# --- Export ----------------------------------------------------------------------------------


def test_export_lists_checks_and_opens_the_archive_in_the_preview(window, merged, qtbot, tmp_path):  # noqa: F811
    panel = window.export_panel
    window.tabs.setCurrentWidget(panel)
    assert not panel.export_button.isEnabled() and not panel.preview_button.isEnabled()
    panel.set_merged_dir(merged[0])
    assert panel.out_edit.text() == str(merged[0].with_name("merged-bundle"))  # follows the merged folder
    panel.set_out_path(tmp_path / "edge")
    panel.archive_check.setChecked(True)
    with qtbot.waitSignal(panel.sigExported, timeout=120_000) as done:
        _click(qtbot, panel.export_button)
        assert not panel.export_button.isEnabled()
    result = done.args[0]
    assert result.ok and result.bundle == tmp_path / "edge.tar" and result.bundle.is_file()
    checks = panel.checks_model
    assert checks.rowCount() == len(result.checks) >= 8
    for row, check in enumerate(result.checks):
        assert checks.data(checks.index(row, 0)) == check.name
        assert checks.data(checks.index(row, 1)) == "passed"
    names = [checks.data(checks.index(r, 0)) for r in range(checks.rowCount())]
    assert {"color: onnx checker", "weights stored once", "sharing matches the plan"} <= set(names)
    assert panel.models_model.rowCount() == 4
    n = len(result.checks)
    assert f"Checks: {n} of {n} passed" in panel.summary_label.text()
    assert f"Weights stored once: {human_bytes(result.weights_data_bytes)}" in panel.summary_label.text()
    assert "spare: not merged" in panel.notes_label.text()
    assert window.banner.message == ""

    # Open it in the Live preview, run it, stop: the archive's extraction folder goes with the run.
    _click(qtbot, panel.preview_button)
    preview = window.preview_panel
    assert window.tabs.currentWidget() is preview
    assert preview.bundle_edit.text() == str(result.bundle) and "4 models" in preview.bundle_label.text()
    preview.policy_combo.setCurrentText("time-sharing")
    preview.device_budget_check.setChecked(False)
    preview.budget_spin.setValue(64)
    preview.device_combo.setCurrentText("cpu")
    preview.add_synthetic_stream(5, models=["color", "spare"])
    _click(qtbot, preview.start_button)
    _run_until_frames(qtbot, preview, [0], timeout=60_000)
    folder = preview.engine.bundle.folder
    assert folder.is_dir()
    with qtbot.waitSignal(preview.sigRunEnded, timeout=15_000) as ended:
        _click(qtbot, preview.stop_button)
    assert not folder.exists()  # Bundle.close() removed the extraction
    models = ended.args[0].models
    assert models["color"].swaps >= 1 and models["spare"].swaps >= 1  # time-sharing swaps whole models


def test_export_of_a_bad_folder_is_a_one_line_error(window, qtbot, tmp_path):
    panel = window.export_panel
    (tmp_path / "empty").mkdir()
    panel.set_merged_dir(tmp_path / "empty")
    with qtbot.waitSignal(window.sigError, timeout=30_000) as error:
        _click(qtbot, panel.export_button)
    message = error.args[0]
    assert _one_line(message) and "not a complete merged folder" in message
    assert panel.worker is None and panel.checks_model.rowCount() == 0
    assert not panel.preview_button.isEnabled() and panel.export_button.isEnabled()
    assert panel.status_label.text() == "Failed: the message is shown above"  # the message shows once
    assert window.banner.message == message


# --- Monitor ---------------------------------------------------------------------------------


def test_monitor_shows_what_the_engine_counted_then_the_disconnect(window, bundle, qtbot):  # noqa: F811
    panel = window.monitor_panel
    window.tabs.setCurrentWidget(panel)
    assert panel.address_edit.text() == "127.0.0.1:9400"
    states: list[str] = []
    panel.sigSnapshot.connect(lambda snap: states.append(snap["state"]))
    with load_bundle(bundle[1]) as loaded:
        streams = [(SyntheticSource(fps=20, size=(16, 16), frames=40, seed=1), ["color", "size"]),
                   (SyntheticSource(fps=10, size=(16, 16), frames=15, seed=2), ["spare"])]
        engine = Engine(loaded, streams, "merged", 200 * MIB, "cpu")
        server = MetricsServer(engine.snapshot)
        run = threading.Thread(target=engine.run, name="test-engine")
        try:
            run.start()
            panel.set_address(f"127.0.0.1:{server.port}")
            _click(qtbot, panel.connect_button)
            assert not panel.connect_button.isEnabled() and panel.disconnect_button.isEnabled()
            qtbot.waitUntil(lambda: panel.connected, timeout=10_000)
            run.join(timeout=30)
            assert not run.is_alive()
            final = engine.snapshot().to_dict()
            assert final["state"] == "stopped: sources ended"

            def shows_final():
                table = panel.stream_model
                return table.rowCount() == 2 and all(
                    table.text(r, "In") == str(s["frames_in"]) and table.text(r, "Done") == str(s["processed"])
                    and table.text(r, "Dropped") == str(s["dropped"]) for r, s in enumerate(final["streams"]))
            qtbot.waitUntil(shows_final, timeout=10_000)
        finally:
            server.close()  # the run goes away
    assert "running" in states and states[-1] == "stopped: sources ended"
    assert final["streams"][0]["frames_in"] == 40 and final["streams"][1]["frames_in"] == 15
    assert panel.stream_model.text(0, "Ended") == "ended"
    # Until the poll notices the server went, the last snapshot's state; then "finished".
    assert panel.state_label.text().startswith(("stopped: sources ended", "finished (stopped: sources ended)"))
    # A finished run has released its weights; its peak stays.
    assert final["memory"]["runtime_resident_bytes"] == 0
    assert panel.gauges.resident_bar.text() == (
        f"0 B of 200.0 MiB budget (0%), peak {human_bytes(final['memory']['runtime_peak_resident_bytes'])}")
    # Curves: points over the run's time; the stream's rate is from its counter's change.
    t, fps = panel.fps_series(final["streams"][0]["name"])
    assert len(t) >= 2 and len(t) == len(fps) and np.all(np.diff(t) > 0) and fps.max() > 0
    t, resident = panel.resident_series()
    assert resident[-1] == final["memory"]["runtime_resident_bytes"]
    assert panel.budget_line.isVisible() and panel.budget_line.value() == 200

    with qtbot.waitSignal(panel.sigDisconnected, timeout=10_000) as gone:
        pass
    assert _one_line(gone.args[0]) and panel.connection_label.text().startswith("disconnected: ")
    assert panel.run_end == "finished" and panel.state_label.text().startswith("finished (stopped: sources ended)")
    assert "running" not in panel.state_label.text()
    assert panel.stream_model.text(0, "In") == "40"  # the last values stay
    _click(qtbot, panel.disconnect_button)
    assert not panel.polling and panel.connect_button.isEnabled()
    assert panel.stop(wait_ms=5_000)
    assert window.banner.message == ""


def test_monitor_connect_to_nothing_is_a_one_line_error(window, qtbot):
    panel = window.monitor_panel
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    panel.set_address(f"127.0.0.1:{port}")
    with qtbot.waitSignal(window.sigError, timeout=10_000) as error:
        _click(qtbot, panel.connect_button)
    assert _one_line(error.args[0]) and "cannot connect" in error.args[0]
    assert not panel.polling and panel.connect_button.isEnabled() and panel.snapshot is None


def test_monitor_a_run_lost_while_running_does_not_look_finished(window, bundle, qtbot):  # noqa: F811
    panel = window.monitor_panel
    with load_bundle(bundle[1]) as loaded:
        engine = Engine(loaded, [(SyntheticSource(fps=10, size=(16, 16), frames=5, seed=1), ["color"])],
                        "merged", 200 * MIB, "cpu")
        running = {**engine.snapshot().to_dict(), "state": "running", "elapsed_s": 29.6}
        server = MetricsServer(lambda: running)  # a run that is killed: it never says it stopped
        try:
            panel.set_address(f"127.0.0.1:{server.port}")
            _click(qtbot, panel.connect_button)
            qtbot.waitUntil(lambda: panel.connected, timeout=10_000)
            assert panel.state_label.text().startswith("running, 29.6 s")
        finally:
            server.close()
        with qtbot.waitSignal(panel.sigDisconnected, timeout=10_000):
            pass
    assert panel.run_end == "lost" and panel.state_label.text().startswith("lost: stopped answering while running")
    assert not panel.state_label.text().startswith("running")
    assert panel.stop(wait_ms=5_000)


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:port", "127.0.0.1:70000", ":9400"])
def test_monitor_an_invalid_address_is_refused_and_not_offered_again(window, address):
    from gemel_studio.ui import settings as studio_settings

    panel = window.monitor_panel
    panel.set_address(address)
    assert not panel.connect_to()
    assert "not host:port" in window.banner.message and _one_line(window.banner.message)
    assert not panel.polling
    saved = studio_settings.studio_settings().value("monitor/address", "", type=str)
    assert saved != address


def test_gauges_show_gpu_memory_only_when_the_snapshot_has_device_figures(qtbot):
    gauges = RunGauges()
    qtbot.addWidget(gauges)
    snap = {"device": "cuda:0", "streams": [
        {"frames_in": 100, "dropped": 25, "dropped_late": 20, "dropped_refused": 5}],
        "memory": {"budget_bytes": 100 * MIB, "runtime_resident_bytes": 50 * MIB,
                   "runtime_peak_resident_bytes": 60 * MIB, "process_rss_bytes": 900 * MIB,
                   "torch_allocated_bytes": 55 * MIB, "torch_reserved_bytes": 64 * MIB,
                   "device_used_bytes": 2 * 1024 * MIB, "device_total_bytes": 8 * 1024 * MIB}}
    gauges.show_snapshot(snap)
    assert gauges.resident_bar.text() == "50.0 MiB of 100.0 MiB budget (50%), peak 60.0 MiB"
    assert gauges.resident_bar.value() == 500
    assert gauges.gpu_bar.text() == "2.0 GiB of 8.0 GiB (25%)" and gauges.gpu_bar.value() == 250
    assert gauges.drops_bar.text() == "25 of 100 frames (25.0%): late 20, refused 5"
    assert gauges.memory_label.text() == "process RSS 900.0 MiB; torch allocated 55.0 MiB, reserved 64.0 MiB"
    del snap["memory"]["device_used_bytes"], snap["memory"]["device_total_bytes"]
    gauges.show_snapshot(snap)
    assert "no device figures" in gauges.gpu_bar.text() and not gauges.gpu_bar.isEnabled()


def test_a_tile_draws_a_detector_boxes_over_the_frame(qtbot):
    """The small bundle has classifiers only: a detector's output, as `describe_output` gives it."""
    import torch
    from PySide6.QtGui import QColor

    tile = StreamTile("camera:0", ["det"])
    qtbot.addWidget(tile)
    tile.resize(520, 420)
    tile.show()
    latest = {"timestamp": 1.0, "frame": torch.zeros(3, 30, 40), "outputs": {"det": {
        "task": "detection", "boxes": [[0.25, 0.2, 0.75, 0.8]], "scores": [0.9], "labels": ["person"]}}}
    stats = StreamRow("camera:0", ["det"], fps=30.0, frames_in=10, dropped=1, throughput_fps=27.0)
    tile.show_state(stats, latest, {"det": "#ff0000"})
    assert tile.outputs_label.text() == "det: 1 box (person 0.90)"
    assert tile.stats_label.text() == "27.0 of 30 fps processed · 10.0% dropped (1/10)"
    view = tile.frame_view
    image = view.grab().toImage()
    rect = view.image_rect()
    assert rect.width() / rect.height() == pytest.approx(40 / 30)
    left = round(rect.x() + 0.25 * rect.width())
    middle = round(rect.y() + 0.5 * rect.height())
    assert QColor(image.pixel(left, middle)).red() > 200  # the box's left edge, in the model's colour
    assert QColor(image.pixel(round(rect.center().x()), middle)).red() < 50  # inside: the black frame
