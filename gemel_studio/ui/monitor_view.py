"""The Monitor tab: watch `gemel run --metrics-port N` boxes running elsewhere (on this box or
edge boxes), through their JSON snapshots, or through a Prometheus server that scrapes them.

Two modes. "Boxes": a list of addresses (host:port, separated by commas or spaces), each polled
at `/metrics.json` (`runtime.metrics.fetch_snapshot`, the same call a script would make).
"Prometheus": one Prometheus server's HTTP API (`runtime.fleet.fleet_snapshots`), which gives
back one snapshot per `instance` it scrapes; the boxes it lists are the rows. Either way every
half second one `Worker` fetches everything off the GUI thread, on the panel's own one-thread
pool, never more than one at a time.

Each box is one row of the Boxes table (named by the `instance` its snapshot reports, or its
address until it does; the row's tooltip has both) and one set of curves: each stream's
processed frames per second (from the change of its `processed` counter,
`runtime.rates.RunHistory`, not the run's average) and the box's resident weights. The gauges and the stream and model tables below show
the selected row's box (the first by default), with the shared widgets of the Live preview.

When a box goes away its last values stay, its row says whether its run had finished or was
lost, and polling goes on, so a run restarted at the same address is picked up again (its
curves start afresh).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QModelIndex, QThreadPool, Qt, QTimer, Signal
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSplitter,
                               QVBoxLayout, QWidget)

from ..errors import GemelError
from ..runtime.fleet import fleet_snapshots
from ..runtime.metrics import fetch_snapshot
from ..runtime.rates import HISTORY, RATE_WINDOW_S, RunHistory  # noqa: F401  (HISTORY: re-exported)
from ..tasks import plural
from ..units import human_bytes
from . import settings
from .memory_view import style_plot
from .run_widgets import (ModelTableModel, RunGauges, SnapshotTableModel, StreamTableModel, run_state_text,
                          snapshot_table, titled)
from .settings import PALETTES
from .worker import Worker

MIB = 1024 * 1024
DEFAULT_ADDRESS = "127.0.0.1:9400"
DEFAULT_PROMETHEUS = "127.0.0.1:9090"
BOXES, PROMETHEUS = "boxes", "prometheus"
MODES = {BOXES: "Boxes", PROMETHEUS: "Prometheus"}
POLL_MS = 500
FETCH_TIMEOUT_S = 1.5


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


def split_addresses(text: str) -> list[str]:
    """The addresses of a list typed as 'a:1, b:2 c:3' (commas or spaces), each once, in order."""
    return list(dict.fromkeys(a for a in re.split(r"[,\s]+", text.strip()) if a))


class BoxWatch:
    """What the monitor knows of one box: its last snapshot, its rate history, and whether it
    answers. `key` is its address (Boxes mode) or its `instance` (Prometheus mode); `name` is
    the `instance` its snapshot reports, once it does (the address until then)."""

    def __init__(self, key: str):
        self.key = key
        self.snapshot: dict | None = None
        self.history = RunHistory()
        self.connected = False
        self.ever_connected = False
        self.run_end = ""  # once its run went away: 'finished' or 'lost'
        self.problem = ""  # why the last poll failed

    @property
    def name(self) -> str:
        instance = (self.snapshot or {}).get("instance")
        return str(instance) if instance else self.key

    @property
    def label(self) -> str:
        """Its name, with its address when that says something more: 'edge-07 (10.0.0.7:9400)'."""
        return self.key if self.name == self.key else f"{self.name} ({self.key})"

    def on_snapshot(self, snap: dict) -> bool:
        """A fresh snapshot; True when it added a point to the curves."""
        self.snapshot, self.connected, self.ever_connected = snap, True, True
        self.run_end, self.problem = "", ""
        return self.history.add(snap)

    def on_failure(self, message: str) -> bool:
        """The box did not answer; True when it was answering until now."""
        was, self.connected, self.problem = self.connected, False, message
        if self.snapshot is not None:
            self.run_end = "finished" if str(self.snapshot.get("state", "")).startswith("stopped") else "lost"
        return was

    def end_text(self) -> str:
        """Why its run is no longer seen, so a finished run and a killed one never look alike."""
        snap = self.snapshot or {}
        state, elapsed = str(snap.get("state", "")), float(snap.get("elapsed_s", 0.0))
        if self.run_end == "finished":
            return f"finished ({state}) after {elapsed:.1f} s; its metrics server has closed"
        if self.run_end == "lost":
            return (f"lost: stopped answering while {state or 'running'}, last seen at {elapsed:.1f} s "
                    f"(killed or crashed?); the last values are kept")
        return ""

    def status(self) -> str:
        if self.connected:
            return "connected"
        if self.run_end:
            return self.run_end
        return f"not answering: {self.problem}" if self.problem else "waiting"

    def details(self) -> str:
        """Everything its row stands for, one fact a line (the row's tooltip)."""
        snap = self.snapshot or {}
        streams = snap.get("streams", [])
        lines = [self.name if self.name == self.key else f"{self.name} at {self.key}",
                 f"status: {self.status()}"]
        if snap:
            resident = int(snap.get("memory", {}).get("runtime_resident_bytes", 0))
            lines += [f"run: {snap.get('state', '?')}, {float(snap.get('elapsed_s', 0.0)):.1f} s",
                      f"bundle: {snap.get('bundle_name') or snap.get('bundle', '-')}",
                      f"{plural(len(streams), 'stream')}: {sum(s.get('frames_in', 0) for s in streams)} frames in, "
                      f"{sum(s.get('dropped', 0) for s in streams)} dropped, "
                      f"{sum(self.history.latest_fps().values()):.1f} processed/s",
                      f"resident weights: {human_bytes(resident)}"]
        return "\n".join(lines)


def _streams(b: BoxWatch) -> list[dict]:
    return (b.snapshot or {}).get("streams", [])


def _dropped_share(streams: list[dict]) -> str:
    arrived = sum(s.get("frames_in", 0) for s in streams)
    return f"{sum(s.get('dropped', 0) for s in streams) / arrived:.1%}" if arrived else "-"


class BoxTableModel(SnapshotTableModel):
    """One row per box watched, in five short columns so the table fits beside the curves: its
    name, its figures now, and its run's state (or why it is not seen). A row's tooltip holds
    the rest (address, bundle, streams, frames in and dropped: `BoxWatch.details`)."""

    TEXT = frozenset({"Box", "Status"})
    STRETCH = "Status"
    COLUMNS = (
        ("Box", lambda b: b.name),
        ("fps", lambda b: f"{sum(b.history.latest_fps().values()):.1f}" if b.snapshot else "-"),
        ("Dropped", lambda b: _dropped_share(_streams(b)) if b.snapshot else "-"),
        ("Resident", lambda b: human_bytes(int((b.snapshot or {}).get("memory", {}).get("runtime_resident_bytes", 0)))
         if b.snapshot else "-"),
        # What a connected box runs ('running', 'stopped (eos)'), else why it is not seen.
        ("Status", lambda b: str((b.snapshot or {}).get("state") or "connected") if b.connected else b.status()),
    )
    TIPS = {"Box": "The box's instance name once its snapshot reports it, else its address "
                   "(hover a row for both)",
            "fps": f"Frames processed per second, all its streams (over {RATE_WINDOW_S:g} s)",
            "Dropped": "The share of the frames that arrived that were dropped, all its streams",
            "Resident": "Model weights the runtime holds resident",
            "Status": "Its run's state while it answers; else finished, lost or not answering"}

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if role == Qt.ItemDataRole.ToolTipRole and index.isValid():
            return self.rows[index.row()].details()
        return super().data(index, role)


def _fetch_boxes(addresses: list[str]) -> dict[str, tuple[bool, object]]:
    """Every box's snapshot, fetched at once: {address: (True, snapshot) or (False, message)}."""

    def one(address: str):
        try:
            return True, fetch_snapshot(address, timeout=FETCH_TIMEOUT_S)
        except GemelError as exc:
            return False, str(exc)

    if len(addresses) == 1:
        return {addresses[0]: one(addresses[0])}
    with ThreadPoolExecutor(max_workers=min(8, len(addresses)), thread_name_prefix="monitor-box") as pool:
        return dict(zip(addresses, pool.map(one, addresses)))


class MonitorPanel(QWidget):
    sigSnapshot = Signal(dict)  # each box's snapshot as it is fetched
    sigFleet = Signal(dict)  # each poll's answers: {box: snapshot} of the boxes that answered
    sigDisconnected = Signal(str)  # a box (or the Prometheus server) that answered went away: the reason
    sigError = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        store = settings.studio_settings()
        self.mode = store.value("monitor/mode", BOXES, type=str)
        if self.mode not in MODES:
            self.mode = BOXES
        self.address = ""  # what is being polled: the address list, or the Prometheus server
        self.polling = False
        self.boxes: dict[str, BoxWatch] = {}
        self.selected = ""  # the box the gauges and tables show
        self.server_connected = False  # Prometheus mode: the server answered last time
        self.colors = PALETTES["dark"]
        self._session = 0  # bumped on connect and disconnect: answers of an older session are ignored
        self._ever_connected = False
        self._worker: Worker | None = None  # the poll in flight
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self.poll)

        self.mode_combo = QComboBox(self)
        for key, text in MODES.items():
            self.mode_combo.addItem(text, key)
        self.mode_combo.setToolTip("Boxes: poll each `gemel run --metrics-port N` directly. Prometheus: read the "
                                   "boxes a Prometheus server scrapes (deploy/prometheus/prometheus.yml)")
        self.mode_combo.setCurrentIndex(list(MODES).index(self.mode))
        self.mode_combo.currentIndexChanged.connect(lambda _: self.set_mode(self.mode_combo.currentData()))
        self.address_edit = QLineEdit(self._saved_address(self.mode), self)
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
        top.addWidget(self.mode_combo)
        self.address_edit.setMinimumWidth(220)
        top.addWidget(self.address_edit, 1)
        top.addWidget(self.connect_button)
        top.addWidget(self.disconnect_button)
        top.addSpacing(12)
        top.addWidget(self.connection_label, 1)
        self._update_address_tip()

        self.box_model = BoxTableModel(self)
        self.box_view = snapshot_table(self.box_model, self)
        self.box_view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.box_view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.box_view.clicked.connect(lambda index: self.select_box(self.box_model.rows[index.row()].key))
        self.gauges = RunGauges(self)
        self.stream_model = StreamTableModel(self)
        self.stream_view = snapshot_table(self.stream_model, self)
        self.model_model = ModelTableModel(self)
        self.model_view = snapshot_table(self.model_model, self)

        self.fps_plot = pg.PlotWidget(self)
        self.fps_item = self.fps_plot.getPlotItem()
        # Short titles: in a 1024-pixel window each plot is about 300 px wide, and pyqtgraph
        # widens a plot to its title's width, pushing the next one out of the window.
        self.fps_item.setTitle("Processed frames/s per stream")
        self.fps_item.setLabel("left", f"frames/s (over {RATE_WINDOW_S:g} s)")
        self.fps_item.setLabel("bottom", "run time (s)")
        self.fps_item.setMenuEnabled(False)
        self.fps_legend = self.fps_item.addLegend(offset=(-10, 10))
        self.fps_curves: dict[tuple[str, str], pg.PlotDataItem] = {}  # (box, stream) -> curve
        self._legend_names: list[str] = []  # the box names the legends were drawn with
        self.resident_plot = pg.PlotWidget(self)
        self.resident_item = self.resident_plot.getPlotItem()
        self.resident_item.setTitle("Resident weights per box")
        self.resident_item.setLabel("left", "MiB (dashed: budget)")
        self.resident_item.setLabel("bottom", "run time (s)")
        self.resident_item.setMenuEnabled(False)
        self.resident_legend = self.resident_item.addLegend(offset=(-10, 10))
        self.resident_curves: dict[str, pg.PlotDataItem] = {}  # box -> curve
        self.budget_line = pg.InfiniteLine(angle=0, movable=False, label="budget",
                                           labelOpts={"position": 0.05, "anchors": [(0.0, 1.0), (0.0, 1.0)]})
        self.budget_line.setVisible(False)
        self.resident_item.addItem(self.budget_line)
        for item in (self.fps_item, self.resident_item):
            item.setClipToView(True)
            item.setDownsampling(auto=True, mode="peak")

        # The boxes beside the curves, not above them: the tab keeps the height it had for one box.
        plots = QSplitter(Qt.Orientation.Horizontal, self)
        boxes = titled(self, "Boxes (select one)", self.box_view)
        boxes.setToolTip("Select a box for its gauges and its stream and model tables")
        plots.addWidget(boxes)
        plots.addWidget(self.fps_plot)
        plots.addWidget(self.resident_plot)
        plots.setSizes([390, 310, 310])
        body = QSplitter(Qt.Orientation.Vertical, self)
        body.addWidget(plots)
        body.addWidget(titled(self, "Streams", self.stream_view))
        body.addWidget(titled(self, "Models (swaps: loads of a model's weights)", self.model_view))
        body.setSizes([400, 150, 150])
        for view in (self.box_view, self.stream_view, self.model_view):  # a short window scrolls them
            view.setMinimumHeight(40)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.state_label)
        layout.addWidget(self.gauges)
        layout.addWidget(body, 1)
        self.set_colors(self.colors)
        self._update_enabled()

    # --- what the rest of the studio (and a test) reads: the selected box -------------------

    @property
    def box(self) -> BoxWatch | None:
        return self.boxes.get(self.selected)

    @property
    def connected(self) -> bool:
        """Some box answered the last poll."""
        return any(b.connected for b in self.boxes.values())

    @property
    def snapshot(self) -> dict | None:
        return self.box.snapshot if self.box else None

    @property
    def history(self) -> RunHistory:
        return self.box.history if self.box else RunHistory()

    @property
    def run_end(self) -> str:
        return self.box.run_end if self.box else ""

    def instances(self) -> list[str]:
        """The boxes watched, in row order (addresses, or the instances Prometheus lists)."""
        return list(self.boxes)

    def box_history(self, key: str) -> RunHistory:
        return self.boxes[key].history

    def box_row_text(self, key: str, header: str) -> str:
        return self.box_model.text(list(self.boxes).index(key), header)

    # --- connecting -------------------------------------------------------------------------

    def _saved_address(self, mode: str) -> str:
        key, default = (("monitor/prometheus", DEFAULT_PROMETHEUS) if mode == PROMETHEUS
                        else ("monitor/address", DEFAULT_ADDRESS))
        return settings.studio_settings().value(key, default, type=str)

    def _update_address_tip(self) -> None:
        self.address_edit.setToolTip(
            "host:port of the Prometheus server (or its http:// URL)" if self.mode == PROMETHEUS else
            "host:port of each `gemel run --metrics-port N` to watch (or its http:// URL), separated by commas")

    def set_mode(self, mode: str) -> None:
        """Boxes or Prometheus; polling stops and the address field shows that mode's address."""
        if mode not in MODES:
            raise ValueError(f"monitor mode {mode!r}: expected one of {', '.join(MODES)}")
        if mode == self.mode:
            return
        self.disconnect()
        self.mode = mode
        self.mode_combo.blockSignals(True)
        self.mode_combo.setCurrentIndex(list(MODES).index(mode))
        self.mode_combo.blockSignals(False)
        self.address_edit.setText(self._saved_address(mode))
        self._update_address_tip()
        settings.studio_settings().setValue("monitor/mode", mode)

    def set_address(self, address: str) -> None:
        self.address_edit.setText(address)

    def connect_to(self) -> bool:
        """Start polling the address(es); the views start afresh."""
        text = self.address_edit.text().strip()
        addresses = split_addresses(text)
        if not addresses:
            self._fail("enter the host:port of a Prometheus server, e.g. 127.0.0.1:9090" if self.mode == PROMETHEUS
                       else "enter the host:port of a `gemel run --metrics-port N`, e.g. 127.0.0.1:9400")
            return False
        if self.mode == PROMETHEUS and len(addresses) > 1:
            self._fail(f"monitor address '{text}': one Prometheus server (host:port); it lists the boxes itself")
            return False
        for address in addresses:
            problem = address_problem(address)
            if problem:
                self._fail(problem)  # and not saved: an address that cannot work is not offered again
                return False
        self._session += 1
        self.address = ", ".join(addresses)
        self.polling, self.server_connected, self._ever_connected = True, False, False
        self.boxes = {} if self.mode == PROMETHEUS else {a: BoxWatch(a) for a in addresses}
        self.selected = next(iter(self.boxes), "")
        self._show_boxes()
        self._show_selected()
        self.state_label.setText("")
        self.connection_label.setText(f"Connecting to {self.address}…")
        self._update_enabled()
        self._timer.start()
        self.poll()
        return True

    def disconnect(self) -> None:
        """Stop polling; the last values stay."""
        if not self.polling:
            return
        self._session += 1
        self.polling = self.server_connected = False
        for b in self.boxes.values():
            b.connected = False
        self._timer.stop()
        kept = any(b.snapshot for b in self.boxes.values())
        self.connection_label.setText(f"Not connected (last values from {self.address} kept)" if kept
                                      else "Not connected")
        self._show_boxes()
        self._update_enabled()

    def stop(self, wait_ms: int = 0) -> bool:
        """Stop polling and, with `wait_ms`, wait for a fetch in flight (closing the window)."""
        self.disconnect()
        return self._pool.waitForDone(wait_ms) if wait_ms else self._worker is None

    def poll(self) -> None:
        if not self.polling or self._worker is not None:
            return  # one fetch at a time: a slow answer is not stacked up behind
        session, address, mode = self._session, self.address, self.mode
        if mode == PROMETHEUS:
            work = lambda progress: fleet_snapshots(address, timeout=FETCH_TIMEOUT_S)  # noqa: E731
        else:
            addresses = list(self.boxes)
            work = lambda progress: _fetch_boxes(addresses)  # noqa: E731
        worker = Worker(work, name="metrics poll")
        worker.sigFinished.connect(lambda answer: self._on_answer(session, answer))
        worker.sigFailed.connect(lambda message: self._on_server_failed(session, message))
        worker.sigCancelled.connect(lambda: self._poll_done())
        self._worker = worker
        worker.start(self._pool)

    def _poll_done(self) -> None:
        self._worker = None

    # --- answers (GUI thread) ---------------------------------------------------------------

    def _on_answer(self, session: int, answer: dict) -> None:
        self._poll_done()
        if session != self._session:
            return
        if self.mode == PROMETHEUS:
            self.server_connected = True
            results = {key: (True, snap) for key, snap in answer.items()}
            for key in self.boxes:  # a box Prometheus no longer has current series of
                results.setdefault(key, (False, "no current series in Prometheus (its scrapes fail?)"))
            for key in answer:
                self.boxes.setdefault(key, BoxWatch(key))
            if not self.selected and self.boxes:
                self.selected = next(iter(self.boxes))
        else:
            results = answer
        if not self._ever_connected and not any(ok for ok, _ in results.values()) and self.mode == BOXES:
            # A wrong address (or list): say so once, do not keep knocking.
            messages = [m for _, m in results.values()]
            self.disconnect()
            self.connection_label.setText("Not connected")
            self._fail(messages[0] if len(messages) == 1 else
                       f"none of the {len(messages)} boxes answered; {messages[0]}")
            return
        if not self._ever_connected:  # an address that answered: offered again next time
            key = "monitor/prometheus" if self.mode == PROMETHEUS else "monitor/address"
            settings.studio_settings().setValue(key, self.address)
            settings.studio_settings().setValue("monitor/mode", self.mode)
        self._ever_connected = True
        gone, fresh = [], {}
        for key, (ok, value) in results.items():
            box = self.boxes[key]
            if ok:
                box.on_snapshot(value)
                fresh[key] = value
            elif box.on_failure(value):
                gone.append(value if self.mode == BOXES or len(self.boxes) == 1 else f"{key}: {value}")
        self._show_connection()
        self._show_boxes()
        self._show_selected()
        for snap in fresh.values():
            self.sigSnapshot.emit(snap)
        self.sigFleet.emit(fresh)
        for message in gone:
            self.sigDisconnected.emit(message)

    def _on_server_failed(self, session: int, message: str) -> None:
        """Prometheus mode: the server itself did not answer (or Boxes mode: the poll broke)."""
        self._poll_done()
        if session != self._session:
            return
        if not self._ever_connected:
            self.disconnect()
            self.connection_label.setText("Not connected")
            self._fail(message)
            return
        was, self.server_connected = self.server_connected, False
        for b in self.boxes.values():
            b.on_failure(message)
        self.connection_label.setText(f"disconnected: {message} (last values kept; retrying)")
        self._show_boxes()
        self._show_selected()
        if was:
            self.sigDisconnected.emit(message)

    def _show_connection(self) -> None:
        boxes = list(self.boxes.values())
        answering = [b for b in boxes if b.connected]
        if self.mode == PROMETHEUS:
            text = (f"Connected to Prometheus at {self.address}: {len(answering)} box(es) with current series"
                    + (f", {len(boxes) - len(answering)} gone" if len(answering) < len(boxes) else ""))
        elif len(boxes) == 1:
            b = boxes[0]
            text = (f"Connected to {b.label}" if b.connected
                    else f"disconnected: {b.problem} (last values kept; retrying)")
        elif len(answering) == len(boxes):
            text = f"Connected to all {len(boxes)} boxes"
        else:
            text = (f"Connected to {len(answering)} of {len(boxes)} boxes; not answering: "
                    f"{', '.join(b.label for b in boxes if not b.connected)} (retrying)")
        self.connection_label.setText(text)

    def select_box(self, key: str) -> None:
        """Show `key`'s gauges, tables and budget."""
        if key in self.boxes:
            self.selected = key
            self._show_selected()

    def _show_boxes(self) -> None:
        self.box_model.set_rows(list(self.boxes.values()))
        if self.selected in self.boxes:
            row = list(self.boxes).index(self.selected)
            self.box_view.selectRow(row)
        self._redraw_curves()

    def _show_selected(self) -> None:
        box = self.box
        snap = box.snapshot if box else None
        if snap is None:
            self.gauges.clear()
            self.stream_model.set_rows([])
            self.model_model.set_models({})
            if box is None or not box.problem:
                self.state_label.setText("")
            return
        self.gauges.show_snapshot(snap)
        self.stream_model.set_rows(snap["streams"])
        self.model_model.set_models(snap["models"])
        label = f"{box.label}: " if len(self.boxes) > 1 else ""
        self.state_label.setText(label + (box.end_text() if box.run_end else run_state_text(snap)))
        self.state_label.setProperty("runEnd", box.run_end)
        self.state_label.style().polish(self.state_label)

    def show_snapshot(self, snap: dict, key: str | None = None) -> None:
        """Show `snap` as box `key`'s (default: the selected box, or a new one)."""
        key = key or self.selected or "snapshot"
        self.boxes.setdefault(key, BoxWatch(key)).on_snapshot(snap)
        self.selected = self.selected or key
        self._show_boxes()
        self._show_selected()

    # --- curves -----------------------------------------------------------------------------

    def fps_series(self, stream: str, box: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        h = self.boxes[box].history if box else self.history
        return np.asarray(h.t, dtype=float), np.asarray(h.fps.get(stream, []), dtype=float)

    def resident_series(self, box: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        h = self.boxes[box].history if box else self.history
        return np.asarray(h.t, dtype=float), np.asarray(h.resident, dtype=float)

    def _redraw_curves(self) -> None:
        many = len(self.boxes) > 1
        wanted = [(key, name) for key, b in self.boxes.items() for name in b.history.fps]
        names = [b.name for b in self.boxes.values()]  # a box's instance arrives with its first snapshot
        if list(self.fps_curves) != wanted or list(self.resident_curves) != list(self.boxes) \
                or names != self._legend_names:
            self._legend_names = names
            for curve in self.fps_curves.values():
                self.fps_item.removeItem(curve)
            for curve in self.resident_curves.values():
                self.resident_item.removeItem(curve)
            self.fps_legend.clear()
            self.resident_legend.clear()
            self.fps_curves, self.resident_curves = {}, {}
            for key, name in wanted:
                curve = self.fps_item.plot([], [], symbol="o", symbolSize=4)
                self.fps_curves[(key, name)] = curve
                self.fps_legend.addItem(curve, f"{self.boxes[key].name} {name}" if many else name)
            for key in self.boxes:
                curve = self.resident_item.plot([], [])
                self.resident_curves[key] = curve
                if many:
                    self.resident_legend.addItem(curve, self.boxes[key].name)
            self._color_curves()
        top = peak = 0.0
        for (key, name), curve in self.fps_curves.items():
            h = self.boxes[key].history
            y = np.asarray(h.fps[name], dtype=float)
            curve.setData(np.asarray(h.t, dtype=float), y)
            top = max(top, float(y.max()) if y.size else 0.0)
        # From zero, with room above the curves for the legend.
        self.fps_item.setYRange(0, max(1.0, top * 1.35), padding=0)
        for key, curve in self.resident_curves.items():
            h = self.boxes[key].history
            resident = np.asarray(h.resident, dtype=float) / MIB
            curve.setData(np.asarray(h.t, dtype=float), resident)
            peak = max(peak, float(resident.max()) if resident.size else 0.0)
        budget = self.history.budget
        if budget:
            self.budget_line.setValue(budget / MIB)
            self.budget_line.label.setFormat(f"budget {budget / MIB:.1f} MiB")
            self.budget_line.setVisible(True)
        else:
            self.budget_line.setVisible(False)
        peak = max(budget / MIB if budget else 0.0, peak)
        self.resident_item.setYRange(0, max(1.0, peak * 1.15), padding=0)

    # --- state ------------------------------------------------------------------------------

    def _fail(self, message: str) -> None:
        self.state_label.setText("Failed: the message is shown above")  # shown once, in the banner
        self.sigError.emit(message)

    def _update_enabled(self) -> None:
        self.connect_button.setEnabled(not self.polling)
        self.address_edit.setEnabled(not self.polling)
        self.mode_combo.setEnabled(not self.polling)
        self.disconnect_button.setEnabled(self.polling)

    def set_colors(self, colors: dict) -> None:
        self.colors = colors
        for widget, item in ((self.fps_plot, self.fps_item), (self.resident_plot, self.resident_item)):
            widget.setBackground(colors["background"])
            style_plot(item, colors)
            item.showGrid(x=True, y=True, alpha=colors["grid"] / 255)
        self.budget_line.setPen(pg.mkPen(colors["bound"], width=1.5, style=Qt.PenStyle.DashLine))
        self.budget_line.label.setColor(colors["bound"])
        self._color_curves()

    def _color_curves(self) -> None:
        series = self.colors["series"]
        for legend in (self.fps_legend, self.resident_legend):
            legend.setLabelTextColor(self.colors["foreground"])
        for i, curve in enumerate(self.fps_curves.values()):
            color = series[i % len(series)]
            curve.setPen(pg.mkPen(color, width=2))
            curve.setSymbolPen(pg.mkPen(color))
            curve.setSymbolBrush(pg.mkBrush(color))
        for i, curve in enumerate(self.resident_curves.values()):
            color = self.colors["params"] if len(self.resident_curves) == 1 else series[i % len(series)]
            curve.setPen(pg.mkPen(color, width=2))
        for legend in (self.fps_legend, self.resident_legend):
            for sample, label in legend.items:  # the legend keeps the old text colour otherwise
                label.setText(label.text, color=self.colors["foreground"])
