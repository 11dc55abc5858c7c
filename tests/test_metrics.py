"""The runtime's metrics endpoint: Prometheus text and a JSON snapshot of what the engine counted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gemel_studio.errors import GemelError
from gemel_studio.progress import Progress
from gemel_studio.runtime import load_bundle
from gemel_studio.runtime.engine import Engine
from gemel_studio.runtime.metrics import MetricsServer, fetch_snapshot
from gemel_studio.runtime.sources import SyntheticSource

from .test_bundle import bundle, merged  # noqa: F401  (fixtures)


def _samples(text: str) -> dict:
    """{(metric sample name, frozen labels): value} of a Prometheus exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


@pytest.fixture(scope="module")
def loaded(bundle):  # noqa: F811
    with load_bundle(bundle[1]) as b:
        yield b


def test_the_endpoint_serves_what_the_runtime_counted(loaded):
    streams = [(SyntheticSource(fps=20, size=(16, 16), frames=12, seed=1), ["color", "size"]),
               (SyntheticSource(fps=10, size=(16, 16), frames=5, seed=2), ["spare"])]
    engine = Engine(loaded, streams, "merged", 200 * 2**20, "cpu")
    with MetricsServer(engine.snapshot) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        before = fetch_snapshot(f"{server.host}:{server.port}")
        assert before["state"] == "not started" and before["streams"][0]["frames_in"] == 0
        summary = engine.run()  # until both sources end
        ctype, text = _get(server.url + "/metrics")
        assert ctype.startswith("text/plain")
        prom = _samples(text)
        snap = fetch_snapshot(server.url)
    assert summary.stopped == "sources ended" and snap["state"] == "stopped: sources ended"
    for s, counted in zip(snap["streams"], summary.streams):
        for key in ("frames_in", "processed", "dropped_late", "dropped_refused"):
            assert s[key] == counted[key], key
        lab = (("stream", s["name"]),)
        assert prom[("gemel_stream_frames_total", lab)] == s["frames_in"]
        assert prom[("gemel_stream_frames_processed_total", lab)] == s["processed"]
        assert prom[("gemel_stream_frames_dropped_total", tuple(sorted(lab + (("reason", "late"),))))] == \
            s["dropped_late"]
        assert prom[("gemel_stream_ended", lab)] == 1
        if s["processed"]:
            p99 = prom[("gemel_stream_latency_seconds", tuple(sorted(lab + (("quantile", "0.99"),))))]
            assert p99 == pytest.approx(s["latency_p99_ms"] / 1000)
    assert [s["frames_in"] for s in snap["streams"]] == [12, 5]
    for name, m in summary.models.items():
        assert prom[("gemel_model_swaps_total", (("model", name),))] == m["swaps"]
        assert prom[("gemel_model_runs_total", (("model", name),))] == m["runs"]
        assert prom[("gemel_model_loaded_bytes_total", (("model", name),))] == m["loaded_bytes"]
    assert sum(m["swaps"] for m in summary.models.values()) >= 1  # (a busy machine may drop a stream's frames)
    assert prom[("gemel_memory_budget_bytes", ())] == 200 * 2**20
    # The run is over: its weights were released (the summary has what was resident at the end).
    assert prom[("gemel_runtime_resident_bytes", ())] == snap["memory"]["runtime_resident_bytes"] == 0
    assert summary.memory["runtime_resident_bytes"] > 0
    assert prom[("gemel_runtime_peak_resident_bytes", ())] == summary.memory["runtime_peak_resident_bytes"] > 0
    assert prom[("gemel_process_resident_memory_bytes", ())] > 0
    assert ("gemel_device_used_bytes", ()) not in prom  # no GPU figures made up on a CPU run
    info = [k for k in prom if k[0] == "gemel_run_info"]
    assert info and dict(info[0][1])["policy"] == "merged"


def test_the_endpoint_is_live_during_a_run(loaded):
    """Counters move between two scrapes while the run goes on."""
    # A long deadline: frames are processed however busy the machine is; the batch profile runs
    # before the thread starts, and the scrapes wait for counts rather than for a set time.
    engine = Engine(loaded, [(SyntheticSource(fps=30, size=(16, 16)), ["size"])], "unlimited", None, "cpu",
                    deadline_s=30.0)
    engine.profile_batches()
    progress = Progress()
    worker = threading.Thread(target=engine.run, kwargs={"progress": progress})

    def scrape_until(ok):
        for _ in range(200):
            snap = fetch_snapshot(server.url)
            if ok(snap):
                return snap
            time.sleep(0.05)
        raise AssertionError(f"the counters did not move: {snap['streams']}")

    with MetricsServer(engine.snapshot) as server:
        worker.start()
        try:
            first = scrape_until(lambda s: s["streams"][0]["frames_in"] >= 1)["streams"][0]["frames_in"]
            second = scrape_until(lambda s: s["streams"][0]["frames_in"] > first and s["streams"][0]["processed"] >= 1)
        finally:
            progress.cancel()
            worker.join(10)
    assert second["state"] == "running" and second["streams"][0]["frames_in"] > first >= 1
    assert second["memory"]["runtime_resident_bytes"] > 0
    # The preview's view of the run: the last frame and what the model said about it.
    latest = engine.latest[0]
    assert latest is not None and latest["frame"].shape == (3, 16, 16)
    out = latest["outputs"]["size"]
    assert out["task"] == "classification" and out["label"] in loaded.manifest.model("size").labels
    assert 0 < out["score"] <= 1


def test_unknown_paths_are_404_and_a_busy_port_is_one_line():
    with MetricsServer(lambda: {}) as server:
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(server.url + "/nope")
        assert err.value.code == 404
        with pytest.raises(GemelError, match=f"cannot serve metrics on 127.0.0.1:{server.port}.*--metrics-port"):
            MetricsServer(lambda: {}, server.port)
    with pytest.raises(GemelError, match="metrics port 70000"):
        MetricsServer(lambda: {}, 70000)


def test_a_failing_snapshot_is_a_500_and_the_server_goes_on():
    calls = []

    def snapshot():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bad\nthing é")  # newline and non-latin-1: must not break the answer
        return {"ok": True}

    with MetricsServer(snapshot) as server:
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(server.url + "/metrics.json")
        assert err.value.code == 500
        assert fetch_snapshot(server.url) == {"ok": True}


def test_metrics_bind_ipv6_loopback_or_say_which_address_is_wrong():
    try:
        server = MetricsServer(lambda: {"v": 6}, 0, "::1")
    except GemelError as exc:  # a box without IPv6: a one-line error naming the address
        assert "::1" in str(exc)
    else:
        with server:
            assert server.url.startswith("http://[::1]:") and fetch_snapshot(server.url) == {"v": 6}
    with pytest.raises(GemelError, match="metrics address 'no-such-host.invalid'"):
        MetricsServer(lambda: {}, 0, "no-such-host.invalid")


def test_fetching_from_nothing_is_a_clear_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GemelError, match="cannot connect.*gemel run --metrics-port"):
        fetch_snapshot(f"127.0.0.1:{port}", timeout=1)
    with socket.socket() as s:  # something that answers, but not in HTTP
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]

        def babble():
            conn, _ = s.accept()
            conn.recv(1024)
            conn.sendall(b"hello there\r\n")
            conn.close()

        threading.Thread(target=babble, daemon=True).start()
        with pytest.raises(GemelError, match="not an HTTP answer"):
            fetch_snapshot(f"127.0.0.1:{port}/metrics", timeout=2)


def test_gemel_run_serves_metrics_on_loopback(bundle):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-m", "gemel_studio.cli", "run", str(bundle[1]), "--stream",
                             "synthetic:20=size", "--policy", "unlimited", "--duration", "6", "--json",
                             "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for _ in range(50):
            line = proc.stderr.readline()
            if line.startswith("metrics: ") or not line:
                break
        assert line.startswith("metrics: http://127.0.0.1:"), line
        url = line.split()[1]
        time.sleep(1.0)
        _, text = _get(url)
        counted = _samples(text)[("gemel_stream_frames_total", (("stream", "synthetic:20"),))]
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert counted >= 5
    assert json.loads(out)["streams"][0]["frames_in"] >= counted
