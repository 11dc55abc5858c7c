"""What a run reports: the typed snapshot and summary, the memory probes, and what a model's
output says in plain data.

`RunSnapshot` is what `Engine.snapshot()` returns while a run works; `RunSummary` what
`Engine.run()` returns when it ends. Both hold the same rows (`StreamRow` per stream,
`ModelRow` per model) and a memory report whose figures each keep their own name: the
runtime's resident weights, the process's resident memory, torch's allocated and reserved
bytes and the device's used and total memory are different memories, never summed. `to_dict()`
is the JSON served at `/metrics.json` and printed by `gemel run --json`; `RunSnapshot.from_dict()`
reads it back (the studio's Monitor reads it over HTTP, from runs of this or an older version).
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch

from ..system import gpu_memory, gpu_process_memory

LATENCY_WINDOW = 100_000  # processed frames per stream that the latency percentiles cover


def _known(cls, data: dict) -> dict:
    """The entries of `data` that are fields of `cls` (a missing one takes its default)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class StreamRow:
    """One stream's counters at one moment, as served and printed."""

    name: str
    models: list[str] = field(default_factory=list)
    fps: float = 0.0
    frames_in: int = 0
    processed: int = 0
    dropped: int = 0
    dropped_late: int = 0
    dropped_refused: int = 0
    dropped_error: int = 0
    processed_fraction: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    throughput_fps: float = 0.0
    deadline_ms: float | None = None
    effective_deadline_ms: float | None = None
    processed_within_deadline: int = 0
    compute_s: float = 0.0
    end_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StreamRow":
        return cls(**{"name": "", **_known(cls, data)})


@dataclass
class ModelRow:
    """One model's residency, runs and batching at one moment (`load_note`: why it loads whole
    although layered loading was asked; left out of the JSON when there is none)."""

    name: str
    bytes: int = 0
    swaps: int = 0
    load_seconds: float = 0.0
    loaded_bytes: int = 0
    runs: int = 0
    refused: int = 0
    load_wait_seconds: float = 0.0
    prefetched_bytes: int = 0
    infer_seconds: float = 0.0
    mean_infer_ms: float | None = None
    load: str = "whole"
    batches: int = 0
    mean_batch_size: float | None = None
    max_batch: int | None = None
    profile_ms: dict[str, float] | None = None
    load_note: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["load_note"] is None:
            del out["load_note"]
        return out

    @classmethod
    def from_dict(cls, data: dict, name: str | None = None) -> "ModelRow":
        values = _known(cls, data)
        if "load_wait_seconds" not in values:  # older runs counted every load as waited for
            values["load_wait_seconds"] = values.get("load_seconds", 0.0)
        values.setdefault("name", name or "")
        return cls(**values)


@dataclass
class MemoryReport:
    """Memory figures of a run; the CUDA and NVML ones only where the device has them (None,
    and absent from the JSON, elsewhere)."""

    budget_bytes: int | None = None
    runtime_resident_bytes: int = 0
    runtime_peak_resident_bytes: int = 0
    process_rss_bytes: int | None = None
    torch_allocated_bytes: int | None = None
    torch_reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    device_total_bytes: int | None = None
    # Beside the weights budget, on CUDA (see `cuda_overhead`): what the caching allocator holds
    # beyond live tensors, this process's GPU memory as NVML counts it, and the rest of that
    # beyond what torch reserved (the CUDA context, kernels and libraries' handles: GEMEL's
    # "fixed overhead"). None where NVML cannot say (another process namespace, no driver).
    cuda_allocator_cache_bytes: int | None = None
    gpu_process_used_bytes: int | None = None
    cuda_context_bytes: int | None = None

    OPTIONAL: ClassVar[tuple[str, ...]] = ("torch_allocated_bytes", "torch_reserved_bytes", "device_used_bytes",
                                           "device_total_bytes", "cuda_allocator_cache_bytes",
                                           "gpu_process_used_bytes", "cuda_context_bytes")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in self.OPTIONAL}

    @classmethod
    def from_dict(cls, data: dict):
        return cls(**_known(cls, data))


@dataclass
class SummaryMemory(MemoryReport):
    """The memory report at the end of a run, with what every model would hold under the
    policy (`all_models_bytes`) and space-sharing's resident set."""

    all_models_bytes: int = 0
    static_set: list[str] | None = None

    def to_dict(self) -> dict:
        rest = super().to_dict()
        head = {"budget_bytes": rest.pop("budget_bytes"), "all_models_bytes": rest.pop("all_models_bytes"),
                "static_set": self.static_set}
        rest.pop("static_set")
        return {**head, **rest}


@dataclass(kw_only=True)
class Scheduling:
    """The CPU threads, the order in use and the prefetch counters, as a snapshot and a summary
    both report them (keyword-only, so that they follow the fields each of those gives
    positionally)."""

    threads: int | None = None  # CPU threads one inference could use (None: not yet known, or not served)
    order: str | None = None  # merge-aware | fair (None: not served by the runtime that made it)
    reordered_batches: int = 0  # batches the merge-aware order ran before the fair choice
    prefetch: bool = False  # whether prefetch ran (a summary or snapshot built without saying claims not)
    prefetches: int = 0  # loads started while the model before ran
    prefetch_misses: int = 0  # of them, for a model that did not run next

    def scheduling_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(Scheduling)}

    @staticmethod
    def scheduling_from(data: dict) -> dict:
        """The keyword arguments for these fields from a served JSON object (an older runtime's
        lacks them: no order, no prefetch)."""
        return {"threads": None if data.get("threads") is None else int(data["threads"]),
                "order": None if data.get("order") is None else str(data["order"]),
                "reordered_batches": int(data.get("reordered_batches", 0)),
                "prefetch": bool(data.get("prefetch", False)), "prefetches": int(data.get("prefetches", 0)),
                "prefetch_misses": int(data.get("prefetch_misses", 0))}


@dataclass
class RunSnapshot(Scheduling):
    """A run's counters at one moment (`Engine.snapshot()`). `extra`: entries of a served
    snapshot this version does not know (kept, so a round trip loses nothing). Older code
    builds a snapshot positionally, up to `extra`; the scheduling figures are keywords."""

    bundle: str
    policy: str
    backend: str
    device: str
    eviction: str
    state: str  # not started | running | stopped: <why>
    last_error: str | None
    elapsed_s: float
    streams: list[StreamRow]
    models: dict[str, ModelRow]
    memory: MemoryReport
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "policy": self.policy, "backend": self.backend, "device": self.device,
                "eviction": self.eviction, "state": self.state, "last_error": self.last_error,
                "elapsed_s": self.elapsed_s, "streams": [s.to_dict() for s in self.streams],
                "models": {n: m.to_dict() for n, m in self.models.items()}, "memory": self.memory.to_dict(),
                **self.scheduling_dict(), **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> "RunSnapshot":
        """A snapshot from its JSON; what an older runtime did not serve takes its default."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(bundle=str(data.get("bundle", "?")), policy=str(data.get("policy", "?")),
                   backend=str(data.get("backend", "?")), device=str(data.get("device", "?")),
                   eviction=str(data.get("eviction", "belady")), state=str(data.get("state", "")),
                   last_error=data.get("last_error"), elapsed_s=float(data.get("elapsed_s", 0.0)),
                   streams=[StreamRow.from_dict(s) for s in data.get("streams", [])],
                   models={n: ModelRow.from_dict(m, n) for n, m in data.get("models", {}).items()},
                   memory=MemoryReport.from_dict(data.get("memory", {})),
                   extra={k: v for k, v in data.items() if k not in known}, **cls.scheduling_from(data))

    @property
    def running(self) -> bool:
        return self.state == "running"

    def dropped_totals(self) -> tuple[int, int, int, int]:
        """(frames in, dropped, of which late, of which refused) over every stream."""
        s = self.streams
        return (sum(r.frames_in for r in s), sum(r.dropped for r in s), sum(r.dropped_late for r in s),
                sum(r.dropped_refused for r in s))


@dataclass
class RunSummary(Scheduling):
    """What a run did, once it has stopped (`Engine.run()`). A summary built without saying
    which order ran claims the default one, merge-aware."""

    bundle: str
    backend: str
    device: str
    policy: str
    budget_bytes: int | None
    elapsed_s: float
    stopped: str  # duration | sources ended | cancelled | interrupted | error: ...
    last_error: str | None  # the last error a model raised on a frame (those frames are dropped)
    streams: list[StreamRow]
    models: dict[str, ModelRow]
    memory: SummaryMemory
    eviction: str = "belady"
    batching: bool = True
    order: str | None = field(default="merge-aware", kw_only=True)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "backend": self.backend, "device": self.device, "policy": self.policy,
                "budget_bytes": self.budget_bytes, "elapsed_s": self.elapsed_s, "stopped": self.stopped,
                "last_error": self.last_error, "streams": [s.to_dict() for s in self.streams],
                "models": {n: m.to_dict() for n, m in self.models.items()}, "memory": self.memory.to_dict(),
                "eviction": self.eviction, "batching": self.batching, **self.scheduling_dict()}


class LatencyWindow:
    """The last `size` latencies of a stream, in one array allocated and written at the start:
    its memory is the same after a minute and after a week (a deque of floats grew by 32 bytes a
    frame until it was full, about an hour at 30 fps). Written, not only allocated: the kernel
    gives an array's pages memory when they are first written, so an `np.empty` window still
    grew the process's resident memory by 8 bytes a frame until it was full (0.8 MB a stream,
    hours at 10 fps: a soak's slowly rising resident memory)."""

    def __init__(self, size: int):
        self._buf = np.full(size, np.nan, dtype=np.float64)
        self._count = 0  # appended in all; the newest is at (count - 1) % size

    def append(self, seconds: float) -> None:
        self._buf[self._count % self._buf.size] = seconds
        self._count += 1

    def values(self) -> np.ndarray:
        """A copy of the latencies held (order not kept: percentiles do not need it)."""
        return self._buf[:min(self._count, self._buf.size)].copy()

    def __len__(self) -> int:
        return min(self._count, self._buf.size)

    def __iter__(self):
        return iter(self.values().tolist())


@dataclass
class StreamStats:
    """What one stream did, counted live: frames in, processed before their deadline, dropped
    (and why). `row()` is the reported form."""

    name: str
    models: list[str]
    fps: float
    frames_in: int = 0
    processed: int = 0
    dropped_late: int = 0
    dropped_refused: int = 0
    dropped_error: int = 0  # a model failed on the frame (the run goes on; see the run's last_error)
    deadline_s: float | None = None  # what each frame has from its arrival (None: the frame interval)
    compute_s: float = 0.0  # compute spent on its frames (a batch's time shared among its frames)
    effective_deadline_s: float | None = None  # the deadline its last frame got (see Engine.stream_deadline)
    within_deadline: int = 0  # processed frames that also met the stream's own deadline (not stretched)
    end_reason: str | None = None  # why its source ended; None while it still delivers
    # Seconds, of the last LATENCY_WINDOW processed frames (a bound on memory for runs of days).
    latencies: "LatencyWindow" = field(default_factory=lambda: LatencyWindow(LATENCY_WINDOW), repr=False)

    @property
    def dropped(self) -> int:
        return self.dropped_late + self.dropped_refused + self.dropped_error

    def row(self, elapsed_s: float) -> StreamRow:
        lat = self.latencies.values() * 1000.0
        return StreamRow(
            name=self.name, models=list(self.models), fps=self.fps, frames_in=self.frames_in,
            processed=self.processed, dropped=self.dropped, dropped_late=self.dropped_late,
            dropped_refused=self.dropped_refused, dropped_error=self.dropped_error,
            processed_fraction=self.processed / self.frames_in if self.frames_in else None,
            latency_p50_ms=float(np.percentile(lat, 50)) if lat.size else None,
            latency_p99_ms=float(np.percentile(lat, 99)) if lat.size else None,
            throughput_fps=self.processed / elapsed_s if elapsed_s > 0 else 0.0,
            deadline_ms=1000.0 * (self.deadline_s if self.deadline_s is not None else 1.0 / self.fps),
            effective_deadline_ms=None if self.effective_deadline_s is None else 1000.0 * self.effective_deadline_s,
            processed_within_deadline=self.within_deadline, compute_s=self.compute_s, end_reason=self.end_reason)

    def to_dict(self, elapsed_s: float) -> dict:
        return self.row(elapsed_s).to_dict()


# --- memory probes -------------------------------------------------------------------------------


def memory_figures(device: torch.device) -> dict:
    """The process's resident memory and, on CUDA only, torch's allocated/reserved bytes, the
    device's used/total memory (pynvml, through gemel_studio.system) and what the CUDA context
    and the caching allocator hold beside the weights (`cuda_overhead`)."""
    out: dict = {"process_rss_bytes": process_rss()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        allocated = int(torch.cuda.memory_allocated(device))
        reserved = int(torch.cuda.memory_reserved(device))
        out["torch_allocated_bytes"] = allocated
        out["torch_reserved_bytes"] = reserved
        out.update(gpu_memory(index))
        out.update(cuda_overhead(allocated, reserved, gpu_process_memory(index)))
    return out


def cuda_overhead(allocated: int, reserved: int, process_used: int | None) -> dict:
    """What a CUDA process holds beside its live tensors, from torch's allocated and reserved
    bytes and NVML's count of the process's GPU memory (None where NVML cannot see it): the
    caching allocator's cache (reserved - allocated) and the CUDA context (process - reserved,
    never below 0: the context, loaded kernels, cuBLAS/cuDNN workspaces)."""
    out = {"cuda_allocator_cache_bytes": max(0, reserved - allocated)}
    if process_used is not None:
        out["gpu_process_used_bytes"] = int(process_used)
        out["cuda_context_bytes"] = max(0, int(process_used) - reserved)
    return out


def memory_snapshot(device: torch.device, resident_bytes: int, peak_resident_bytes: int,
                    budget_bytes: int | None = None) -> MemoryReport:
    """The runtime's own resident weights and the probes of `memory_figures`."""
    return MemoryReport(budget_bytes=budget_bytes, runtime_resident_bytes=resident_bytes,
                        runtime_peak_resident_bytes=peak_resident_bytes, **memory_figures(device))


@functools.lru_cache(maxsize=1)
def _this_process():
    import psutil  # the Process object is made once: each one costs about 2 ms a snapshot

    return psutil.Process()


def process_rss() -> int | None:
    try:
        return int(_this_process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def device_capacity(device: str | torch.device) -> tuple[int, str]:
    """The default memory budget: what `device` can hold now, and what that is in words (free
    GPU memory on CUDA, the system's available memory on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free GPU memory on {device}"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available memory"
    except ImportError:  # psutil is a dependency; a stripped install still gets a figure
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages), "available memory"


# --- what a model said ---------------------------------------------------------------------------


def describe_output(spec, output, max_boxes: int = 10, min_score: float = 0.3) -> dict:
    """What a model's output says, in plain data: for a classifier the top label and its
    probability; for a detector its boxes (x1, y1, x2, y2 as fractions of the input's width and
    height), labels and scores, best first."""
    labels = spec.labels

    def name(i: int) -> str:
        return labels[i] if 0 <= i < len(labels) else str(i)

    if spec.task == "detection":
        det = output[0] if isinstance(output, (list, tuple)) else output
        h, w = spec.input_size[1:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        keep = det["scores"].float().cpu() >= min_score
        boxes = (det["boxes"].float().cpu()[keep] / scale).clamp(0, 1)[:max_boxes]
        scores = det["scores"].float().cpu()[keep][:max_boxes]
        classes = det["labels"].cpu()[keep][:max_boxes]
        return {"task": "detection", "boxes": boxes.tolist(), "scores": scores.tolist(),
                "labels": [name(int(c)) for c in classes]}
    logits = torch.as_tensor(output).float().reshape(-1)
    probs = torch.softmax(logits, 0)
    top = int(probs.argmax())
    return {"task": "classification", "label": name(top), "score": float(probs[top])}


def result_record(spec, output, top_k: int = 5) -> dict:
    """What a model said about one frame, for a results sink: a classifier's `top_k` labels
    and scores (softmax probabilities, best first); a detector's boxes (fractions of the
    input, x1 y1 x2 y2), labels and scores, every box scored at least 0.3 (up to 100)."""
    if spec.task == "detection":
        return describe_output(spec, output, max_boxes=100)
    logits = torch.as_tensor(output).float().reshape(-1)
    probs = torch.softmax(logits, 0)
    scores, idx = probs.topk(min(top_k, probs.numel()))
    labels = spec.labels
    return {"task": "classification",
            "labels": [labels[i] if 0 <= i < len(labels) else str(i) for i in idx.tolist()],
            "scores": [round(float(v), 6) for v in scores]}


__all__ = ["LATENCY_WINDOW", "LatencyWindow", "MemoryReport", "ModelRow", "RunSnapshot", "RunSummary", "Scheduling",
           "StreamRow", "StreamStats",
           "SummaryMemory", "cuda_overhead", "describe_output", "device_capacity", "gpu_process_memory",
           "memory_figures", "memory_snapshot", "process_rss", "result_record"]
