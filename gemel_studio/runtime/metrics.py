"""Live metrics of a run, served over HTTP: Prometheus text at `/metrics`, a JSON snapshot at
`/metrics.json`.

Every scrape reads `snapshot()` of the running engine (or anything with a `snapshot()` that
returns the engine's dict), so the endpoint serves exactly what the runtime counted at that
moment; nothing is cached. The server binds 127.0.0.1 unless told otherwise: a metrics port
reachable from the network is a decision the operator makes explicitly (`--metrics-host`).

The exposition is prometheus_client's: a custom collector turns the snapshot into metric
families (counters for frames, swaps and loads; gauges for latency quantiles and memory).
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from ..errors import GemelError

LOOPBACK = "127.0.0.1"
JSON_PATH = "/metrics.json"
PROM_PATH = "/metrics"

# Memory figures of the snapshot and their metric names; each is a different thing, named so.
_MEMORY = {
    "budget_bytes": ("gemel_memory_budget_bytes", "The memory budget the scheduler keeps to"),
    "runtime_resident_bytes": ("gemel_runtime_resident_bytes", "Model weights the runtime holds resident"),
    "runtime_peak_resident_bytes": ("gemel_runtime_peak_resident_bytes", "Peak of the resident model weights"),
    "process_rss_bytes": ("gemel_process_resident_memory_bytes", "Resident memory of the runtime's process"),
    "torch_allocated_bytes": ("gemel_torch_allocated_bytes", "torch.cuda.memory_allocated on the device"),
    "torch_reserved_bytes": ("gemel_torch_reserved_bytes", "torch.cuda.memory_reserved on the device"),
    "device_used_bytes": ("gemel_device_used_bytes", "GPU memory in use on the device (pynvml)"),
    "device_total_bytes": ("gemel_device_total_bytes", "GPU memory of the device (pynvml)"),
}


class SnapshotCollector:
    """A prometheus_client collector over a `snapshot()` callable."""

    def __init__(self, snapshot: Callable[[], dict]):
        self._snapshot = snapshot

    def collect(self):
        snap = self._snapshot()
        info = InfoMetricFamily("gemel_run", "What this run is")
        info.add_metric([], {k: str(snap.get(k, "")) for k in ("bundle", "policy", "backend", "device", "state")})
        yield info
        yield GaugeMetricFamily("gemel_elapsed_seconds", "Seconds since the run started", value=snap["elapsed_s"])

        streams = snap["streams"]
        families = {
            "frames_in": CounterMetricFamily("gemel_stream_frames", "Frames that arrived", labels=["stream"]),
            "processed": CounterMetricFamily("gemel_stream_frames_processed", "Frames processed before their "
                                             "deadline", labels=["stream"]),
        }
        dropped = CounterMetricFamily("gemel_stream_frames_dropped", "Frames dropped: late (deadline passed), "
                                      "refused (no model resident for them) or error (a model failed)",
                                      labels=["stream", "reason"])
        latency = GaugeMetricFamily("gemel_stream_latency_seconds", "Arrival-to-result latency of processed frames",
                                    labels=["stream", "quantile"])
        fps = GaugeMetricFamily("gemel_stream_throughput_fps", "Frames processed per second", labels=["stream"])
        ended = GaugeMetricFamily("gemel_stream_ended", "1 once the stream's source has ended", labels=["stream"])
        for s in streams:
            for key, fam in families.items():
                fam.add_metric([s["name"]], s[key])
            dropped.add_metric([s["name"], "late"], s["dropped_late"])
            dropped.add_metric([s["name"], "refused"], s["dropped_refused"])
            dropped.add_metric([s["name"], "error"], s.get("dropped_error", 0))
            for q, key in (("0.5", "latency_p50_ms"), ("0.99", "latency_p99_ms")):
                if s[key] is not None:
                    latency.add_metric([s["name"], q], s[key] / 1000.0)
            fps.add_metric([s["name"]], s["throughput_fps"])
            ended.add_metric([s["name"]], 0 if s["end_reason"] is None else 1)
        yield from families.values()
        yield from (dropped, latency, fps, ended)

        per_model = {
            "swaps": CounterMetricFamily("gemel_model_swaps", "Loads of the model's weights (first load included)",
                                         labels=["model"]),
            "load_seconds": CounterMetricFamily("gemel_model_load_seconds", "Time spent loading the model's weights",
                                                labels=["model"]),
            "loaded_bytes": CounterMetricFamily("gemel_model_loaded_bytes", "Bytes loaded for the model",
                                                labels=["model"]),
            "load_wait_seconds": CounterMetricFamily("gemel_model_load_wait_seconds", "Time inference waited for "
                                                     "the model's weights to load", labels=["model"]),
            "infer_seconds": CounterMetricFamily("gemel_model_infer_seconds", "Time spent running the model",
                                                 labels=["model"]),
            "runs": CounterMetricFamily("gemel_model_runs", "Frames run through the model", labels=["model"]),
            "refused": CounterMetricFamily("gemel_model_refused", "Requests the policy refused", labels=["model"]),
            "batches": CounterMetricFamily("gemel_model_batches", "Batches run through the model (runs / batches "
                                           "is the mean batch size)", labels=["model"]),
        }
        size = GaugeMetricFamily("gemel_model_bytes", "Bytes the model alone needs resident", labels=["model"])
        largest = GaugeMetricFamily("gemel_model_max_batch", "Largest batch the start's profile allows",
                                    labels=["model"])
        for name, m in snap["models"].items():
            for key, fam in per_model.items():
                fam.add_metric([name], m.get(key, 0.0) or 0.0)
            size.add_metric([name], m["bytes"])
            if m.get("max_batch") is not None:
                largest.add_metric([name], m["max_batch"])
        yield from per_model.values()
        yield size
        yield largest

        for key, (metric, doc) in _MEMORY.items():
            value = snap["memory"].get(key)
            if value is not None:
                yield GaugeMetricFamily(metric, doc, value=value)


class MetricsServer:
    """Serves a snapshot callable on `host:port` from a daemon thread until `close()`.
    Port 0 picks a free port; `url` says where it listens."""

    def __init__(self, snapshot: Callable[[], dict], port: int = 0, host: str = LOOPBACK):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                try:
                    if path == PROM_PATH:
                        body, ctype = generate_latest(registry), CONTENT_TYPE_LATEST
                    elif path == JSON_PATH:
                        body, ctype = json.dumps(snapshot()).encode(), "application/json"
                    else:
                        self.send_error(404, f"not found; try {PROM_PATH} or {JSON_PATH}")
                        return
                except Exception as exc:  # a snapshot that fails must not kill the server
                    # The reason goes in the body: a status line must be one latin-1 line.
                    self.send_error(500, "snapshot failed", explain=f"{type(exc).__name__}: {exc}")
                    return
                self.send_response(200)
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


__all__ = ["JSON_PATH", "LOOPBACK", "MetricsServer", "PROM_PATH", "SnapshotCollector", "fetch_snapshot"]
