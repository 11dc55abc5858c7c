"""Where the runtime's results go: one record per processed frame.

A sink is any object with `write(record)`, `flush()` and `close()` (`ResultSink`). The engine
calls `write` from its worker thread, once per frame processed in time, with a plain dict:

    {"stream": "synthetic:30", "frame": 41, "timestamp": 1234.56, "latency_ms": 12.3,
     "models": {"shape": {"task": "classification", "labels": [...], "scores": [...]},
                "people": {"task": "detection", "boxes": [[x1, y1, x2, y2], ...], "labels": [...],
                           "scores": [...]}}}

`timestamp` is the frame's arrival on the monotonic clock (`time.monotonic()`), `wall_time`
the same instant as Unix time. `JsonlSink` is the one implementation: JSON lines to a file
(appended, flushed after every line, rotated by size) or to standard output.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

from ..errors import GemelError


class ResultSink(Protocol):
    def write(self, record: dict) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line. `path` '-' is standard output (never rotated). A file is
    opened for appending; every line is flushed as it is written, so a crash loses at most the
    line being written. When a line would take the file past `max_bytes`, the file is rotated
    first: FILE becomes FILE.1, FILE.1 becomes FILE.2, ... and the oldest past `backups` goes."""

    def __init__(self, path: str | Path, max_bytes: int = 100 * 2**20, backups: int = 5):
        if max_bytes <= 0:
            raise GemelError(f"results rotation size {max_bytes}: must be a positive number of bytes "
                             "(--results-max-bytes)")
        self.path = None if str(path) == "-" else Path(path)
        self.max_bytes = int(max_bytes)
        self.backups = max(0, int(backups))
        self.lines = 0
        self.rotations = 0
        self._lock = threading.Lock()
        self._offset = time.time() - time.monotonic()  # monotonic -> Unix time
        if self.path is None:
            self._file = sys.stdout
            self._size = 0
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            except OSError as exc:
                raise GemelError(f"--results {path}: cannot open for writing ({exc.strerror or exc}); "
                                 "name a writable file, or - for standard output") from None
            self._size = self.path.stat().st_size

    def write(self, record: dict) -> None:
        record = dict(record)
        if "timestamp" in record and "wall_time" not in record:
            record["wall_time"] = record["timestamp"] + self._offset
        line = json.dumps(record, separators=(",", ":")) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            if self.path is not None and self._size > 0 and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._file.flush()
            self._size += len(data)
            self.lines += 1

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "a", encoding="utf-8")
        self._size = 0
        self.rotations += 1

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self.path is not None and not self._file.closed:
                self._file.close()
            elif self.path is None:
                self._file.flush()

    def __enter__(self) -> "JsonlSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["JsonlSink", "ResultSink"]
