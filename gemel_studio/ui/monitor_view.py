"""The Monitor tab: watch a `gemel run --metrics-port N` running elsewhere (on this box or an
edge box), through its JSON snapshot.

Every half second a `Worker` fetches the snapshot (`runtime.metrics.fetch_snapshot`, the same
call a script would make) off the GUI thread, on the panel's own one-thread pool, and never
more than one at a time. The view shows the gauges and tables of the Live preview (shared
widgets in `run_widgets`) and curves over time: each stream's processed frames per second
(from the change in its `processed` counter between two snapshots, not the run's average) and
the runtime's resident weights against the budget. Curves keep the last `HISTORY` points.

When the run goes away the last values stay, the state says why it disconnected, and polling
goes on, so a run restarted on the same port is picked up again (its curves start afresh).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QThreadPool, Qt, QTimer, Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QLineEdit, QPushButton, QSplitter, QVBoxLayout, QWidget

from ..runtime.metrics import fetch_snapshot
from . import settings
from .memory_view import style_plot
from .run_widgets import ModelTableModel, RunGauges, StreamTableModel, run_state_text, snapshot_table, titled
from .settings import PALETTES
from .worker import Worker

MIB = 1024 * 1024
DEFAULT_ADDRESS = "127.0.0.1:9400"
POLL_MS = 500
FETCH_TIMEOUT_S = 1.5
HISTORY = 1200  # points per curve: ten minutes at two snapshots a second
RATE_WINDOW_S = 2.0  # a stream's rate is measured over this long: over one poll a 4 fps stream reads 2, 4 or 6


def address_problem(address: str) -> str:
    """Why `address` cannot be a metrics endpoint, in one line ('' when it can): host:port,
    the port a number from 1 to 65535."""
    if address.startswith(("http://", "https://")):
        return ""  # a URL: fetching it says what is wrong with it
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return (f"monitor address '{address}' is not host:port (e.g. 127.0.0.1:9400, the port of "
                f"`gemel run --metrics-port N`)")
    return ""


class RunHistory:
    """Bounded series over the run's elapsed seconds: per-stream processed frames per second
    (the change of its `processed` counter over the last `RATE_WINDOW_S`) and resident bytes."""

    def __init__(self, maxlen: int = HISTORY):
        self.maxlen = maxlen
        self.clear()

    def clear(self) -> None:
        self.t: deque[float] = deque(maxlen=self.maxlen)
        self.resident: deque[float] = deque(maxlen=self.maxlen)
        self.fps: dict[str, deque[float]] = {}
        self.budget: int | None = None
        self._last: dict | None = None
        self._recent: deque[tuple[float, dict[str, int]]] = deque()  # (elapsed, processed per stream)

    def add(self, snap: dict) -> bool:
        """Add a point; False when the snapshot is no later than the last one (a stopped run).
        A snapshot from another run (time went back, or other streams) starts afresh."""
        t = float(snap["elapsed_s"])
        names = [s["name"] for s in snap["streams"]]
        last = self._last
        if last is not None and (t < last["elapsed_s"] or names != [s["name"] for s in last["streams"]]):
            self.clear()
            last = None
        if last is not None and t <= last["elapsed_s"]:
            return False
        self._recent.append((t, {s["name"]: s["processed"] for s in snap["streams"]}))
        while len(self._recent) > 2 and t - self._recent[1][0] >= RATE_WINDOW_S:
            self._recent.popleft()  # keep the latest snapshot at least the window old
        t0, before = self._recent[0]
        for s in snap["streams"]:
            rate = (s["processed"] - before[s["name"]]) / (t - t0) if t > t0 else s["throughput_fps"]
            self.fps.setdefault(s["name"], deque(maxlen=self.maxlen)).append(rate)
        self.t.append(t)
        self.resident.append(float(snap["memory"]["runtime_resident_bytes"]))
        self.budget = snap["memory"].get("budget_bytes")
        self._last = snap
        return True


class MonitorPanel(QWidget):
    sigSnapshot = Signal(dict)  # each snapshot fetched
    sigDisconnected = Signal(str)  # a connected run went away: the reason
    sigError = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.address = ""
        self.polling = False
        self.connected = False  # the last poll succeeded
        self.snapshot: dict | None = None
        self.history = RunHistory()
        self.colors = PALETTES["dark"]
        self._session = 0  # bumped on connect and disconnect: answers of an older session are ignored
        self._ever_connected = False
        self.run_end = ""  # once a run went away: 'finished' or 'lost'
        self._worker: Worker | None = None  # the poll in flight
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.poll)

        self.address_edit = QLineEdit(settings.studio_settings().value("monitor/address", DEFAULT_ADDRESS, type=str),
                                      self)
        self.address_edit.setToolTip("host:port of a `gemel run --metrics-port N` (or its http:// URL)")
        self.address_edit.returnPressed.connect(self.connect_to)
        self.connect_button = QPushButton("Connect", self)
        self.connect_button.clicked.connect(self.connect_to)
        self.disconnect_button = QPushButton("Disconnect", self)
        self.disconnect_button.clicked.connect(self.disconnect)
        self.connection_label = QLabel("Not connected", self)
        self.connection_label.setWordWrap(True)
        self.connection_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.state_label = QLabel("", self)
        self.state_label.setWordWrap(True)
        self.state_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        top = QHBoxLayout()
        title = QLabel("Monitor", self)
        title.setObjectName("panelTitle")
        top.addWidget(title)
        top.addSpacing(12)
        top.addWidget(QLabel("Address", self))
        self.address_edit.setMinimumWidth(220)
        top.addWidget(self.address_edit)
        top.addWidget(self.connect_button)
        top.addWidget(self.disconnect_button)
        top.addSpacing(12)
        top.addWidget(self.connection_label, 1)

        self.gauges = RunGauges(self)
        self.stream_model = StreamTableModel(self)
        self.stream_view = snapshot_table(self.stream_model, self)
        self.model_model = ModelTableModel(self)
        self.model_view = snapshot_table(self.model_model, self)

        self.fps_plot = pg.PlotWidget(self)
        self.fps_item = self.fps_plot.getPlotItem()
        self.fps_item.setTitle(f"Processed frames per second, per stream (over {RATE_WINDOW_S:g} s)")
        self.fps_item.setLabel("left", "frames/s")
        self.fps_item.setLabel("bottom", "run time (s)")
        self.fps_item.setMenuEnabled(False)
        self.fps_legend = self.fps_item.addLegend(offset=(-10, 10))
        self.fps_curves: dict[str, pg.PlotDataItem] = {}
        self.resident_plot = pg.PlotWidget(self)
        self.resident_item = self.resident_plot.getPlotItem()
        self.resident_item.setTitle("Runtime resident weights (dashed: budget)")
        self.resident_item.setLabel("left", "MiB")
        self.resident_item.setLabel("bottom", "run time (s)")
        self.resident_item.setMenuEnabled(False)
        self.resident_curve = self.resident_item.plot([], [])
        self.budget_line = pg.InfiniteLine(angle=0, movable=False, label="budget",
                                           labelOpts={"position": 0.05, "anchors": [(0.0, 1.0), (0.0, 1.0)]})
        self.budget_line.setVisible(False)
        self.resident_item.addItem(self.budget_line)
        for item in (self.fps_item, self.resident_item):
            item.setClipToView(True)
            item.setDownsampling(auto=True, mode="peak")

        plots = QSplitter(Qt.Orientation.Horizontal, self)
        plots.addWidget(self.fps_plot)
        plots.addWidget(self.resident_plot)
        body = QSplitter(Qt.Orientation.Vertical, self)
        body.addWidget(plots)
        body.addWidget(titled(self, "Streams", self.stream_view))
        body.addWidget(titled(self, "Models (swaps: loads of a model's weights)", self.model_view))
        body.setSizes([400, 150, 150])

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.state_label)
        layout.addWidget(self.gauges)
        layout.addWidget(body, 1)
        self.set_colors(self.colors)
        self._update_enabled()

    # --- connecting -------------------------------------------------------------------------

    def set_address(self, address: str) -> None:
        self.address_edit.setText(address)

    def connect_to(self) -> bool:
        """Start polling the address; the views start afresh."""
        address = self.address_edit.text().strip()
        if not address:
            self._fail("enter the host:port of a `gemel run --metrics-port N`, e.g. 127.0.0.1:9400")
            return False
        problem = address_problem(address)
        if problem:
            self._fail(problem)  # and not saved: an address that cannot work is not offered again
            return False
        self._session += 1
        self.address, self.polling, self.connected, self._ever_connected = address, True, False, False
        self.snapshot = None
        self.history.clear()
        self._redraw_curves()
        self.gauges.clear()
        self.stream_model.set_rows([])
        self.model_model.set_rows([])
        self.state_label.setText("")
        self.run_end = ""
        self.connection_label.setText(f"Connecting to {address}…")
        self._update_enabled()
        self._timer.start()
        self.poll()
        return True

    def disconnect(self) -> None:
        """Stop polling; the last values stay."""
        if not self.polling:
            return
        self._session += 1
        self.polling = self.connected = False
        self._timer.stop()
        self.connection_label.setText(f"Not connected (last values from {self.address} kept)"
                                      if self.snapshot else "Not connected")
        self._update_enabled()

    def stop(self, wait_ms: int = 0) -> bool:
        """Stop polling and, with `wait_ms`, wait for a fetch in flight (closing the window)."""
        self.disconnect()
        return self._pool.waitForDone(wait_ms) if wait_ms else self._worker is None

    def poll(self) -> None:
        if not self.polling or self._worker is not None:
            return  # one fetch at a time: a slow answer is not stacked up behind
        session, address = self._session, self.address
        worker = Worker(lambda progress: fetch_snapshot(address, timeout=FETCH_TIMEOUT_S), name="metrics poll")
        worker.sigFinished.connect(lambda snap: self._on_snapshot(session, snap))
        worker.sigFailed.connect(lambda message: self._on_poll_failed(session, message))
        worker.sigCancelled.connect(lambda: self._poll_done())
        self._worker = worker
        worker.start(self._pool)

    def _poll_done(self) -> None:
        self._worker = None

    # --- answers (GUI thread) ---------------------------------------------------------------

    def _on_snapshot(self, session: int, snap: dict) -> None:
        self._poll_done()
        if session != self._session:
            return
        if not self._ever_connected:  # an address that answered: offered again next time
            settings.studio_settings().setValue("monitor/address", self.address)
        self.connected, self._ever_connected = True, True
        self.run_end = ""
        self.connection_label.setText(f"Connected to {self.address}")
        self.show_snapshot(snap)
        self.sigSnapshot.emit(snap)

    def _on_poll_failed(self, session: int, message: str) -> None:
        self._poll_done()
        if session != self._session:
            return
        if not self._ever_connected:  # a wrong address: say so once, do not keep knocking
            self.disconnect()
            self.connection_label.setText("Not connected")
            self._fail(message)
            return
        was_connected, self.connected = self.connected, False
        self.connection_label.setText(f"disconnected: {message} (last values kept; retrying)")
        self._show_run_end()
        if was_connected:
            self.sigDisconnected.emit(message)

    def _show_run_end(self) -> None:
        """The run went away: say whether it had finished (its last snapshot said it stopped)
        or was lost while running (killed, crashed, or the network went), so the two never
        look alike."""
        snap = self.snapshot
        if snap is None:
            return
        state, elapsed = str(snap.get("state", "")), float(snap.get("elapsed_s", 0.0))
        if state.startswith("stopped"):
            self.run_end = "finished"
            text = f"finished ({state}) after {elapsed:.1f} s; its metrics server has closed"
        else:
            self.run_end = "lost"
            text = (f"lost: stopped answering while {state or 'running'}, last seen at {elapsed:.1f} s "
                    f"(killed or crashed?); the last values are kept")
        self.state_label.setText(text)
        self.state_label.setProperty("runEnd", self.run_end)
        self.state_label.style().polish(self.state_label)

    def show_snapshot(self, snap: dict) -> None:
        self.snapshot = snap
        self.state_label.setText(run_state_text(snap))
        self.gauges.show_snapshot(snap)
        self.stream_model.set_rows(snap["streams"])
        self.model_model.set_models(snap["models"])
        if self.history.add(snap):
            self._redraw_curves()

    # --- curves -----------------------------------------------------------------------------

    def fps_series(self, stream: str) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.history.t, dtype=float), np.asarray(self.history.fps.get(stream, []), dtype=float)

    def resident_series(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.history.t, dtype=float), np.asarray(self.history.resident, dtype=float)

    def _redraw_curves(self) -> None:
        h = self.history
        if set(self.fps_curves) != set(h.fps):
            for curve in self.fps_curves.values():
                self.fps_item.removeItem(curve)
            self.fps_legend.clear()
            self.fps_curves = {}
            for name in h.fps:
                curve = self.fps_item.plot([], [], symbol="o", symbolSize=4)
                self.fps_curves[name] = curve
                self.fps_legend.addItem(curve, name)
            self._color_curves()
        t = np.asarray(h.t, dtype=float)
        top = 0.0
        for name, curve in self.fps_curves.items():
            y = np.asarray(h.fps[name], dtype=float)
            curve.setData(t, y)
            top = max(top, float(y.max()) if y.size else 0.0)
        # From zero, with room above the curves for the legend.
        self.fps_item.setYRange(0, max(1.0, top * 1.35), padding=0)
        resident = np.asarray(h.resident, dtype=float) / MIB
        self.resident_curve.setData(t, resident)
        if h.budget:
            self.budget_line.setValue(h.budget / MIB)
            self.budget_line.label.setFormat(f"budget {h.budget / MIB:.1f} MiB")
            self.budget_line.setVisible(True)
        else:
            self.budget_line.setVisible(False)
        peak = max(h.budget / MIB if h.budget else 0.0, float(resident.max()) if resident.size else 0.0)
        self.resident_item.setYRange(0, max(1.0, peak * 1.15), padding=0)

    # --- state ------------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        self.state_label.setText("Failed: the message is shown above")  # shown once, in the banner
        self.sigError.emit(message)

    def _update_enabled(self) -> None:
        self.connect_button.setEnabled(not self.polling)
        self.address_edit.setEnabled(not self.polling)
        self.disconnect_button.setEnabled(self.polling)

    def set_colors(self, colors: dict) -> None:
        self.colors = colors
        for widget, item in ((self.fps_plot, self.fps_item), (self.resident_plot, self.resident_item)):
            widget.setBackground(colors["background"])
            style_plot(item, colors)
            item.showGrid(x=True, y=True, alpha=colors["grid"] / 255)
        self.resident_curve.setPen(pg.mkPen(colors["params"], width=2))
        self.budget_line.setPen(pg.mkPen(colors["bound"], width=1.5, style=Qt.PenStyle.DashLine))
        self.budget_line.label.setColor(colors["bound"])
        self._color_curves()

    def _color_curves(self) -> None:
        series = self.colors["series"]
        self.fps_legend.setLabelTextColor(self.colors["foreground"])
        for i, curve in enumerate(self.fps_curves.values()):
            color = series[i % len(series)]
            curve.setPen(pg.mkPen(color, width=2))
            curve.setSymbolPen(pg.mkPen(color))
            curve.setSymbolBrush(pg.mkBrush(color))
        for sample, label in self.fps_legend.items:  # the legend keeps the old text colour otherwise
            label.setText(label.text, color=self.colors["foreground"])
