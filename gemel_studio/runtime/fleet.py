"""A fleet's runs read back from a Prometheus server's HTTP API, as the snapshots each box serves.

`fleet_snapshots(url)` asks Prometheus (`/api/v1/query`) for the latest value of every `gemel_*`
series and regroups them by their `instance` label into one dict per box, of the shape of
`/metrics.json` (what `RunSnapshot.from_dict` and `RunHistory` read), so the Monitor shows a
box the same way whether it polls the box or the Prometheus that scrapes it. What Prometheus
does not keep (a stream's models, why it ended) takes a neutral value. A box whose scrapes
fail drops out of the answer once Prometheus marks its series stale.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request

from ..errors import GemelError
from . import metrics

QUERY_PATH = "/api/v1/query"
ALL_SERIES = '{__name__=~"gemel_.+"}'

# Metric name -> the snapshot's key: runtime/metrics.py's tables, read the other way.
_MEMORY = {metric: key for key, (metric, _) in metrics.MEMORY_METRICS.items()}
_STREAM = {"gemel_stream_frames_total": "frames_in", "gemel_stream_frames_processed_total": "processed",
           "gemel_stream_throughput_fps": "throughput_fps"}
_MODEL = {**{f"{metric}_total": key for key, (metric, _) in metrics.MODEL_COUNTERS.items()},
          "gemel_model_bytes": "bytes", "gemel_model_max_batch": "max_batch"}
_INTEGRAL = {"frames_in", "processed", "swaps", "loaded_bytes", "runs", "refused", "batches", "bytes", "max_batch",
             *_MEMORY.values()}


def prometheus_url(address: str) -> str:
    """`address` (host:port or an http URL of a Prometheus server) as its base URL."""
    address = address.strip().rstrip("/")
    url = address if address.startswith(("http://", "https://")) else f"http://{address}"
    return url[: -len(QUERY_PATH)] if url.endswith(QUERY_PATH) else url


def query(address: str, promql: str, timeout: float = 2.0) -> list[dict]:
    """The instant vector `promql` evaluates to now: [{"metric": {labels}, "value": [t, "v"]}]."""
    url = f"{prometheus_url(address)}{QUERY_PATH}?{urllib.parse.urlencode({'query': promql})}"
    where = prometheus_url(address)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError, OSError):
            pass
        raise GemelError(f"{where}: HTTP {exc.code} for query {promql}{': ' + detail if detail else ''}; "
                         "is this a Prometheus server?") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GemelError(f"{where}: cannot reach Prometheus ({reason}); is it running there "
                         "(e.g. prometheus --config.file=deploy/prometheus/prometheus.yml)?") from None
    try:
        answer = json.loads(raw)
        if answer.get("status") != "success":
            raise GemelError(f"{where}: Prometheus answered {answer.get('errorType', 'an error')}: "
                             f"{answer.get('error', '?')}")
        data = answer["data"]
        if data.get("resultType") != "vector":
            raise GemelError(f"{where}: expected an instant vector, got {data.get('resultType')}")
        return list(data["result"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise GemelError(f"{where}: the answer is not Prometheus's query API JSON; is this a Prometheus "
                         "server (not a `gemel run` box: use the Boxes mode for those)?") from None


def _value(sample: dict):
    v = float(sample["value"][1])
    return None if math.isnan(v) else v


def snapshots_from_series(series: list[dict]) -> dict[str, dict]:
    """Prometheus samples of `gemel_*` series regrouped per `instance` into snapshot dicts."""
    runs: dict[str, dict] = {}
    streams: dict[str, dict[str, dict]] = {}

    def run(instance: str) -> dict:
        if instance not in runs:
            runs[instance] = {"instance": instance, "bundle": "?", "policy": "?", "backend": "?", "device": "?",
                              "state": "", "elapsed_s": 0.0, "streams": [], "models": {}, "memory": {}}
            streams[instance] = {}
        return runs[instance]

    def stream(instance: str, name: str) -> dict:
        run(instance)
        return streams[instance].setdefault(name, {"name": name, "frames_in": 0, "processed": 0, "dropped_late": 0,
                                                   "dropped_refused": 0, "dropped_error": 0, "throughput_fps": 0.0,
                                                   "end_reason": None})

    for sample in series:
        labels = sample.get("metric", {})
        name, instance = labels.get("__name__", ""), labels.get("instance")
        if instance is None:
            continue
        value = _value(sample)
        if value is None:
            continue
        r = run(instance)
        if name == "gemel_run_info":
            r.update({k: labels[k] for k in ("bundle", "policy", "backend", "device", "state", "bundle_name",
                                             "bundle_sha256", "version") if k in labels})
        elif name == "gemel_elapsed_seconds":
            r["elapsed_s"] = value
        elif name == "gemel_run_healthy":
            r["healthy"] = bool(value)
        elif name in _MEMORY:
            r["memory"][_MEMORY[name]] = int(value)
        elif name in _STREAM and "stream" in labels:
            key = _STREAM[name]
            stream(instance, labels["stream"])[key] = int(value) if key in _INTEGRAL else value
        elif name == "gemel_stream_frames_dropped_total" and "stream" in labels:
            stream(instance, labels["stream"])[f"dropped_{labels.get('reason', 'late')}"] = int(value)
        elif name == "gemel_stream_ended" and "stream" in labels:
            stream(instance, labels["stream"])["end_reason"] = "ended" if value else None
        elif name == "gemel_stream_latency_seconds" and "stream" in labels:
            key = {"0.5": "latency_p50_ms", "0.99": "latency_p99_ms"}.get(labels.get("quantile", ""))
            if key:
                stream(instance, labels["stream"])[key] = 1000.0 * value
        elif name in _MODEL and "model" in labels:
            key = _MODEL[name]
            r["models"].setdefault(labels["model"], {})[key] = int(value) if key in _INTEGRAL else value
    for instance, r in runs.items():
        rows = []
        for s in sorted(streams[instance].values(), key=lambda s: s["name"]):
            s["dropped"] = s["dropped_late"] + s["dropped_refused"] + s["dropped_error"]
            s["processed_fraction"] = s["processed"] / s["frames_in"] if s["frames_in"] else None
            rows.append(s)
        r["streams"] = rows
        r["memory"].setdefault("runtime_resident_bytes", 0)
        r["memory"].setdefault("runtime_peak_resident_bytes", 0)
    return dict(sorted(runs.items()))


def fleet_snapshots(address: str, timeout: float = 2.0) -> dict[str, dict]:
    """{instance: snapshot dict} of every box the Prometheus server at `address` has current
    `gemel_*` series of."""
    return snapshots_from_series(query(address, ALL_SERIES, timeout))


__all__ = ["ALL_SERIES", "QUERY_PATH", "fleet_snapshots", "prometheus_url", "query", "snapshots_from_series"]
