"""A fleet of edge boxes: the shipped Prometheus and Grafana files name only what the runtime
serves, Prometheus's answers read back as snapshots, and a real Prometheus, started on loopback
with the shipped configuration, scrapes two real `gemel run` and tells them apart."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gemel_studio.runtime.fleet import fleet_snapshots, query, snapshots_from_series
from gemel_studio.runtime.metrics import MetricsServer, example_snapshot, served_metric_names

from .test_bundle import bundle, merged  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_ONLY = {"up"}  # series Prometheus writes itself, per target
TARGET_LABELS = {"job", "address", "site"}  # labels the scrape configuration adds
WAIT_S = 120.0  # conditions are polled up to this long: a busy machine is slow, never wrong

# PromQL words that are not metric names.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels and Grafana's
    $variables left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, templates)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[m.end():].lstrip()
        if not rest.startswith("(") and m.group(0).lower() not in _PROMQL_WORDS:
            names.add(m.group(0))
    return names


def promql_labels(expr: str) -> set[str]:
    """The label names an expression groups by or matches on."""
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in group.split(",") if x.strip())
    for matchers in re.findall(r"\{([^}]*)\}", re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)):
        labels.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return labels


def served_labels() -> set[str]:
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from gemel_studio.runtime.metrics import RunIdentity, SnapshotCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(example_snapshot, RunIdentity("x")))
    return {k for fam in text_string_to_metric_families(generate_latest(registry).decode())
            for s in fam.samples for k in s.labels} | {"__name__"}


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q))
    return exprs


def test_the_promql_reader_finds_names_and_labels():
    expr = ('sum by (instance, stream) (rate(gemel_stream_frames_total{instance=~"$instance", x="a{b}"}[5m])) '
            '/ on(instance) group_left up * 60 > bool 0.5')
    assert promql_metrics(expr) == {"gemel_stream_frames_total", "up"}
    assert promql_labels(expr) == {"instance", "stream", "x"}


# --- the shipped files ------------------------------------------------------------------------


def test_the_scrape_configuration_discovers_boxes_from_files_and_keeps_their_names():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "gemel"]
    assert job.get("metrics_path", "/metrics") == "/metrics" and job["honor_labels"] is True
    (sd,) = job["file_sd_configs"]
    targets = sorted((DEPLOY / "prometheus").glob(sd["files"][0]))
    assert targets, sd["files"]
    for path in targets:
        groups = json.loads(path.read_text())
        assert groups and all(g["targets"] and all(":" in t for t in g["targets"]) for g in groups)
        assert all(set(g.get("labels", {})) <= TARGET_LABELS | {"instance"} for g in groups)
    for rules in config.get("rule_files", []):
        assert (DEPLOY / "prometheus" / rules).is_file(), rules
    promtool = shutil.which("promtool")
    if promtool:  # Prometheus's own check, where it is installed
        proc = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_metric_the_dashboard_and_the_alerts_name_is_served():
    served = served_metric_names() | PROMETHEUS_ONLY
    labels = served_labels() | TARGET_LABELS
    dashboard = json.loads((DEPLOY / "grafana" / "gemel-dashboard.json").read_text())
    exprs = dashboard_exprs(dashboard)
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    named = set()
    for expr in exprs:
        names = promql_metrics(expr)
        assert names, expr
        assert names <= served, (expr, names - served)
        assert promql_labels(expr) <= labels, (expr, promql_labels(expr) - labels)
        named |= names
    # The dashboard covers what an operator watches.
    for must in ("gemel_stream_frames_processed_total", "gemel_stream_frames_dropped_total",
                 "gemel_stream_latency_seconds", "gemel_process_resident_memory_bytes", "gemel_model_swaps_total",
                 "gemel_run_healthy", "gemel_run_info"):
        assert must in named, must
    assert dashboard["uid"] and {v["name"] for v in dashboard["templating"]["list"]} >= {"instance", "datasource"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_a_prometheus_answer_reads_back_as_the_boxes_snapshots():
    """The collector's samples, as Prometheus's query API returns them, regroup per instance
    into what each box served."""
    series = []
    for name, snap in (("box-a", example_snapshot()), ("box-b", {**example_snapshot(), "elapsed_s": 7.0})):
        with MetricsServer(lambda snap=snap: snap, instance=name) as server:
            with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
                text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            series += [{"metric": {"__name__": s.name, **s.labels}, "value": [1.0, repr(s.value)]}
                       for s in fam.samples]
    boxes = snapshots_from_series(series)
    assert list(boxes) == ["box-a", "box-b"]
    want = example_snapshot()
    got = boxes["box-b"]
    assert got["elapsed_s"] == 7.0 and got["state"] == "running" and got["policy"] == "merged"
    (s,) = got["streams"]
    for key in ("name", "frames_in", "processed", "dropped", "dropped_late", "dropped_refused", "latency_p99_ms",
                "end_reason"):
        assert s[key] == want["streams"][0][key], key
    assert got["memory"] == want["memory"] and got["models"]["m"]["swaps"] == 1


# --- a real Prometheus over two real boxes -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(*procs: subprocess.Popen) -> None:
    """SIGTERM to all, then wait for each (SIGKILL past 15 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def _poll(condition, what: str, timeout: float = WAIT_S):
    """`condition()`'s first truthy answer, asked every 0.5 s for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except Exception as exc:  # not up yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")


@pytest.fixture(scope="module")
def prometheus_binary():
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("the prometheus binary is not installed (Debian's `prometheus` package; ./dev.sh installs it)")
    return path


@pytest.fixture(scope="module")
def boxes(bundle, request):  # noqa: F811
    """Two `gemel run` on loopback ports, named box-a and box-b: {name: metrics URL}."""
    procs, lines = {}, queue.Queue()
    request.addfinalizer(lambda: _stop(*procs.values()))
    for name, seed_fps in (("box-a", 10), ("box-b", 8)):
        proc = subprocess.Popen([sys.executable, "-m", "gemel_studio.cli", "run", str(bundle[1]), "--stream",
                                 f"synthetic:{seed_fps}=size", "--policy", "unlimited", "--duration", "600",
                                 "--metrics-port", "0", "--instance", name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs[name] = proc

        def read(name=name, proc=proc):
            for line in proc.stderr:
                lines.put((name, line))
            lines.put((name, None))

        threading.Thread(target=read, daemon=True).start()
    urls: dict[str, str] = {}
    deadline = time.monotonic() + WAIT_S
    while len(urls) < len(procs):
        try:
            name, line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"gemel run did not print its metrics address within {WAIT_S:g} s") from None
        assert line is not None, f"{name}: gemel run ended before serving metrics (rc {procs[name].poll()})"
        if line.startswith("metrics: "):
            urls[name] = line.split()[1].removesuffix("/metrics")
    return urls


@pytest.fixture(scope="module")
def prometheus(prometheus_binary, boxes, tmp_path_factory, request):
    """A real Prometheus on 127.0.0.1 with the shipped configuration (scrapes every second here)
    and the two boxes written into its file_sd targets: its base URL."""
    root = tmp_path_factory.mktemp("prometheus")
    shutil.copytree(DEPLOY / "prometheus", root / "conf")
    config_path = root / "conf" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    for old in (root / "conf" / "targets").glob("*.json"):
        old.unlink()
    (root / "conf" / "targets" / "test-boxes.json").write_text(json.dumps(
        [{"targets": [url.removeprefix("http://")], "labels": {"instance": name}} for name, url in boxes.items()]))
    port = _free_port()
    log = open(root / "prometheus.log", "w")
    request.addfinalizer(log.close)
    proc = subprocess.Popen([prometheus_binary, f"--config.file={config_path}",
                             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    request.addfinalizer(lambda: _stop(proc))
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, (root / "prometheus.log").read_text()[-2000:]
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
            return r.status == 200

    _poll(ready, "Prometheus ready")
    return url


def test_a_real_prometheus_scrapes_both_boxes_and_tells_them_apart(prometheus, boxes):
    def both_counting():
        found = {r["metric"]["instance"]: float(r["value"][1])
                 for r in query(prometheus, "gemel_stream_frames_total")}
        return found if set(found) == set(boxes) and all(v > 0 for v in found.values()) else None

    counted = _poll(both_counting, "both boxes' frame counters in Prometheus")
    assert set(counted) == {"box-a", "box-b"}
    info = {r["metric"]["instance"]: r["metric"] for r in query(prometheus, "gemel_run_info")}
    assert set(info) == {"box-a", "box-b"}
    digest = info["box-a"]["bundle_sha256"]
    assert digest == info["box-b"]["bundle_sha256"] and len(digest) == 64
    assert info["box-a"]["bundle_name"] == "bundle-test" and info["box-a"]["job"] == "gemel"
    assert info["box-a"]["address"] == boxes["box-a"].removeprefix("http://")
    up = {r["metric"]["instance"]: r["value"][1] for r in query(prometheus, 'up{job="gemel"}')}
    assert up == {"box-a": "1", "box-b": "1"}
    # What the Monitor's Prometheus mode reads: one snapshot per box.
    snaps = fleet_snapshots(prometheus)
    assert set(snaps) == {"box-a", "box-b"}
    assert snaps["box-a"]["streams"][0]["name"] == "synthetic:10"
    assert snaps["box-b"]["streams"][0]["name"] == "synthetic:8"
    # Each box's own /healthz answers too (a box may be slow; it is never 404).
    for url in boxes.values():
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                assert r.status == 200
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and exc.read().decode().startswith("unhealthy: ")


def test_the_monitor_in_prometheus_mode_lists_both_boxes(prometheus, boxes, qapp_env):
    qtbot = qapp_env
    from gemel_studio.ui.monitor_view import MonitorPanel

    panel = MonitorPanel()
    qtbot.addWidget(panel)
    try:
        panel.set_mode("prometheus")
        panel.set_address(prometheus.removeprefix("http://"))
        assert panel.connect_to()
        qtbot.waitUntil(lambda: set(panel.instances()) >= {"box-a", "box-b"}, timeout=int(WAIT_S * 1000))
        qtbot.waitUntil(lambda: all(len(panel.box_history(n)) >= 2 for n in ("box-a", "box-b")),
                        timeout=int(WAIT_S * 1000))
        assert {panel.box_row_text(n, "Box") for n in ("box-a", "box-b")} == {"box-a", "box-b"}
    finally:
        assert panel.stop(wait_ms=10_000)


@pytest.fixture
def qapp_env(request, tmp_path, monkeypatch):
    """qtbot, offscreen, with settings in a temporary folder (as tests/ui/conftest.py does),
    where the studio's GUI extras are installed."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    for module in ("PySide6", "pyqtgraph", "pytestqt"):
        pytest.importorskip(module)
    import torch  # noqa: F401  (torch before the QApplication exists)
    from PySide6.QtCore import QSettings

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path))
    return request.getfixturevalue("qtbot")
