"""Live metrics of a run, served over HTTP: Prometheus text at `/metrics`, a JSON snapshot at
`/metrics.json`, and `/healthz` (200 while every stream is live, 503 with the reason otherwise).

Every request reads `snapshot()` of the running engine (a `RunSnapshot`, or anything with a
`snapshot()` that returns one or its dict), so the endpoints serve exactly what the runtime
counted at that moment; nothing is cached. The server binds 127.0.0.1 unless told otherwise: a
metrics port reachable from the network is a decision the operator makes explicitly
(`--metrics-host`).

The exposition is prometheus_client's: a custom collector turns the snapshot into metric
families (counters for frames, swaps and loads; gauges for latency quantiles and memory). For a
fleet every series carries an `instance` label, the box's name (`gemel run --instance`, by
default the hostname), and `gemel_run_info` names the bundle (workload name, sha256 of its
manifest) and the runtime's version. `deploy/prometheus` and `deploy/grafana` read these.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from .. import __version__
from ..errors import GemelError

LOOPBACK = "127.0.0.1"
JSON_PATH = "/metrics.json"
PROM_PATH = "/metrics"
HEALTH_PATH = "/healthz"
MANIFEST = "manifest.json"  # (runtime/bundle.py's name; not imported from there, which imports torch)
STALL_S = 10.0  # a stream whose counters stand still this long is not live

# Memory figures of the snapshot and their metric names; each is a different thing, named so.
MEMORY_METRICS = {
    "budget_bytes": ("gemel_memory_budget_bytes", "The memory budget the scheduler keeps to"),
    "runtime_resident_bytes": ("gemel_runtime_resident_bytes", "Model weights the runtime holds resident"),
    "runtime_peak_resident_bytes": ("gemel_runtime_peak_resident_bytes", "Peak of the resident model weights"),
    "process_rss_bytes": ("gemel_process_resident_memory_bytes", "Resident memory of the runtime's process"),
    "torch_allocated_bytes": ("gemel_torch_allocated_bytes", "torch.cuda.memory_allocated on the device"),
    "torch_reserved_bytes": ("gemel_torch_reserved_bytes", "torch.cuda.memory_reserved on the device"),
    "device_used_bytes": ("gemel_device_used_bytes", "GPU memory in use on the device (pynvml)"),
    "device_total_bytes": ("gemel_device_total_bytes", "GPU memory of the device (pynvml)"),
    "cuda_allocator_cache_bytes": ("gemel_cuda_allocator_cache_bytes",
                                   "GPU memory torch's caching allocator reserved beyond allocated tensors"),
    "gpu_process_used_bytes": ("gemel_gpu_process_used_bytes", "GPU memory of the runtime's process (pynvml)"),
    "cuda_context_bytes": ("gemel_cuda_context_bytes",
                           "The process's GPU memory beyond what torch reserved (the CUDA context; pynvml)"),
}

# The run's scheduling counters and the per-model counters of the snapshot, with their metric
# names (Prometheus adds `_total`).
RUN_COUNTERS = {  # snapshot key -> (metric, help), over all models
    "reordered_batches": ("gemel_reordered_batches", "Batches the merge-aware order ran before the fair choice"),
    "prefetches": ("gemel_prefetches", "Loads started while the model before was still running"),
    "prefetch_misses": ("gemel_prefetch_misses", "Prefetches for a model that did not run next (wasted copies)"),
}
MODEL_COUNTERS = {
    "swaps": ("gemel_model_swaps", "Loads of the model's weights (first load included)"),
    "load_seconds": ("gemel_model_load_seconds", "Time spent loading the model's weights"),
    "loaded_bytes": ("gemel_model_loaded_bytes", "Bytes loaded for the model"),
    "load_wait_seconds": ("gemel_model_load_wait_seconds", "Time inference waited for the model's weights to load"),
    "infer_seconds": ("gemel_model_infer_seconds", "Time spent running the model"),
    "runs": ("gemel_model_runs", "Frames run through the model"),
    "refused": ("gemel_model_refused", "Requests the policy refused"),
    "batches": ("gemel_model_batches", "Batches run through the model (runs / batches is the mean batch size)"),
}


def as_dict(snapshot) -> dict:
    """A snapshot as its JSON dict: a RunSnapshot (`Engine.snapshot()`) or a dict already."""
    return snapshot.to_dict() if hasattr(snapshot, "to_dict") else snapshot


def default_instance() -> str:
    """The box's name when `--instance` is not given: its hostname, stable across restarts."""
    return socket.gethostname() or "localhost"


@dataclass(frozen=True)
class RunIdentity:
    """What a fleet needs to tell runs apart: the box (`instance`, a label on every series), the
    bundle it runs (its workload's name and the sha256 of its manifest, which names every file's
    sha256, so two boxes with the same digest run the same weights) and the runtime's version."""

    instance: str
    bundle_name: str = ""
    bundle_sha256: str = ""
    version: str = __version__

    @classmethod
    def of(cls, bundle=None, instance: str | None = None) -> "RunIdentity":
        """From a loaded bundle (`load_bundle`) or a bundle folder, and an instance name
        (default: the hostname)."""
        if instance is None:
            instance = default_instance()
        if not instance.strip() or any(c.isspace() or not c.isprintable() for c in instance):
            raise GemelError(f"--instance '{instance}': expected a name without spaces, e.g. the box's "
                             "hostname (the default) or edge-07")
        if bundle is None:
            return cls(instance)
        folder = Path(getattr(bundle, "folder", bundle))
        manifest = folder / MANIFEST
        raw = manifest.read_bytes()
        name = getattr(getattr(bundle, "manifest", None), "workload", None)
        if name is None:
            name = str(json.loads(raw).get("workload", folder.name))
        return cls(instance, name, hashlib.sha256(raw).hexdigest())

    def labels(self) -> dict[str, str]:
        return {"bundle_name": self.bundle_name, "bundle_sha256": self.bundle_sha256, "version": self.version}

    def served(self, snapshot: dict) -> dict:
        """The JSON snapshot as `/metrics.json` serves it: the run's own figures, with the box's
        name and the bundle's identity beside them (the Monitor names a box by its instance)."""
        return {"instance": self.instance, **self.labels(), **snapshot}


@dataclass
class Health:
    """The answer of `/healthz`: live when every stream is; otherwise each reason, one line."""

    live: bool
    reasons: list[str]
    summary: str = ""

    def text(self) -> str:
        return f"ok: {self.summary}\n" if self.live else "unhealthy: " + "; ".join(self.reasons) + "\n"


class LivenessWatch:
    """Whether a run's streams are live, from its successive snapshots.

    A stream is live while its source has not ended and both its `frames_in` and `processed`
    counters have moved within the last `stall_s` seconds of run time (or three frame intervals
    of a slow stream, whichever is longer). A counter still at zero counts as moved at the run's
    start, so a run gets `stall_s` to deliver its first frames. The clock is the snapshot's own
    `elapsed_s`, so how often it is asked does not change the answer; a snapshot whose time went
    back is another run and starts afresh."""

    def __init__(self, stall_s: float = STALL_S):
        self.stall_s = stall_s
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, tuple[int, float]]] = {}  # stream -> counter -> (value, when it moved)
        self._last_t = -1.0

    def check(self, snap: dict) -> Health:
        with self._lock:
            return self._check(snap)

    def _check(self, snap: dict) -> Health:
        state = str(snap.get("state", ""))
        t = float(snap.get("elapsed_s", 0.0))
        if t < self._last_t:
            self._seen.clear()
        self._last_t = t
        streams = snap.get("streams", [])
        reasons = []
        if state != "running":
            reasons.append("the run has not started (it profiles its models first)" if state == "not started"
                           else f"the run has {state}" if state.startswith("stopped") else f"the run is {state!r}")
        elif not streams:
            reasons.append("the run has no streams")
        for s in streams:
            name = s.get("name", "?")
            seen = self._seen.setdefault(name, {})
            for key in ("frames_in", "processed"):
                value = int(s.get(key, 0))
                old = seen.get(key)
                if old is None:
                    seen[key] = (value, t if value else 0.0)
                elif value != old[0]:
                    seen[key] = (value, t)
            if state != "running":
                continue
            if s.get("end_reason") is not None:
                reasons.append(f"stream {name} ended ({s['end_reason']})")
                continue
            fps = float(s.get("fps") or 0.0)
            allowed = max(self.stall_s, 3.0 / fps) if fps > 0 else self.stall_s
            arrived, processed = t - seen["frames_in"][1], t - seen["processed"][1]
            if arrived > allowed:
                reasons.append(f"stream {name}: no frame arrived for {arrived:.0f} s")
            elif processed > allowed:
                reasons.append(f"stream {name}: no frame processed for {processed:.0f} s "
                               f"({s.get('dropped', 0)} dropped so far)")
        return Health(not reasons, reasons, f"{len(streams)} stream(s) live, run time {t:.0f} s")


class SnapshotCollector:
    """A prometheus_client collector over a `snapshot()` callable. Every series carries the
    `instance` label of `identity` (the scrape configuration keeps it: `honor_labels: true`)."""

    def __init__(self, snapshot: Callable[[], dict], identity: RunIdentity | None = None,
                 liveness: LivenessWatch | None = None):
        self._snapshot = snapshot
        self.identity = identity or RunIdentity(default_instance())
        self.liveness = liveness or LivenessWatch()

    def collect(self):
        snap = as_dict(self._snapshot())
        inst = self.identity.instance

        def family(kind, name, doc, labels=()):
            return kind(name, doc, labels=["instance", *labels])

        def gauge(name, doc, value):
            fam = family(GaugeMetricFamily, name, doc)
            fam.add_metric([inst], value)
            return fam

        info = family(InfoMetricFamily, "gemel_run", "What this run is: the box, the bundle (its workload's name and "
                      "its manifest's sha256), the runtime's version, the policy and the run's state")
        run = {k: str(snap.get(k, "")) for k in ("bundle", "policy", "backend", "device", "state")}
        run["order"] = str(snap.get("order") or "")  # "" from a runtime that does not say
        run["prefetch"] = "on" if snap.get("prefetch") else "off"
        info.add_metric([inst], {**self.identity.labels(), **run})
        yield info
        yield gauge("gemel_elapsed_seconds", "Seconds since the run started", snap.get("elapsed_s", 0.0))
        yield gauge("gemel_run_healthy", "1 while every stream is live (what /healthz answers 200 to)",
                    1 if self.liveness.check(snap).live else 0)
        for key, (name, doc) in RUN_COUNTERS.items():
            fam = family(CounterMetricFamily, name, doc)
            fam.add_metric([inst], snap.get(key, 0) or 0)
            yield fam

        streams = snap.get("streams", [])
        families = {
            "frames_in": family(CounterMetricFamily, "gemel_stream_frames", "Frames that arrived", ["stream"]),
            "processed": family(CounterMetricFamily, "gemel_stream_frames_processed", "Frames processed before "
                                "their deadline", ["stream"]),
        }
        dropped = family(CounterMetricFamily, "gemel_stream_frames_dropped", "Frames dropped: late (deadline "
                         "passed), refused (no model resident for them) or error (a model failed)",
                         ["stream", "reason"])
        latency = family(GaugeMetricFamily, "gemel_stream_latency_seconds", "Arrival-to-result latency of processed "
                         "frames", ["stream", "quantile"])
        fps = family(GaugeMetricFamily, "gemel_stream_throughput_fps", "Frames processed per second (the run's "
                     "average)", ["stream"])
        ended = family(GaugeMetricFamily, "gemel_stream_ended", "1 once the stream's source has ended", ["stream"])
        for s in streams:
            for key, fam in families.items():
                fam.add_metric([inst, s["name"]], s[key])
            dropped.add_metric([inst, s["name"], "late"], s["dropped_late"])
            dropped.add_metric([inst, s["name"], "refused"], s["dropped_refused"])
            dropped.add_metric([inst, s["name"], "error"], s.get("dropped_error", 0))
            for q, key in (("0.5", "latency_p50_ms"), ("0.99", "latency_p99_ms")):
                if s.get(key) is not None:
                    latency.add_metric([inst, s["name"], q], s[key] / 1000.0)
            fps.add_metric([inst, s["name"]], s["throughput_fps"])
            ended.add_metric([inst, s["name"]], 0 if s["end_reason"] is None else 1)
        yield from families.values()
        yield from (dropped, latency, fps, ended)

        per_model = {key: family(CounterMetricFamily, name, doc, ["model"])
                     for key, (name, doc) in MODEL_COUNTERS.items()}
        size = family(GaugeMetricFamily, "gemel_model_bytes", "Bytes the model alone needs resident", ["model"])
        largest = family(GaugeMetricFamily, "gemel_model_max_batch", "Largest batch the start's profile allows",
                         ["model"])
        for name, m in snap.get("models", {}).items():
            for key, fam in per_model.items():
                fam.add_metric([inst, name], m.get(key, 0.0) or 0.0)
            size.add_metric([inst, name], m["bytes"])
            if m.get("max_batch") is not None:
                largest.add_metric([inst, name], m["max_batch"])
        yield from per_model.values()
        yield size
        yield largest

        for key, (metric, doc) in MEMORY_METRICS.items():
            value = snap.get("memory", {}).get(key)
            if value is not None:
                yield gauge(metric, doc, value)


def served_metric_names(snapshot: dict | None = None) -> set[str]:
    """Every sample name `/metrics` serves for `snapshot` (default: a run of one stream and one
    model with every memory figure, GPU ones included): what a dashboard or an alert may name."""
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot if snapshot is not None else example_snapshot(),
                                        RunIdentity("example")))
    return {s.name for fam in text_string_to_metric_families(generate_latest(registry).decode())
            for s in fam.samples}


def example_snapshot() -> dict:
    """A snapshot of the shape `Engine.snapshot()` serves, with every optional figure present."""
    stream = {"name": "synthetic:20", "models": ["m"], "fps": 20.0, "frames_in": 10, "processed": 8, "dropped": 2,
              "dropped_late": 1, "dropped_refused": 1, "dropped_error": 0, "latency_p50_ms": 5.0,
              "latency_p99_ms": 9.0, "throughput_fps": 8.0, "end_reason": None}
    model = {"bytes": 1000, "max_batch": 4, **{key: 1 for key in MODEL_COUNTERS}}
    return {"bundle": "b", "policy": "merged", "backend": "torch", "device": "cuda:0", "state": "running",
            "order": "merge-aware", "prefetch": True, **{key: 1 for key in RUN_COUNTERS}, "elapsed_s": 1.0,
            "streams": [stream], "models": {"m": model},
            "memory": {key: 1 for key in MEMORY_METRICS}}


class MetricsServer:
    """Serves a snapshot callable on `host:port` from a daemon thread until `close()`.
    Port 0 picks a free port; `url` says where it listens. `instance` names the box on every
    series (default: the hostname); `bundle` (a loaded bundle or its folder) names what it runs
    on `gemel_run_info`."""

    def __init__(self, snapshot: Callable[[], dict], port: int = 0, host: str = LOOPBACK, *,
                 instance: str | None = None, bundle=None, stall_s: float = STALL_S):
        self.identity = RunIdentity.of(bundle, instance)
        self.liveness = LivenessWatch(stall_s)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot, self.identity, self.liveness))
        registry, liveness, identity = self.registry, self.liveness, self.identity

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                status = 200
                try:
                    if path == PROM_PATH:
                        body, ctype = generate_latest(registry), CONTENT_TYPE_LATEST
                    elif path == JSON_PATH:
                        body, ctype = json.dumps(identity.served(as_dict(snapshot()))).encode(), "application/json"
                    elif path == HEALTH_PATH:
                        health = liveness.check(as_dict(snapshot()))
                        status = 200 if health.live else 503
                        body, ctype = health.text().encode(), "text/plain; charset=utf-8"
                    else:
                        self.send_error(404, f"not found; try {PROM_PATH}, {JSON_PATH} or {HEALTH_PATH}")
                        return
                except Exception as exc:  # a snapshot that fails must not kill the server
                    # The reason goes in the body: a status line must be one latin-1 line.
                    reason = f"{type(exc).__name__}: {exc}"
                    if path == HEALTH_PATH:
                        status, ctype = 503, "text/plain; charset=utf-8"
                        body = f"unhealthy: the snapshot failed ({reason})\n".encode()
                    else:
                        self.send_error(500, "snapshot failed", explain=reason)
                        return
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # no request log on the runtime's stderr
                pass

        if not 0 <= port <= 65535:
            raise GemelError(f"metrics port {port}: expected 0 (any free port) to 65535")
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except (socket.gaierror, UnicodeError) as exc:
            raise GemelError(f"metrics address '{host}': not an address of this machine ({exc}); "
                             "use --metrics-host 127.0.0.1, ::1 or 0.0.0.0") from None
        server_class = type("MetricsHTTPServer", (ThreadingHTTPServer,), {"address_family": family})
        try:
            self._server = server_class((host, port), Handler)
        except OSError as exc:
            raise GemelError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                             "pick another --metrics-port (0 picks a free one) or --metrics-host") from None
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="gemel-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fetch_snapshot(address: str, timeout: float = 2.0) -> dict:
    """The JSON snapshot of a running `gemel run` at `address` (host:port or an http URL)."""
    import http.client
    import urllib.error
    import urllib.request

    url = address.strip() if address.strip().startswith(("http://", "https://")) else f"http://{address.strip()}"
    url = url.rstrip("/")
    if url.endswith(PROM_PATH):
        url = url[: -len(PROM_PATH)]
    if not url.endswith(JSON_PATH):
        url += JSON_PATH
    hint = "is `gemel run --metrics-port` running there?"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise GemelError(f"{url}: HTTP {exc.code}; is this a `gemel run --metrics-port` address?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GemelError(f"{url}: cannot connect ({reason}); {hint}") from None
    except http.client.InvalidURL as exc:
        raise GemelError(f"'{address}': not an address ({exc}); write HOST:PORT, e.g. 127.0.0.1:9400") from None
    except http.client.HTTPException as exc:  # something that does not speak HTTP, or hung up mid-answer
        raise GemelError(f"{url}: not an HTTP answer ({type(exc).__name__}); {hint}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise GemelError(f"{url}: the answer is not JSON; is this a `gemel run --metrics-port` address?") from None


__all__ = ["HEALTH_PATH", "JSON_PATH", "LOOPBACK", "MEMORY_METRICS", "MODEL_COUNTERS", "PROM_PATH", "RUN_COUNTERS",
           "Health", "LivenessWatch", "MetricsServer", "RunIdentity", "SnapshotCollector", "as_dict",
           "default_instance", "example_snapshot", "fetch_snapshot", "served_metric_names"]
