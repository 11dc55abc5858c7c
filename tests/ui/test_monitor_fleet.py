"""The Monitor watching a fleet, through its real widgets: several boxes at once (real
`MetricsServer`s over scripted snapshots), and a Prometheus server's HTTP API (a small local
server that answers `/api/v1/query` in Prometheus's JSON, from the same collector the runtime
serves; `tests/test_fleet.py` also drives the real Prometheus)."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402
from prometheus_client.exposition import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from prometheus_client.registry import CollectorRegistry  # noqa: E402

from gemel_studio.runtime import rates  # noqa: E402
from gemel_studio.runtime.fleet import ALL_SERIES  # noqa: E402
from gemel_studio.runtime.metrics import MetricsServer, RunIdentity, SnapshotCollector, example_snapshot  # noqa: E402
from gemel_studio.ui import monitor_view  # noqa: E402
from gemel_studio.ui.monitor_view import MonitorPanel  # noqa: E402

WAIT_MS = 30_000


class ScriptedRun:
    """A run's snapshots: every call half a second later, `rate` more frames processed per
    second on each stream, `resident` bytes of weights."""

    def __init__(self, streams: list[str], rate: float, resident: int = 4 << 20, state: str = "running",
                 instance: str | None = None):
        self.streams, self.rate, self.resident, self.state = streams, rate, resident, state
        self.instance = instance  # the box's name, in the snapshot as a run that reports it serves it
        self.t = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> dict:
        with self.lock:
            self.t += 0.5
            snap = example_snapshot()
            row = snap["streams"][0]
            done = int(self.rate * self.t)
            snap.update(state=self.state, elapsed_s=self.t)
            if self.instance:
                snap["instance"] = self.instance
            snap["streams"] = [{**row, "name": n, "frames_in": done + 1, "processed": done, "dropped": 1,
                                "dropped_late": 1, "dropped_refused": 0} for n in self.streams]
            snap["memory"] = {"budget_bytes": 64 << 20, "runtime_resident_bytes": self.resident,
                              "runtime_peak_resident_bytes": self.resident}
            return snap


@pytest.fixture
def panel(qtbot):
    p = MonitorPanel()
    qtbot.addWidget(p)
    errors: list[str] = []
    p.sigError.connect(errors.append)
    p.errors = errors
    yield p
    assert p.stop(wait_ms=10_000)


def test_the_rate_history_is_the_qt_free_one():
    assert monitor_view.RunHistory is rates.RunHistory


def test_the_boxes_headers_say_what_each_column_counts(qtbot):
    # The base table model's TIPS mechanism, as the Streams and Models tables use it.
    model = monitor_view.BoxTableModel()
    headers = [h for h, _ in model.COLUMNS]

    def tip(header: str):
        return model.headerData(headers.index(header), Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole)

    assert tip("fps") == f"Frames processed per second, all its streams (over {monitor_view.RATE_WINDOW_S:g} s)"
    assert tip("Box") == "The box's instance name once its snapshot reports it, else its address (hover a row for both)"
    assert tip("Status") == "Its run's state while it answers; else finished, lost or not answering"
    assert all(tip(h) for h in headers)  # every column has one
    assert model.headerData(0, Qt.Orientation.Horizontal) == "Box"
    assert model.headerData(0, Qt.Orientation.Vertical, Qt.ItemDataRole.ToolTipRole) is None


def test_several_boxes_each_get_a_row_and_their_curves_and_one_going_away_leaves_the_other(panel, qtbot):
    runs = {"a": ScriptedRun(["cam-1", "cam-2"], rate=10.0, instance="box-a"),
            "b": ScriptedRun(["door"], rate=4.0, resident=8 << 20, instance="box-b")}
    servers = {k: MetricsServer(run, instance=f"box-{k}") for k, run in runs.items()}
    try:
        addresses = {k: f"127.0.0.1:{s.port}" for k, s in servers.items()}
        panel.set_address(f"{addresses['a']}, {addresses['b']} {addresses['a']}")  # the repeat is dropped
        assert panel.connect_to()
        assert panel.instances() == [addresses["a"], addresses["b"]]
        # Named by the address until a snapshot says which box answers there.
        assert [panel.box_row_text(a, "Box") for a in addresses.values()] == list(addresses.values())
        qtbot.waitUntil(lambda: all(len(panel.box_history(a)) >= 3 for a in addresses.values()), timeout=WAIT_MS)
        assert panel.connection_label.text() == "Connected to all 2 boxes"
        assert panel.box_model.rowCount() == 2
        assert [panel.box_row_text(a, "Box") for a in addresses.values()] == ["box-a", "box-b"]
        assert [panel.box_row_text(a, "Status") for a in addresses.values()] == ["running", "running"]
        tip = panel.box_model.data(panel.box_model.index(1, 0), Qt.ItemDataRole.ToolTipRole)
        assert tip.startswith(f"box-b at {addresses['b']}\nstatus: connected") and "\n1 stream: " in tip
        assert [item[1].text for item in panel.resident_legend.items] == ["box-a", "box-b"]
        # One set of curves per box: a rate curve per stream, a resident curve per box.
        assert list(panel.fps_curves) == [(addresses["a"], "cam-1"), (addresses["a"], "cam-2"),
                                          (addresses["b"], "door")]
        assert list(panel.resident_curves) == list(addresses.values())
        t, fps = panel.fps_series("door", addresses["b"])
        assert len(t) >= 3 and fps[-1] == pytest.approx(4.0, abs=1.0)  # from the counter's change
        assert float(panel.box_row_text(addresses["a"], "fps")) == pytest.approx(20.0, abs=2.0)
        # The gauges and tables show the selected box: the first, then the one chosen.
        assert panel.stream_model.rowCount() == 2
        panel.select_box(addresses["b"])
        assert panel.stream_model.rowCount() == 1 and panel.stream_model.text(0, "Stream") == "door"
        assert panel.state_label.text().startswith(f"box-b ({addresses['b']}): running")
        assert panel.budget_line.isVisible() and panel.budget_line.value() == 64
        with qtbot.waitSignal(panel.sigDisconnected, timeout=WAIT_MS) as gone:
            servers["b"].close()  # box b is killed while running
        assert "cannot connect" in gone.args[0] and "\n" not in gone.args[0]
        assert panel.box_row_text(addresses["b"], "Status") == "lost"
        assert panel.state_label.text().startswith(f"box-b ({addresses['b']}): lost: stopped answering while running")
        assert panel.connection_label.text().startswith(f"Connected to 1 of 2 boxes; not answering: box-b "
                                                        f"({addresses['b']})")
        before = len(panel.box_history(addresses["a"]))
        qtbot.waitUntil(lambda: len(panel.box_history(addresses["a"])) > before, timeout=WAIT_MS)  # a goes on
        assert panel.box_row_text(addresses["a"], "Status") == "running"
        assert panel.stream_model.text(0, "Stream") == "door"  # b's last values stay
        assert panel.box_row_text(addresses["b"], "Box") == "box-b"  # named by its last snapshot
    finally:
        for s in servers.values():
            s.close()
    assert panel.errors == []


def test_a_list_where_no_box_answers_is_one_error_and_not_saved(panel, qtbot):
    from gemel_studio.ui import settings

    panel.set_address("127.0.0.1:1, 127.0.0.1:2")
    with qtbot.waitSignal(panel.sigError, timeout=WAIT_MS) as error:
        assert panel.connect_to()
    assert error.args[0].startswith("none of the 2 boxes answered; ") and "\n" not in error.args[0]
    assert not panel.polling
    assert settings.studio_settings().value("monitor/address", "", type=str) != "127.0.0.1:1, 127.0.0.1:2"
    panel.set_address("127.0.0.1:9400, nonsense")
    assert not panel.connect_to() and "'nonsense' is not host:port" in panel.errors[-1]


class FakePrometheus:
    """Answers `/api/v1/query` for every gemel series, as Prometheus would, from the collector
    over each box's scripted run; `runs` may change while it serves."""

    def __init__(self, runs: dict[str, ScriptedRun]):
        self.runs = runs
        self.queries: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlparse(self.path)
                q = urllib.parse.parse_qs(url.query).get("query", [""])[0]
                fake.queries.append(q)
                if url.path != "/api/v1/query" or q != ALL_SERIES:
                    body, code = {"status": "error", "errorType": "bad_data", "error": f"unexpected {q}"}, 400
                else:
                    body, code = {"status": "success", "data": {"resultType": "vector", "result": fake.series()}}, 200
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def series(self) -> list[dict]:
        out = []
        for name, run in list(self.runs.items()):
            registry = CollectorRegistry(auto_describe=False)
            registry.register(SnapshotCollector(run, RunIdentity(name, "bundle-test", "ab" * 32)))
            for fam in text_string_to_metric_families(generate_latest(registry).decode()):
                out += [{"metric": {"__name__": s.name, "job": "gemel", **s.labels}, "value": [1.0, repr(s.value)]}
                        for s in fam.samples]
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_prometheus_mode_lists_the_instances_it_scrapes_and_notices_one_gone(panel, qtbot):
    fake = FakePrometheus({"box-a": ScriptedRun(["cam-1"], rate=6.0), "box-b": ScriptedRun(["door"], rate=2.0)})
    try:
        panel.set_mode("prometheus")
        assert panel.mode_combo.currentText() == "Prometheus" and panel.address_edit.text() == "127.0.0.1:9090"
        panel.set_address(fake.address)
        assert panel.connect_to()
        qtbot.waitUntil(lambda: panel.instances() == ["box-a", "box-b"]
                        and all(len(panel.box_history(n)) >= 3 for n in ("box-a", "box-b")), timeout=WAIT_MS)
        assert set(fake.queries) == {ALL_SERIES}
        assert panel.connection_label.text() == (f"Connected to Prometheus at {fake.address}: "
                                                 "2 box(es) with current series")
        assert [panel.box_row_text(n, "Box") for n in ("box-a", "box-b")] == ["box-a", "box-b"]
        tip = panel.box_model.data(panel.box_model.index(0, 0), Qt.ItemDataRole.ToolTipRole)
        assert tip.startswith("box-a\nstatus: connected") and "\nbundle: bundle-test\n" in tip
        assert panel.box_row_text("box-b", "Status") == "running"
        assert list(panel.fps_curves) == [("box-a", "cam-1"), ("box-b", "door")]
        t, fps = panel.fps_series("cam-1", "box-a")
        assert fps[-1] == pytest.approx(6.0, abs=1.5)
        assert panel.stream_model.text(0, "Stream") == "cam-1"  # the first box, selected
        # box-b's series go stale (its scrapes fail): its row says it was lost, not finished.
        with qtbot.waitSignal(panel.sigDisconnected, timeout=WAIT_MS) as gone:
            del fake.runs["box-b"]
        assert gone.args[0].startswith("box-b: no current series in Prometheus")
        assert panel.box_row_text("box-b", "Status") == "lost"
        assert panel.connection_label.text().endswith("1 box(es) with current series, 1 gone")
        # The server itself goes: every box keeps its last values, and polling goes on.
        with qtbot.waitSignal(panel.sigDisconnected, timeout=WAIT_MS) as gone:
            fake.close()
        assert "cannot reach Prometheus" in gone.args[0] and "\n" not in gone.args[0]
        assert panel.connection_label.text().startswith("disconnected: ") and panel.polling
        assert panel.box_row_text("box-a", "Status") == "lost"
        assert panel.stream_model.text(0, "Stream") == "cam-1"
    finally:
        fake.server.server_close()
    assert panel.errors == []


def test_prometheus_mode_refuses_a_box_and_a_list_in_one_line(panel, qtbot):
    box = MetricsServer(ScriptedRun(["cam"], rate=1.0))
    try:
        panel.set_mode("prometheus")
        panel.set_address(f"127.0.0.1:{box.port}")  # a gemel run, not a Prometheus server
        with qtbot.waitSignal(panel.sigError, timeout=WAIT_MS) as error:
            assert panel.connect_to()
        assert "is this a Prometheus server" in error.args[0] and "\n" not in error.args[0]
        assert not panel.polling and panel.instances() == []
    finally:
        box.close()
    panel.set_address("127.0.0.1:9090, 127.0.0.1:9091")
    assert not panel.connect_to() and "one Prometheus server" in panel.errors[-1]


def test_each_mode_keeps_its_own_address(panel, qtbot):
    from gemel_studio.ui import settings

    run = ScriptedRun(["cam"], rate=1.0)
    with MetricsServer(run) as box:
        panel.set_address(f"127.0.0.1:{box.port}")
        assert panel.connect_to()
        qtbot.waitUntil(lambda: panel.connected, timeout=WAIT_MS)
    panel.set_mode("prometheus")
    assert not panel.polling and panel.address_edit.text() == "127.0.0.1:9090"
    assert settings.studio_settings().value("monitor/mode", "", type=str) == "prometheus"
    panel.mode_combo.setCurrentIndex(0)  # back to Boxes, through the switch
    assert panel.mode == "boxes" and panel.address_edit.text() == f"127.0.0.1:{box.port}"
    again = MonitorPanel()
    qtbot.addWidget(again)
    assert again.mode == "boxes" and again.address_edit.text() == f"127.0.0.1:{box.port}"
