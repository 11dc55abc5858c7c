"""The inference engine: live streams through the bundle's models under a memory budget.

Each stream's source delivers frames in real time on its own thread; one worker (the caller's
thread) schedules them. A frame must have been run through all of its stream's models before
its deadline (`deadline_s`, by default the stream's frame interval); otherwise it is dropped
and counted: frames that could no longer meet their deadline ("late") and frames for a model
the policy will not hold ("refused", space-sharing). Every frame that arrived is counted once
as processed or dropped, so `frames_in == processed + dropped`.

Scheduling (`BatchPlanner`, as GEMEL's evaluation and Nexus do it):
- Frames waiting for the same model run as one batch, up to a per-model maximum chosen from
  a short profile made when `run()` starts (latency per batch size on this device and
  backend), and only as large as still lets every frame in it meet its deadline.
- No compute is spent on a frame that can no longer meet its deadline: before a batch starts,
  each frame's finish is estimated from the measured latency of its remaining models (and the
  load of the next one when it is not resident); a frame that cannot make it is dropped then.
- Compute is shared max-min fairly: the next batch serves the stream that has had the least
  compute so far, unless a frame due sooner would be lost by waiting and fits in before it
  without making it late.
- A stream whose models are slower than its deadline is served at the rate it can be: a
  frame's deadline is at least twice the estimated latency of its stream's models (a stream
  needing 32 ms of a 33 ms interval could otherwise only be served when the worker happens to
  be idle), and when that stretches it, a newer frame replaces the stream's older frames that
  have not started (latest frame first).

`run()` returns a `RunSummary` (plain data, `to_dict()` is JSON-able) whether it stops because
the duration passed, every source ended, `progress.cancel()` was called or Ctrl-C was pressed.
"""

from __future__ import annotations

import os
import queue
from collections import deque
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call
from torch.nn.utils._named_member_accessor import set_tensor

from ..devices import resolve_device
from ..errors import GemelError
from ..preprocessing import ImagePreprocessing
from ..system import gpu_memory
from .scheduler import ModelScheduler
from .sources import FrameSource


MAX_CONSECUTIVE_ERRORS = 50  # batches in a row whose models fail before the run stops with the error
MAX_BATCH = 16  # the profile tries batch sizes 1, 2, 4, ... up to this
PROFILE_STOP_S = 0.25  # the profile tries no larger batch once one takes this long
OVERRATE_SLACK = 2.0  # a frame's deadline is at least this times its stream's models' latency
LATENCY_WINDOW = 100_000  # processed frames per stream that the latency percentiles cover


@dataclass
class StreamStats:
    """What one stream did: frames in, processed before their deadline, dropped (and why)."""

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
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)

    @property
    def dropped(self) -> int:
        return self.dropped_late + self.dropped_refused + self.dropped_error

    def to_dict(self, elapsed_s: float) -> dict:
        lat = np.asarray(list(self.latencies)) * 1000.0  # list(): one atomic copy under the GIL
        return {"name": self.name, "models": self.models, "fps": self.fps, "frames_in": self.frames_in,
                "processed": self.processed, "dropped": self.dropped, "dropped_late": self.dropped_late,
                "dropped_refused": self.dropped_refused, "dropped_error": self.dropped_error,
                "processed_fraction": self.processed / self.frames_in if self.frames_in else None,
                "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
                "throughput_fps": self.processed / elapsed_s if elapsed_s > 0 else 0.0,
                "deadline_ms": 1000.0 * (self.deadline_s if self.deadline_s is not None else 1.0 / self.fps),
                "effective_deadline_ms": None if self.effective_deadline_s is None
                else 1000.0 * self.effective_deadline_s,
                "processed_within_deadline": self.within_deadline,
                "compute_s": self.compute_s, "end_reason": self.end_reason}


@dataclass
class RunSummary:
    bundle: str
    backend: str
    device: str
    policy: str
    budget_bytes: int | None
    elapsed_s: float
    stopped: str  # duration | sources ended | cancelled | interrupted | error: ...
    last_error: str | None  # the last error a model raised on a frame (those frames are dropped)
    streams: list[dict]
    models: dict[str, dict]
    memory: dict
    eviction: str = "belady"
    batching: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(eq=False)
class Job:
    """One frame on its way through its stream's models (`models[step]` is the next one)."""

    stream: int
    index: int  # the frame's number in its stream, from 0
    ts: float  # arrival (time.monotonic())
    deadline: float
    frame: torch.Tensor
    models: list[str]
    step: int = 0
    outputs: dict = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.models[self.step]


class LatencyEstimates:
    """Measured seconds per model and batch size (a moving average of the runs, seeded by the
    profile), and the load rate in bytes per second. Unknown figures estimate as 0 (nothing
    is dropped on a guess)."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.seconds: dict[str, dict[int, float]] = {}
        self.load_rate: float | None = None  # bytes per second

    def observe(self, model: str, batch: int, seconds: float, replace: bool = False) -> None:
        row = self.seconds.setdefault(model, {})
        old = row.get(batch)
        row[batch] = seconds if old is None or replace else (1 - self.alpha) * old + self.alpha * seconds

    def observe_load(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            rate = nbytes / seconds
            self.load_rate = rate if self.load_rate is None else (1 - self.alpha) * self.load_rate + self.alpha * rate

    def run(self, model: str, batch: int = 1) -> float:
        row = self.seconds.get(model)
        if not row:
            return 0.0
        if batch in row:
            return row[batch]
        below = [b for b in row if b < batch]
        above = [b for b in row if b > batch]
        if below and above:  # linear between the neighbours
            lo, hi = max(below), min(above)
            return row[lo] + (row[hi] - row[lo]) * (batch - lo) / (hi - lo)
        if below:  # past the largest measured: proportional to the batch
            lo = max(below)
            return row[lo] * batch / lo
        return row[min(above)]

    def load(self, nbytes: int) -> float:
        return nbytes / self.load_rate if self.load_rate and nbytes > 0 else 0.0


class BatchPlanner:
    """Picks the next batch to run from the waiting frames (no clock of its own: `now` is
    given, so tests drive it with a fake one). See the module's docstring for the rules."""

    def __init__(self, estimates: LatencyEstimates, max_batch: dict[str, int] | None = None):
        self.estimates = estimates
        self.max_batch = max_batch if max_batch is not None else {}

    def rest(self, job: Job) -> float:
        """Estimated seconds of the job's models after the next one, each alone."""
        return sum(self.estimates.run(m, 1) for m in job.models[job.step + 1:])

    def plan(self, now: float, waiting: list[Job], usage: list[float],
             load_s: Callable[[str], float] = lambda m: 0.0) -> tuple[list[Job], list[Job]]:
        """(the batch to run now, all for one model; the frames to drop, which can no longer
        meet their deadline). `usage[i]`: the compute stream i has had."""
        est = self.estimates
        loads: dict[str, float] = {}

        def load(m: str) -> float:
            if m not in loads:
                loads[m] = load_s(m)
            return loads[m]

        feasible, drop = [], []
        for j in waiting:
            m = j.model
            if now + load(m) + est.run(m, 1) + self.rest(j) <= j.deadline:
                feasible.append(j)
            else:
                drop.append(j)
        if not feasible:
            return [], drop
        # Max-min fairness: the stream that has had the least compute goes first ...
        lead = min(feasible, key=lambda j: (usage[j.stream], j.deadline, j.ts))
        # ... unless a frame due sooner would be lost by waiting for it and fits in before it
        # without making it late (work the lead's slack can pay for).
        soonest = min(feasible, key=lambda j: (j.deadline, usage[j.stream], j.ts))
        if soonest.deadline < lead.deadline and soonest.model != lead.model:
            first = load(soonest.model) + est.run(soonest.model, 1)
            second = load(lead.model) + est.run(lead.model, 1)
            lost = now + second + first + self.rest(soonest) > soonest.deadline
            # Twice the inserted work must fit: estimates are averages, and a lead pushed out by
            # one bad guess after another would starve.
            if lost and now + 2 * first + second + self.rest(lead) <= lead.deadline:
                lead = soonest
        m = lead.model
        limit = max(1, self.max_batch.get(m, 1))
        batch = [lead]
        slack = lead.deadline - self.rest(lead)
        others = sorted((j for j in feasible if j is not lead and j.model == m),
                        key=lambda j: (usage[j.stream], j.deadline, j.ts))
        for j in others:
            if len(batch) >= limit:
                break
            s = min(slack, j.deadline - self.rest(j))
            if now + load(m) + est.run(m, len(batch) + 1) <= s:  # every frame in it still in time
                batch.append(j)
                slack = s
        return batch, drop


def memory_snapshot(device: torch.device, resident_bytes: int, peak_resident_bytes: int) -> dict:
    """The runtime's own resident weights, the process's resident memory and, on CUDA only,
    torch's allocated/reserved bytes and the device's used/total memory (pynvml). Each is a
    different figure and is named as such."""
    out = {"runtime_resident_bytes": resident_bytes, "runtime_peak_resident_bytes": peak_resident_bytes,
           "process_rss_bytes": process_rss()}
    if device.type == "cuda":
        out["torch_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        out["torch_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
        out.update(gpu_memory(device.index or 0))
    return out


def process_rss() -> int | None:
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


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


def _prepare_input(frame: torch.Tensor, prep: ImagePreprocessing, device: torch.device) -> torch.Tensor:
    """A CHW [0, 1] frame as a 1xCxHxW batch, through the model's own preprocessing (the
    bundle manifest's: resize and centre crop or a straight resize, then mean and std)."""
    return prep.apply(frame.to(device, non_blocking=True)).unsqueeze(0)


BACKENDS = ("torch", "onnxruntime")


class OrtRunner:
    """The onnxruntime backend: one session per model over the scheduler's resident tensors
    (no copy of its own), made when the model runs and dropped as soon as any of its tensors
    is evicted, so the memory budget holds for onnxruntime too. Making a session
    is part of loading the model and is counted in its load time. CPU only: the onnxruntime
    wheel this project installs has no CUDA provider. A detector's graph (batch of one) gives
    its outputs as torchvision does: a list with one dict of boxes, scores and labels."""

    def __init__(self, bundle, scheduler: ModelScheduler, names: list[str]):
        if scheduler.device.type != "cpu":
            raise GemelError(f"the onnxruntime backend runs on the CPU only (asked for {scheduler.device}); "
                             "use --device cpu, or --backend torch on a GPU")
        missing = [n for n in names if bundle.manifest.model(n).onnx is None]
        if missing:
            raise GemelError(f"model(s) {', '.join(missing)} have no ONNX graph in the bundle (the export notes "
                             "say why; bundles from before detectors had graphs lack them: export again); "
                             "use --backend torch")
        self.bundle = bundle
        self.scheduler = scheduler
        self.sessions: dict[str, object] = {}
        self.sessions_made = {n: 0 for n in names}
        self._io: dict[str, tuple[str, list[str], bool]] = {}
        for n in names:
            spec = bundle.manifest.model(n)
            detector = spec.task == "detection"
            if detector and not spec.onnx_outputs:
                raise GemelError(f"model '{n}': the manifest names no detection outputs (onnx_outputs) for its "
                                 "graph; export the bundle again, or use --backend torch")
            self._io[n] = (spec.onnx_input, list(spec.onnx_outputs) if detector else [spec.onnx_output], detector)
        scheduler.on_evict.append(lambda name: self.sessions.pop(name, None))

    def prepare(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Make the model's session over `state` unless it still has one."""
        if name not in self.sessions:
            start = time.perf_counter()
            self.sessions[name] = self.bundle.session_over(name, state)
            spent = time.perf_counter() - start
            self.scheduler.stats[name].load_seconds += spent
            self.scheduler.stats[name].load_wait_seconds += spent  # nothing runs meanwhile
            self.sessions_made[name] += 1

    def run(self, name: str, x: torch.Tensor) -> np.ndarray | list[dict[str, torch.Tensor]]:
        inp, outs, detector = self._io[name]
        values = self.sessions[name].run(outs, {inp: x.contiguous().numpy()})
        if detector:
            return [{k: torch.from_numpy(v) for k, v in zip(outs, values)}]
        return values[0]


LOADS = ("whole", "layered")


class LayerPlan:
    """How one model runs while its weights load layer by layer: which tensors each module
    must have before its forward starts, and the order to load them in (the order the modules
    first run). Found by running the model once on the meta device (no memory, no data); a
    model that cannot run there (data-dependent detectors) gets no plan and loads whole.

    A module waits for its own tensors and for those of descendants whose forward never runs
    (MultiheadAttention reads `out_proj.weight` directly); tensors no running module claims
    are waited for by the whole model, first."""

    def __init__(self, model: torch.nn.Module, input_size: tuple[int, int, int], state_keys: list[str]):
        modules = dict(model.named_modules())
        called: list[str] = []
        seen: set[str] = set()
        names = {id(m): n for n, m in modules.items()}

        def record(mod, args):
            n = names[id(mod)]
            if n not in seen:
                seen.add(n)
                called.append(n)

        hooks = [m.register_forward_pre_hook(record) for m in modules.values()]
        try:
            meta = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict().items()}
            with torch.inference_mode():
                functional_call(model, meta, (torch.empty(1, *input_size, device="meta"),), strict=False)
        finally:
            for h in hooks:
                h.remove()
        self.waits: dict[str, list[tuple[str, str]]] = {n: [] for n in called}  # module -> (attr, state key)
        known = set(state_keys)
        for n, mod in modules.items():
            owner = n
            while owner not in seen and owner:  # the nearest ancestor that runs
                owner = owner.rpartition(".")[0]
            if owner not in seen:
                owner = ""
            for attr in list(mod._parameters) + list(mod._buffers):
                key = f"{n}.{attr}" if n else attr
                if key in known:  # (path from the owner, state key)
                    self.waits.setdefault(owner, []).append((key[len(owner) + 1:] if owner else key, key))
        self.order = [key for n in called for _, key in self.waits.get(n, [])]
        planned = set(self.order)
        self.order += [k for k in state_keys if k not in planned]


class Engine:
    """One run: streams, the scheduler and the counters. `snapshot()` may be read from another
    thread while `run()` works (a metrics endpoint, a preview)."""

    def __init__(self, bundle, streams: list[tuple[FrameSource, list[str]]], policy: str = "merged",
                 budget_bytes: int | None = None, device: str = "cpu", backend: str = "torch", load: str = "whole",
                 deadline_s: float | None = None, eviction: str = "belady", batching: bool = True,
                 sinks: list | None = None):
        if backend not in BACKENDS:
            raise GemelError(f"backend '{backend}': expected one of {', '.join(BACKENDS)}")
        if load not in LOADS:
            raise GemelError(f"load '{load}': expected one of {', '.join(LOADS)}")
        if load == "layered" and backend != "torch":
            raise GemelError("layer-by-layer loading needs the torch backend (an onnxruntime session takes all "
                             "its weights at once); use --backend torch or --load whole")
        if not streams:
            raise GemelError("no streams: add at least one --stream SOURCE[=MODEL,...]")
        if deadline_s is not None and not deadline_s > 0:
            raise GemelError(f"deadline {deadline_s!r} s: must be a positive number (--deadline MS)")
        self.bundle = bundle
        self.backend = backend
        # onnxruntime runs on the CPU here: "auto" means the CPU for it, even on a GPU box.
        self.device = resolve_device("cpu" if backend == "onnxruntime" and device == "auto" else device)
        all_models = [m.name for m in bundle.manifest.models]
        self.streams = [(src, list(models) or list(all_models)) for src, models in streams]
        used = list(dict.fromkeys(m for _, models in self.streams for m in models))
        demand = [(src.fps, models) for src, models in self.streams]
        self.scheduler = ModelScheduler.for_bundle(bundle, used, policy, budget_bytes, self.device, eviction, demand)
        self.inputs = {m: tuple(bundle.manifest.model(m).input_size) for m in used}
        self.preprocessing = {m: bundle.manifest.model(m).preprocessing.image_preprocessing() for m in used}
        self._ort = OrtRunner(bundle, self.scheduler, used) if backend == "onnxruntime" else None
        self.load = load
        self.layer_plans: dict[str, LayerPlan] = {}
        self.load_notes: dict[str, str] = {}  # model -> why it loads whole although layered was asked
        if load == "layered":
            for m in used:
                try:
                    self.layer_plans[m] = LayerPlan(bundle.models[m], self.inputs[m],
                                                    list(bundle.manifest.model(m).tensors))
                except Exception as exc:  # noqa: BLE001 (any failure on meta: load this model whole)
                    self.load_notes[m] = f"loads whole: cannot trace its layers on the meta device ({exc})"
        names = [src.name for src, _ in self.streams]
        self.stats = [StreamStats(n if names.count(n) == 1 else f"{n}#{i}", models, src.fps, deadline_s=deadline_s)
                      for i, (n, (src, models)) in enumerate(zip(names, self.streams))]
        self.deadline_s = deadline_s
        self.batching = batching
        self.sinks = list(sinks or [])
        self.estimates = LatencyEstimates()
        self.max_batch: dict[str, int] = {m: 1 for m in used}
        self.planner = BatchPlanner(self.estimates, self.max_batch)
        self.batches = {m: 0 for m in used}  # batches run per model
        self.batched_frames = {m: 0 for m in used}  # frames those batches held
        self.profile: dict[str, dict[str, float]] = {}  # model -> batch size -> ms (the start's profile)
        self.clock = time.monotonic
        self._waiting: list[Job] = []
        self._profiling = False
        self.profiled = False
        self._running = False
        self.infer_seconds = {m: 0.0 for m in used}
        self.specs = {m: bundle.manifest.model(m) for m in used}
        # Per stream, the last frame processed in time and what each model made of it (previews).
        self.latest: list[dict | None] = [None] * len(self.streams)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._start = None
        self.elapsed_s = 0.0
        self.stopped = ""
        self.last_error: str | None = None

    # --- producers: one thread per source ------------------------------------------------------

    def _produce(self, i: int, source: FrameSource) -> None:
        stats = self.stats[i]
        try:
            for ts, frame in source.frames():
                with self._lock:
                    index = stats.frames_in
                    stats.frames_in += 1
                self._queue.put((i, index, ts, frame))
        except Exception as exc:  # a source must never take the run down
            source.end_reason = source.end_reason or f"error: {exc}"
        finally:
            stats.end_reason = source.end_reason or "ended"

    # --- scheduling --------------------------------------------------------------------------

    def stream_deadline(self, i: int) -> float:
        """Seconds a frame of stream i has from its arrival: `--deadline`, else the frame
        interval, but at least twice the estimated latency of its models, loads of those not
        resident included: a stream whose models take more than half of its deadline could only
        be served when the worker happens to be idle as its frame arrives, and a model whose load
        alone takes longer than the deadline would never be loaded; such a stream is served at
        the rate it can be instead."""
        s = self.stats[i]
        d = s.deadline_s if s.deadline_s is not None else 1.0 / s.fps
        service = sum(self.estimates.run(m, 1) + self._load_estimate(m) for m in s.models)
        return max(d, OVERRATE_SLACK * service)

    def _admit(self, item) -> None:
        """A frame that arrived: refused at once, or waiting for its first model."""
        i, index, ts, frame = item
        stats = self.stats[i]
        models = stats.models
        if any(self.scheduler.refuses(m) for m in models):
            for m in models:
                if self.scheduler.refuses(m):
                    self.scheduler.stats[m].refused += 1
            stats.dropped_refused += 1
            return
        d = self.stream_deadline(i)
        stats.effective_deadline_s = d
        base = stats.deadline_s if stats.deadline_s is not None else 1.0 / stats.fps
        if d > base:  # an over-rate stream: the latest frame replaces those not started
            stale = [j for j in self._waiting if j.stream == i and j.step == 0]
            for j in stale:
                self._waiting.remove(j)
                stats.dropped_late += 1
        self._waiting.append(Job(i, index, ts, ts + d, frame, list(models)))

    def _load_estimate(self, m: str) -> float:
        missing = self.scheduler.missing_bytes(m)
        return self.estimates.load(missing) if missing else 0.0

    def _future(self, batch: list[Job]) -> list[str]:
        """The models expected to run next, soonest first: what this batch's frames need after
        it, then every waiting frame's models in deadline order (Belady eviction reads it)."""
        out: list[str] = []
        for j in batch:
            out.extend(j.models[j.step + 1:])
        for j in sorted(self._waiting, key=lambda j: j.deadline):
            out.extend(j.models[j.step:])
        return out

    def step(self) -> bool:
        """Plan and run one batch from the waiting frames (dropping those that can no longer
        make their deadline); False when there was nothing to run."""
        if not self._waiting:
            return False
        usage = [s.compute_s for s in self.stats]
        batch, drop = self.planner.plan(self.clock(), self._waiting, usage, self._load_estimate)
        for j in drop:
            self._waiting.remove(j)
            self.stats[j.stream].dropped_late += 1
        if not batch:
            return False
        for j in batch:
            self._waiting.remove(j)
        self._run_batch(batch)
        return True

    def _run_batch(self, batch: list[Job]) -> None:
        m = batch[0].model
        assert all(j.model == m for j in batch)
        sched = self.scheduler.stats[m]
        before_bytes, before_load = sched.loaded_bytes, sched.load_seconds
        started = self.clock()
        try:
            x = torch.cat([_prepare_input(j.frame, self.preprocessing[m], self.device) for j in batch])
            out = self._run_model(m, x, self._future(batch))
        except Exception:
            for j in batch:
                self.stats[j.stream].dropped_error += 1
            raise
        finally:
            spent = self.clock() - started
            for j in batch:
                self.stats[j.stream].compute_s += spent / len(batch)
            loaded = sched.loaded_bytes - before_bytes
            if loaded:
                self.estimates.observe_load(loaded, sched.load_seconds - before_load)
        self.batches[m] += 1
        self.batched_frames[m] += len(batch)
        sched.runs += len(batch) - 1  # the scheduler counted the batch once: runs count frames
        for k, j in enumerate(batch):
            j.outputs[m] = out[k]
            j.step += 1
            if j.step < len(j.models):
                self._waiting.append(j)
            else:
                self._finish(j)

    def _finish(self, j: Job) -> None:
        stats = self.stats[j.stream]
        done = self.clock()
        if done > j.deadline:  # the estimate was wrong: the compute was spent, the frame is late
            stats.dropped_late += 1
            return
        stats.processed += 1
        stats.latencies.append(done - j.ts)
        nominal = stats.deadline_s if stats.deadline_s is not None else 1.0 / stats.fps
        if done - j.ts <= nominal:
            stats.within_deadline += 1
        outputs = {m: describe_output(self.specs[m], o) for m, o in j.outputs.items()}
        self.latest[j.stream] = {"timestamp": j.ts, "frame": j.frame, "outputs": outputs}
        if self.sinks:
            record = {"stream": stats.name, "frame": j.index, "timestamp": j.ts,
                      "latency_ms": 1000.0 * (done - j.ts),
                      "models": {m: result_record(self.specs[m], o) for m, o in j.outputs.items()}}
            for sink in self.sinks:
                sink.write(record)

    # --- the worker --------------------------------------------------------------------------

    def process_frame(self, frame: torch.Tensor, stream: int = 0, deadline_s: float = 60.0) -> None:
        """Run one frame through stream `stream`'s models now, outside the real-time loop (tests,
        benchmarks, one-off checks): it counts as arrived, then as processed or dropped, with
        `deadline_s` seconds to finish."""
        now = self.clock()
        stats = self.stats[stream]
        index = stats.frames_in
        stats.frames_in += 1
        if any(self.scheduler.refuses(m) for m in stats.models):
            self._admit((stream, index, now, frame))
            return
        job = Job(stream, index, now, now + deadline_s, frame, list(stats.models))
        while job.step < len(job.models):
            self._run_batch([job])
            if job.step < len(job.models):
                self._waiting.remove(job)

    def _run_model(self, m: str, x: torch.Tensor, future: list[str] | None = None):
        """Model `m` on the batch `x` (already preprocessed, on the device)."""
        plan = self.layer_plans.get(m)
        pending = None
        if plan is not None:
            state, pending = self.scheduler.acquire_deferred(m, plan.order, future)
        else:
            state = self.scheduler.acquire(m, future)
        try:
            if self._ort is not None:
                self._ort.prepare(m, state)
            start = time.perf_counter()
            if self._ort is not None:
                out = self._ort.run(m, x)
            elif pending is not None:
                try:
                    out = self._run_layered(m, state, pending, x)
                except Exception as exc:  # noqa: BLE001 (the layer plan missed something: run it whole)
                    self.scheduler.finish(pending)  # every tensor resident now
                    pending = None
                    del self.layer_plans[m]
                    self.load_notes[m] = f"loads whole: layer-by-layer run failed ({exc})"
                    with torch.inference_mode():
                        out = functional_call(self.bundle.models[m], self.scheduler.resident_state(m), (x,),
                                              strict=False)
                start += 0.0 if pending is None else pending.wait_seconds  # waiting for weights is loading
            else:
                with torch.inference_mode():
                    out = functional_call(self.bundle.models[m], state, (x,), strict=False)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            spent = time.perf_counter() - start
            if not self._profiling:
                self.infer_seconds[m] += spent
                self.estimates.observe(m, int(x.shape[0]), spent)
            return out
        finally:
            if pending is not None and not pending.finished:
                self.scheduler.finish(pending)

    def _run_layered(self, m: str, state: dict, pending, x: torch.Tensor):
        """Run model `m` while its missing tensors load: each module's pre-hook waits for its
        own tensors, which stand as placeholders on the meta device until then. Some kernels
        (convolution, linear) compute garbage from a meta weight instead of failing, so after
        the forward every placeholder must have been replaced; otherwise it raises and the
        caller runs the model whole."""
        model, plan = self.bundle.models[m], self.layer_plans[m]
        sched, stored = self.scheduler, self.specs[m].tensors
        placeholders: dict[str, torch.Tensor] = {}  # one per stored tensor: tied weights stay tied
        full = {}
        for k, t in state.items():
            if t is None:
                if stored[k] not in placeholders:
                    placeholders[stored[k]] = torch.empty_like(self.bundle.tensors[stored[k]], device="meta")
                t = placeholders[stored[k]]
            full[k] = t
        missing = {k for k, t in state.items() if t is None}
        replaced: set[str] = set()
        modules = dict(model.named_modules())
        hooks = []

        def waiter(entries):
            def pre(mod, args):
                for attr, key in entries:
                    if key in missing:
                        target, _, name = attr.rpartition(".")
                        set_tensor(mod.get_submodule(target) if target else mod, name,
                                   pending.get(sched.unit_of(m, key)))
                        replaced.add(key)
            return pre

        for n, entries in plan.waits.items():
            if any(key in missing for _, key in entries):
                hooks.append(modules[n].register_forward_pre_hook(waiter(entries)))
        try:
            with torch.inference_mode():
                out = functional_call(model, full, (x,), strict=False)
        finally:
            for h in hooks:
                h.remove()
        if replaced != missing:
            raise GemelError(f"{len(missing - replaced)} tensor(s) were not loaded before use, e.g. "
                             f"{sorted(missing - replaced)[0]}")
        sched.finish(pending)
        return out

    def profile_batches(self) -> None:
        """The short profile made at the start of a run: per model, the latency of batches of
        1, 2, 4, ... frames on this device and backend, until a batch would take longer than
        the longest deadline of the streams that use the model (or fails: an ONNX graph with a
        fixed batch of one); the largest batch size within it is the model's maximum. The
        weights are loaded through the scheduler (the budget holds); the counters are put back
        afterwards and, for the policies that load on demand, the run starts with nothing
        resident, as without a profile."""
        import copy

        sched = self.scheduler
        saved = (copy.deepcopy(sched.stats), dict(self.infer_seconds), sched.peak_resident_bytes)
        self._profiling = True
        try:
            for m in self.max_batch:
                if sched.refuses(m):
                    continue
                deadlines = [self.stream_deadline(i) for i, s in enumerate(self.stats) if m in s.models]
                longest = max(deadlines) if deadlines else 1.0
                c, h, w = self.inputs[m]
                frame = torch.rand(c, h, w, generator=torch.Generator().manual_seed(0))
                row: dict[str, float] = {}
                best = 1
                b = 1
                while b <= (MAX_BATCH if self.batching else 1):
                    x = torch.cat([_prepare_input(frame, self.preprocessing[m], self.device)] * b)
                    try:
                        self._run_model(m, x)  # warm-up (and the load, for b == 1)
                        times = []
                        for _ in range(2):
                            start = time.perf_counter()
                            self._run_model(m, x)
                            times.append(time.perf_counter() - start)
                    except Exception:  # noqa: BLE001 (this batch size cannot run: the largest that did is the limit;
                        break           # a model that fails alone fails on the frames, which count it)
                    t = min(times)
                    self.estimates.observe(m, b, t, replace=True)
                    row[str(b)] = round(1000.0 * t, 3)
                    if t > longest:
                        break
                    best = b
                    if t > PROFILE_STOP_S:  # larger batches would only make the profile long
                        break
                    b *= 2
                self.max_batch[m] = best
                self.profile[m] = row
        finally:
            self._profiling = False
            self.profiled = True
            sched.stats, self.infer_seconds, peak = saved
            if self._ort is not None:
                self._ort.sessions_made = {n: 0 for n in self._ort.sessions_made}
            if sched.policy in ("merged", "time-sharing"):
                sched.release()
                sched.peak_resident_bytes = peak

    def run(self, duration_s: float | None = None, progress=None,
            on_update: Callable[[dict], None] | None = None, update_every_s: float = 0.5) -> RunSummary:
        """Process until `duration_s` passes, every source ends, `progress.cancel()` or Ctrl-C.
        Profiles the models' batch latencies first, unless `profile_batches()` already ran."""
        self._running = True
        if not self.profiled:
            self.profile_batches()
        threads = [threading.Thread(target=self._produce, args=(i, src), name=f"gemel-source-{i}", daemon=True)
                   for i, (src, _) in enumerate(self.streams)]
        self._start = time.monotonic()
        for t in threads:
            t.start()
        last_update = self._start
        stopped = None
        errors = 0
        try:
            while stopped is None:
                now = time.monotonic()
                if progress is not None and progress.cancelled:
                    stopped = "cancelled"
                elif duration_s is not None and now - self._start >= duration_s:
                    stopped = "duration"
                else:
                    try:  # every frame that arrived joins the waiting ones
                        while True:
                            self._admit(self._queue.get(timeout=0.02) if not self._waiting
                                        else self._queue.get_nowait())
                    except queue.Empty:
                        pass
                    if not self._waiting:
                        if not any(t.is_alive() for t in threads) and self._queue.empty():
                            stopped = "sources ended"
                        continue
                    try:
                        if self.step():
                            errors = 0
                    except Exception as exc:  # noqa: BLE001 (one bad batch must not end every stream)
                        errors += 1
                        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        if errors >= MAX_CONSECUTIVE_ERRORS:
                            stopped = f"error: {self.last_error} ({errors} batches in a row failed)"
                    if not self._waiting and self._queue.empty() and not any(t.is_alive() for t in threads):
                        stopped = "sources ended"
                if on_update is not None and now - last_update >= update_every_s:
                    last_update = now
                    on_update(self.snapshot())
        except KeyboardInterrupt:
            stopped = "interrupted"
        finally:
            self.elapsed_s = time.monotonic() - self._start
            self.stopped = stopped or "interrupted"
            for src, _ in self.streams:
                src.stop()
            for t in threads:
                t.join(timeout=5.0)
            self._drain()
            for sink in self.sinks:
                sink.flush()
        summary = self.summary()
        # The run is over: its resident weights (and onnxruntime sessions over them) go now,
        # not whenever the engine object is collected. The counters stay readable.
        if self._ort is not None:
            self._ort.sessions.clear()
        self.scheduler.release()
        return summary

    def _drain(self) -> None:
        """Frames still waiting or queued when the run stops missed their chance: dropped, so
        every frame that came in is counted once."""
        for j in self._waiting:
            self.stats[j.stream].dropped_late += 1
        self._waiting.clear()
        while True:
            try:
                i, *_ = self._queue.get_nowait()
            except queue.Empty:
                return
            self.stats[i].dropped_late += 1

    # --- reading -----------------------------------------------------------------------------

    def _models(self) -> dict[str, dict]:
        out = {}
        for name, s in self.scheduler.stats.items():
            row = s.to_dict()
            row["infer_seconds"] = self.infer_seconds[name]
            row["mean_infer_ms"] = 1000.0 * self.infer_seconds[name] / s.runs if s.runs else None
            row["load"] = "layered" if name in self.layer_plans else "whole"
            row["batches"] = self.batches[name]
            row["mean_batch_size"] = self.batched_frames[name] / self.batches[name] if self.batches[name] else None
            row["max_batch"] = self.max_batch[name]
            row["profile_ms"] = self.profile.get(name)
            if name in self.load_notes:
                row["load_note"] = self.load_notes[name]
            out[name] = row
        return out

    def snapshot(self) -> dict:
        """Counters so far; safe to call from another thread while `run()` works."""
        elapsed = (self.elapsed_s if self.stopped else time.monotonic() - self._start) if self._start else 0.0
        sched = self.scheduler
        # Running from the call to run(): its batch profile comes first (frames arrive after it).
        state = f"stopped: {self.stopped}" if self.stopped else "running" if self._start or self._running \
            else "not started"
        return {"bundle": str(self.bundle.path), "policy": sched.policy, "backend": self.backend,
                "device": str(self.device), "eviction": sched.eviction, "state": state, "last_error": self.last_error,
                "elapsed_s": elapsed, "streams": [s.to_dict(elapsed) for s in self.stats],
                "models": self._models(),
                "memory": {"budget_bytes": sched.budget,
                           **memory_snapshot(self.device, sched.resident_bytes, sched.peak_resident_bytes)}}

    def summary(self) -> RunSummary:
        sched = self.scheduler
        return RunSummary(bundle=str(self.bundle.path), backend=self.backend, device=str(self.device),
                          policy=sched.policy, budget_bytes=sched.budget, elapsed_s=self.elapsed_s,
                          stopped=self.stopped, last_error=self.last_error,
                          streams=[s.to_dict(self.elapsed_s) for s in self.stats], models=self._models(),
                          memory={"budget_bytes": sched.budget, "all_models_bytes": sched.total_bytes(),
                                  "static_set": sched.static_set,
                                  **memory_snapshot(self.device, sched.resident_bytes, sched.peak_resident_bytes)},
                          eviction=sched.eviction, batching=self.batching)


def run(bundle, streams: list[tuple[FrameSource, list[str]]], policy: str = "merged",
        budget_bytes: int | None = None, device: str = "cpu", duration_s: float | None = None,
        progress=None, backend: str = "torch", on_update: Callable[[dict], None] | None = None,
        load: str = "whole", deadline_s: float | None = None, eviction: str = "belady", batching: bool = True,
        sinks: list | None = None) -> RunSummary:
    """Run `streams` (each a source and the names of the models its frames go through; an empty
    list means every model of the bundle) and return what happened."""
    engine = Engine(bundle, streams, policy, budget_bytes, device, backend, load, deadline_s, eviction, batching,
                    sinks)
    return engine.run(duration_s, progress, on_update)


__all__ = ["BACKENDS", "LOADS", "BatchPlanner", "Engine", "Job", "LatencyEstimates", "LayerPlan", "OrtRunner",
           "RunSummary", "StreamStats", "describe_output", "memory_snapshot", "process_rss", "resolve_device",
           "result_record", "run"]
