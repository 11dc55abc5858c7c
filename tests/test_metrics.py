"""The runtime's metrics endpoint: Prometheus text and a JSON snapshot of what the engine counted."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import gemel_studio
from gemel_studio.errors import GemelError
from gemel_studio.progress import Progress
from gemel_studio.runtime import load_bundle
from gemel_studio.runtime.engine import Engine
from gemel_studio.runtime.metrics import (LivenessWatch, MetricsServer, RunIdentity, default_instance,
                                          example_snapshot, fetch_snapshot, served_metric_names)
from gemel_studio.runtime.rates import RunHistory
from gemel_studio.runtime.sources import SyntheticSource

from .test_bundle import bundle, merged  # noqa: F401  (fixtures)


def _samples(text: str, instance: str | None = None) -> dict:
    """{(metric sample name, frozen labels but `instance`): value} of a Prometheus exposition;
    every sample must carry the `instance` label (`instance` when given)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            box = labels.pop("instance")
            assert instance is None or box == instance, (s.name, box)
            out[(s.name, tuple(sorted(labels.items())))] = s.value
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
    with MetricsServer(engine.snapshot, instance="edge-07", bundle=loaded) as server:
        assert server.host == "127.0.0.1" and server.port > 0
        before = fetch_snapshot(f"{server.host}:{server.port}")
        assert before["state"] == "not started" and before["streams"][0]["frames_in"] == 0
        summary = engine.run()  # until both sources end
        ctype, text = _get(server.url + "/metrics")
        assert ctype.startswith("text/plain")
        prom = _samples(text, "edge-07")
        snap = fetch_snapshot(server.url)
    assert summary.stopped == "sources ended" and snap["state"] == "stopped: sources ended"
    for s, counted in zip(snap["streams"], summary.streams):
        for key in ("frames_in", "processed", "dropped_late", "dropped_refused"):
            assert s[key] == getattr(counted, key), key
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
        assert prom[("gemel_model_swaps_total", (("model", name),))] == m.swaps
        assert prom[("gemel_model_runs_total", (("model", name),))] == m.runs
        assert prom[("gemel_model_loaded_bytes_total", (("model", name),))] == m.loaded_bytes
    assert sum(m.swaps for m in summary.models.values()) >= 1  # (a busy machine may drop a stream's frames)
    assert prom[("gemel_memory_budget_bytes", ())] == 200 * 2**20
    # The run is over: its weights were released (the summary has what was resident at the end).
    assert prom[("gemel_runtime_resident_bytes", ())] == snap["memory"]["runtime_resident_bytes"] == 0
    assert summary.memory.runtime_resident_bytes > 0
    assert prom[("gemel_runtime_peak_resident_bytes", ())] == summary.memory.runtime_peak_resident_bytes > 0
    assert prom[("gemel_process_resident_memory_bytes", ())] > 0
    assert ("gemel_device_used_bytes", ()) not in prom  # no GPU figures made up on a CPU run
    info = [k for k in prom if k[0] == "gemel_run_info"]
    assert len(info) == 1
    labels = dict(info[0][1])
    assert labels["policy"] == "merged" and labels["state"] == "stopped: sources ended"
    # The bundle's identity: its workload's name and the sha256 of the manifest file.
    manifest = (loaded.folder / "manifest.json").read_bytes()
    assert labels["bundle_name"] == loaded.manifest.workload == "bundle-test"
    assert labels["bundle_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert labels["version"] == gemel_studio.__version__
    # How it scheduled: the order and prefetch on the info, the counts as counters.
    assert labels["order"] == summary.order == "merge-aware" and labels["prefetch"] == "off"
    assert prom[("gemel_reordered_batches_total", ())] == summary.reordered_batches
    assert prom[("gemel_prefetches_total", ())] == summary.prefetches == 0  # (prefetch is off on a CPU)
    assert prom[("gemel_prefetch_misses_total", ())] == summary.prefetch_misses == 0


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
        assert fetch_snapshot(server.url) == server.identity.served({"ok": True})


def test_metrics_bind_ipv6_loopback_or_say_which_address_is_wrong():
    try:
        server = MetricsServer(lambda: {"v": 6}, 0, "::1")
    except GemelError as exc:  # a box without IPv6: a one-line error naming the address
        assert "::1" in str(exc)
    else:
        with server:
            assert server.url.startswith("http://[::1]:")
            assert fetch_snapshot(server.url) == server.identity.served({"v": 6})
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
                             "--metrics-port", "0", "--instance", "box-a"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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
        counted = _samples(text, "box-a")[("gemel_stream_frames_total", (("stream", "synthetic:20"),))]
        # Within its first 10 s a running stream is live whatever the machine's speed.
        ctype, health = _get(url.replace("/metrics", "/healthz"))
        assert ctype.startswith("text/plain") and health.startswith("ok: 1 stream(s) live"), health
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert counted >= 5
    assert json.loads(out)["streams"][0]["frames_in"] >= counted


# --- a fleet: the box's name, the bundle's identity, health ------------------------------------


def _status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _running(t: float, frames_in: int, processed: int, end_reason=None, fps: float = 20.0) -> dict:
    snap = example_snapshot()
    snap["elapsed_s"] = t
    snap["streams"][0].update(frames_in=frames_in, processed=processed, fps=fps, end_reason=end_reason)
    return snap


def test_every_series_is_labelled_with_the_box_and_the_default_is_the_hostname(bundle):  # noqa: F811
    with MetricsServer(example_snapshot) as server:
        assert server.identity.instance == default_instance() and default_instance()
        _, text = _get(server.url + "/metrics")
    prom = _samples(text, default_instance())
    labels = dict(next(k for k in prom if k[0] == "gemel_run_info")[1])
    assert labels["bundle_name"] == "" and labels["version"] == gemel_studio.__version__
    # A bundle folder is enough to name what runs (the CLI passes the loaded bundle).
    identity = RunIdentity.of(bundle[1], "edge-01")
    assert identity.bundle_name == "bundle-test" and len(identity.bundle_sha256) == 64
    for bad in ("", "two words", "tab\there"):
        with pytest.raises(GemelError, match="--instance"):
            RunIdentity.of(None, bad)


def test_served_names_come_from_the_collector():
    names = served_metric_names()
    assert {"gemel_run_info", "gemel_run_healthy", "gemel_stream_frames_processed_total",
            "gemel_stream_frames_dropped_total", "gemel_model_swaps_total", "gemel_device_used_bytes",
            "gemel_reordered_batches_total", "gemel_prefetches_total", "gemel_prefetch_misses_total"} <= names
    # A run without a GPU serves fewer memory figures, never other names.
    cpu = example_snapshot()
    cpu["memory"] = {"budget_bytes": 1, "runtime_resident_bytes": 0, "runtime_peak_resident_bytes": 0}
    assert served_metric_names(cpu) < names


def test_healthz_is_200_while_every_stream_is_live_and_503_with_the_reason():
    current = {"snap": {**example_snapshot(), "state": "not started"}}
    with MetricsServer(lambda: current["snap"]) as server:
        health = server.url + "/healthz"
        code, body = _status(health)
        assert code == 503 and body.startswith("unhealthy: the run has not started"), body
        current["snap"] = _running(1.0, 10, 8)
        assert _status(health) == (200, "ok: 1 stream(s) live, run time 1 s\n")
        current["snap"] = _running(5.0, 50, 8)  # frames arrive, none processed: still within 10 s
        assert _status(health)[0] == 200
        current["snap"] = _running(20.0, 200, 8)
        code, body = _status(health)
        assert code == 503
        assert body == "unhealthy: stream synthetic:20: no frame processed for 19 s (2 dropped so far)\n"
        _, text = _get(server.url + "/metrics")  # the same answer as a gauge
        assert _samples(text)[("gemel_run_healthy", ())] == 0
        current["snap"] = _running(21.0, 200, 9, end_reason="ended")
        assert _status(health) == (503, "unhealthy: stream synthetic:20 ended (ended)\n")
        current["snap"] = {**_running(22.0, 200, 9), "state": "stopped: duration"}
        assert _status(health) == (503, "unhealthy: the run has stopped: duration\n")
        current["snap"] = None  # a snapshot that fails: 503, and the reason
        code, body = _status(health)
        assert code == 503 and body.startswith("unhealthy: the snapshot failed (")


def test_liveness_follows_the_run_clock_not_the_callers():
    watch = LivenessWatch(stall_s=10.0)
    assert watch.check(_running(0.5, 0, 0)).live  # nothing yet, but the run just started
    assert not watch.check(_running(11.0, 0, 0)).live  # no frame at all in 10 s
    assert watch.check(_running(12.0, 5, 3)).live
    health = watch.check(_running(30.0, 5, 3))
    assert not health.live and health.reasons == ["stream synthetic:20: no frame arrived for 18 s"]
    # A slow camera gets three of its frame intervals.
    slow = LivenessWatch(stall_s=10.0)
    assert slow.check(_running(1.0, 1, 1, fps=0.1)).live and slow.check(_running(25.0, 1, 1, fps=0.1)).live
    assert not slow.check(_running(40.0, 1, 1, fps=0.1)).live
    # Time that goes back is a restarted run: it starts afresh.
    assert watch.check(_running(1.0, 0, 0)).live


def test_a_collector_over_a_run_snapshot_object_or_its_dict_serves_the_same(loaded):
    engine = Engine(loaded, [(SyntheticSource(fps=10, size=(16, 16), frames=3, seed=1), ["color"])],
                    "merged", 200 * 2**20, "cpu")
    engine.run()
    typed = engine.snapshot()
    assert hasattr(typed, "to_dict")
    with MetricsServer(lambda: typed, instance="a") as a, MetricsServer(typed.to_dict, instance="a") as b:
        texts = [_get(s.url + "/metrics")[1] for s in (a, b)]
        served = a.identity.served(json.loads(json.dumps(typed.to_dict())))
        assert fetch_snapshot(a.url) == fetch_snapshot(b.url) == served
        assert fetch_snapshot(a.url)["instance"] == "a"  # the Monitor names a box by it
    assert _samples(texts[0]) == _samples(texts[1])


# --- rates: counts over time (what the Monitor draws) -----------------------------------------


def _counts(t: float, processed: dict[str, int], resident: int = 0) -> dict:
    streams = [{"name": n, "processed": p, "throughput_fps": 0.0} for n, p in processed.items()]
    return {"elapsed_s": t, "streams": streams,
            "memory": {"runtime_resident_bytes": resident, "budget_bytes": 100}}


def test_run_history_turns_counters_into_rates_over_a_window():
    h = RunHistory(maxlen=5, window_s=2.0)
    assert h.add(_counts(1.0, {"a": 0, "b": 0}))
    assert h.add(_counts(2.0, {"a": 10, "b": 4}, resident=7))
    assert h.latest_fps() == {"a": 10.0, "b": 4.0}
    assert h.add(_counts(3.0, {"a": 30, "b": 8}))
    assert h.latest_fps() == {"a": 15.0, "b": 4.0}  # over the last 2 s, not the last poll
    assert not h.add(_counts(3.0, {"a": 30, "b": 8}))  # a stopped run adds nothing
    assert list(h.resident) == [0.0, 7.0, 0.0] and h.budget == 100
    for i in range(10):
        h.add(_counts(4.0 + i, {"a": 40 + i, "b": 8}))
    assert len(h) == 5 and list(h.t) == [9.0, 10.0, 11.0, 12.0, 13.0]  # bounded
    # Another run (time went back, or other streams): afresh.
    assert h.add(_counts(0.5, {"a": 1, "b": 0})) and len(h) == 1
    assert h.add(_counts(1.0, {"c": 1})) and list(h.fps) == ["c"]
