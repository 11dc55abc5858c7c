"""A run's counters turned into rates over time: the history the Monitor draws, Qt-free.

`RunHistory.add(snapshot)` takes successive snapshots of one run (the JSON dict `/metrics.json`
serves, a `RunSnapshot`, or the dict `runtime.fleet` rebuilds from Prometheus) and keeps bounded
series over the run's elapsed seconds: each stream's processed frames per second, from the
change of its `processed` counter over the last `RATE_WINDOW_S` (not the run's average), and
the runtime's resident weights. A snapshot from another run (time went back, or other streams)
starts the series afresh.
"""

from __future__ import annotations

from collections import deque

HISTORY = 1200  # points per series: ten minutes at two snapshots a second
RATE_WINDOW_S = 2.0  # a stream's rate is measured over this long: over one poll a 4 fps stream reads 2, 4 or 6


def _as_dict(snapshot) -> dict:
    return snapshot.to_dict() if hasattr(snapshot, "to_dict") else snapshot


class RunHistory:
    """Bounded series over the run's elapsed seconds: per-stream processed frames per second
    (the change of its `processed` counter over the last `window_s`) and resident bytes."""

    def __init__(self, maxlen: int = HISTORY, window_s: float = RATE_WINDOW_S):
        self.maxlen = maxlen
        self.window_s = window_s
        self.clear()

    def clear(self) -> None:
        self.t: deque[float] = deque(maxlen=self.maxlen)
        self.resident: deque[float] = deque(maxlen=self.maxlen)
        self.fps: dict[str, deque[float]] = {}
        self.budget: int | None = None
        self._last: dict | None = None
        self._recent: deque[tuple[float, dict[str, int]]] = deque()  # (elapsed, processed per stream)

    def __len__(self) -> int:
        return len(self.t)

    def add(self, snapshot) -> bool:
        """Add a point; False when the snapshot is no later than the last one (a stopped run).
        A snapshot from another run (time went back, or other streams) starts afresh."""
        snap = _as_dict(snapshot)
        t = float(snap["elapsed_s"])
        names = [s["name"] for s in snap["streams"]]
        last = self._last
        if last is not None and (t < last["elapsed_s"] or names != [s["name"] for s in last["streams"]]):
            self.clear()
            last = None
        if last is not None and t <= last["elapsed_s"]:
            return False
        self._recent.append((t, {s["name"]: s["processed"] for s in snap["streams"]}))
        while len(self._recent) > 2 and t - self._recent[1][0] >= self.window_s:
            self._recent.popleft()  # keep the latest snapshot at least the window old
        t0, before = self._recent[0]
        for s in snap["streams"]:
            rate = (s["processed"] - before[s["name"]]) / (t - t0) if t > t0 else s.get("throughput_fps", 0.0)
            self.fps.setdefault(s["name"], deque(maxlen=self.maxlen)).append(rate)
        self.t.append(t)
        self.resident.append(float(snap["memory"].get("runtime_resident_bytes", 0)))
        self.budget = snap["memory"].get("budget_bytes")
        self._last = {"elapsed_s": t, "streams": [{"name": n} for n in names]}
        return True

    def latest_fps(self) -> dict[str, float]:
        """Each stream's last rate (what a one-row-per-box table shows)."""
        return {name: series[-1] for name, series in self.fps.items() if series}


__all__ = ["HISTORY", "RATE_WINDOW_S", "RunHistory"]
