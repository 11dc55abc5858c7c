"""The inference engine: live streams through the bundle's models under a memory budget.

Each stream's source delivers frames in real time on its own thread; one worker (the caller's
thread) takes them in arrival order. A frame must have been run through all of its stream's
models before its deadline, the arrival of the stream's next frame (1/fps later); otherwise
it is dropped and counted: frames whose deadline passed while they waited or ran ("late") and
frames for a model the policy will not hold ("refused", space-sharing). Every frame that
arrived is counted once as processed or dropped, so `frames_in == processed + dropped`.

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
from .scheduler import ModelScheduler
from .sources import FrameSource


MAX_CONSECUTIVE_ERRORS = 50  # frames in a row whose models fail before the run stops with the error
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
                "end_reason": self.end_reason}


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

    def to_dict(self) -> dict:
        return asdict(self)


def memory_snapshot(device: torch.device, resident_bytes: int, peak_resident_bytes: int) -> dict:
    """The runtime's own resident weights, the process's resident memory and, on CUDA only,
    torch's allocated/reserved bytes and the device's used/total memory (pynvml). Each is a
    different figure and is named as such."""
    out = {"runtime_resident_bytes": resident_bytes, "runtime_peak_resident_bytes": peak_resident_bytes,
           "process_rss_bytes": process_rss()}
    if device.type == "cuda":
        out["torch_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        out["torch_reserved_bytes"] = int(torch.cuda.memory_reserved(device))
        out.update(_nvml_memory(device.index or 0))
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


_nvml_handles: dict[int, object] = {}
_nvml_lock = threading.Lock()


def _nvml_memory(index: int) -> dict:
    """The device's used and total memory through pynvml; NVML is initialised once per process
    and its handle kept, since previews and metrics ask several times a second."""
    try:
        import pynvml

        with _nvml_lock:
            if index not in _nvml_handles:
                if not _nvml_handles:
                    pynvml.nvmlInit()
                _nvml_handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(_nvml_handles[index])
        return {"device_used_bytes": int(mem.used), "device_total_bytes": int(mem.total)}
    except Exception:  # no NVML (a driver-less box, another vendor): these figures are absent
        return {}


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
                 budget_bytes: int | None = None, device: str = "cpu", backend: str = "torch", load: str = "whole"):
        if backend not in BACKENDS:
            raise GemelError(f"backend '{backend}': expected one of {', '.join(BACKENDS)}")
        if load not in LOADS:
            raise GemelError(f"load '{load}': expected one of {', '.join(LOADS)}")
        if load == "layered" and backend != "torch":
            raise GemelError("layer-by-layer loading needs the torch backend (an onnxruntime session takes all "
                             "its weights at once); use --backend torch or --load whole")
        if not streams:
            raise GemelError("no streams: add at least one --stream SOURCE[=MODEL,...]")
        self.bundle = bundle
        self.backend = backend
        # onnxruntime runs on the CPU here: "auto" means the CPU for it, even on a GPU box.
        self.device = resolve_device("cpu" if backend == "onnxruntime" and device == "auto" else device)
        all_models = [m.name for m in bundle.manifest.models]
        self.streams = [(src, list(models) or list(all_models)) for src, models in streams]
        used = list(dict.fromkeys(m for _, models in self.streams for m in models))
        self.scheduler = ModelScheduler.for_bundle(bundle, used, policy, budget_bytes, self.device)
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
        self.stats = [StreamStats(n if names.count(n) == 1 else f"{n}#{i}", models, src.fps)
                      for i, (n, (src, models)) in enumerate(zip(names, self.streams))]
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
                    stats.frames_in += 1
                self._queue.put((i, ts, ts + 1.0 / source.fps, frame))
        except Exception as exc:  # a source must never take the run down
            source.end_reason = source.end_reason or f"error: {exc}"
        finally:
            stats.end_reason = source.end_reason or "ended"

    # --- the worker --------------------------------------------------------------------------

    def process_frame(self, frame: torch.Tensor, stream: int = 0, deadline_s: float = 60.0) -> None:
        """Run one frame through stream `stream`'s models now, outside the real-time loop (tests,
        benchmarks, one-off checks): it counts as arrived, then as processed or dropped, with
        `deadline_s` seconds to finish."""
        now = time.monotonic()
        self.stats[stream].frames_in += 1
        self._process((stream, now, now + deadline_s, frame))

    def _process(self, item) -> None:
        i, ts, deadline, frame = item
        stats = self.stats[i]
        models = stats.models
        if any(self.scheduler.refuses(m) for m in models):
            for m in models:
                if self.scheduler.refuses(m):
                    self.scheduler.stats[m].refused += 1
            stats.dropped_refused += 1
            return
        outputs = {}
        for m in models:
            if time.monotonic() > deadline:
                stats.dropped_late += 1
                return
            # One model at a time, in its own call: its resident tensors are let go before the
            # next model loads, so what is alive never exceeds what the scheduler counts.
            outputs[m] = self._run_model(m, frame)
        done = time.monotonic()
        if done > deadline:
            stats.dropped_late += 1
        else:
            stats.processed += 1
            stats.latencies.append(done - ts)
            self.latest[i] = {"timestamp": ts, "frame": frame,
                              "outputs": {m: describe_output(self.specs[m], o) for m, o in outputs.items()}}

    def _run_model(self, m: str, frame: torch.Tensor):
        plan = self.layer_plans.get(m)
        pending = None
        if plan is not None:
            state, pending = self.scheduler.acquire_deferred(m, plan.order)
        else:
            state = self.scheduler.acquire(m)
        try:
            if self._ort is not None:
                self._ort.prepare(m, state)
            start = time.perf_counter()
            x = _prepare_input(frame, self.preprocessing[m], self.device)
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
            self.infer_seconds[m] += time.perf_counter() - start
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

    def run(self, duration_s: float | None = None, progress=None,
            on_update: Callable[[dict], None] | None = None, update_every_s: float = 0.5) -> RunSummary:
        """Process until `duration_s` passes, every source ends, `progress.cancel()` or Ctrl-C."""
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
                    try:
                        item = self._queue.get(timeout=0.02)
                    except queue.Empty:
                        if not any(t.is_alive() for t in threads) and self._queue.empty():
                            stopped = "sources ended"
                        continue
                    try:
                        self._process(item)
                        errors = 0
                    except Exception as exc:  # noqa: BLE001 (one bad frame must not end every stream)
                        errors += 1
                        self.stats[item[0]].dropped_error += 1
                        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        if errors >= MAX_CONSECUTIVE_ERRORS:
                            stopped = f"error: {self.last_error} ({errors} frames in a row failed)"
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
        summary = self.summary()
        # The run is over: its resident weights (and onnxruntime sessions over them) go now,
        # not whenever the engine object is collected. The counters stay readable.
        if self._ort is not None:
            self._ort.sessions.clear()
        self.scheduler.release()
        return summary

    def _drain(self) -> None:
        """Frames still queued when the run stops missed their chance: dropped, so every frame
        that came in is counted once."""
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
            if name in self.load_notes:
                row["load_note"] = self.load_notes[name]
            out[name] = row
        return out

    def snapshot(self) -> dict:
        """Counters so far; safe to call from another thread while `run()` works."""
        elapsed = (self.elapsed_s if self.stopped else time.monotonic() - self._start) if self._start else 0.0
        sched = self.scheduler
        state = f"stopped: {self.stopped}" if self.stopped else "running" if self._start else "not started"
        return {"bundle": str(self.bundle.path), "policy": sched.policy, "backend": self.backend,
                "device": str(self.device), "state": state, "last_error": self.last_error,
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
                                  **memory_snapshot(self.device, sched.resident_bytes, sched.peak_resident_bytes)})


def run(bundle, streams: list[tuple[FrameSource, list[str]]], policy: str = "merged",
        budget_bytes: int | None = None, device: str = "cpu", duration_s: float | None = None,
        progress=None, backend: str = "torch", on_update: Callable[[dict], None] | None = None,
        load: str = "whole") -> RunSummary:
    """Run `streams` (each a source and the names of the models its frames go through; an empty
    list means every model of the bundle) and return what happened."""
    engine = Engine(bundle, streams, policy, budget_bytes, device, backend, load)
    return engine.run(duration_s, progress, on_update)


__all__ = ["BACKENDS", "LOADS", "Engine", "LayerPlan", "OrtRunner", "RunSummary", "StreamStats", "describe_output",
           "memory_snapshot", "process_rss", "resolve_device", "run"]
