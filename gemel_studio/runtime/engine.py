"""The inference engine: live streams through the bundle's models under a memory budget.

Each stream's source delivers frames in real time on its own thread; one worker (the caller's
thread) schedules them. A frame must have been run through all of its stream's models before
its deadline (`deadline_s`, by default the stream's frame interval); otherwise it is dropped
and counted: frames that could no longer meet their deadline ("late") and frames for a model
the policy will not hold ("refused", space-sharing). Every frame that arrived is counted once
as processed or dropped, so `frames_in == processed + dropped`.

Which frames run next, and together, is `batching.BatchPlanner`'s choice (see there). A stream
whose models are slower than its deadline is served at the rate it can be: a frame's deadline
is at least twice the estimated latency of its stream's models (a stream needing 32 ms of a
33 ms interval could otherwise only be served when the worker happens to be idle), and when
that stretches it, a newer frame replaces the stream's older frames that have not started
(latest frame first).

While a batch runs, the weights the next batch's model lacks are copied on a loader thread
(`prefetch`, by default on CUDA only; see scheduler.py: within the budget, evicting nothing the
running model needs); the next batch is the planner's choice made ahead on what is waiting.

How the run runs is one `RunOptions`. `snapshot()` returns a `RunSnapshot` and `run()` a
`RunSummary` (telemetry.py; `to_dict()` is their JSON) whether it stops because the duration
passed, every source ended, `progress.cancel()` was called or Ctrl-C was pressed.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from typing import Callable

import torch

from ..devices import resolve_device
from ..errors import GemelError
from .backends import OrtRunner, TorchRunner, prepare_input
from .batching import BatchPlanner, Job, LatencyEstimates, profile_engine
from .heap import HeapTrimmer
from .layered import plan_layers, run_layered
from .options import RunOptions
from .scheduler import ModelScheduler
from .sources import FrameSource
from .telemetry import (ModelRow, RunSnapshot, RunSummary, StreamStats, SummaryMemory, describe_output,
                        memory_snapshot, result_record)

MAX_CONSECUTIVE_ERRORS = 50  # batches in a row whose models fail before the run stops with the error
OVERRATE_SLACK = 2.0  # a frame's deadline is at least this times its stream's models' latency
# Fair shares are of recent compute: what a stream had decays with this time constant (seconds).
# A share over the whole run would charge a stream forever for compute inflated while the
# machine was slow, and starve it for as long once the machine is fast again.
FAIR_SHARE_TIME_S = 5.0


class Engine:
    """One run: streams, the scheduler and the counters. `snapshot()` may be read from another
    thread while `run()` works (a metrics endpoint, a preview). `Engine(bundle, streams,
    RunOptions(...), sinks=...)`, or the policy third and the other options as the keywords of
    `RunOptions.from_keywords` (the older form; `device` is 'cpu' there)."""

    def __init__(self, bundle, streams: list[tuple[FrameSource, list[str]]], options: RunOptions | str = "merged",
                 budget_bytes: int | None = None, device: str = "cpu", backend: str = "torch", load: str = "whole",
                 deadline_s: float | None = None, eviction: str = "belady", batching: bool = True,
                 sinks: list | None = None, order: str = "merge-aware", prefetch: str = "auto"):
        if not streams:
            raise GemelError("no streams: add at least one --stream SOURCE[=MODEL,...]")
        if not isinstance(options, RunOptions):
            options = RunOptions.from_keywords(options, budget_bytes, device, backend, load, deadline_s, eviction,
                                               batching, order, prefetch)
        self.options = options
        backend, load, deadline_s = options.backend, options.load, options.deadline_s
        self.bundle = bundle
        self.backend = backend
        # onnxruntime runs on the CPU here: "auto" means the CPU for it, even on a GPU box.
        self.device = resolve_device(options.budget_device)
        all_models = [m.name for m in bundle.manifest.models]
        self.streams = [(src, list(models) or list(all_models)) for src, models in streams]
        used = list(dict.fromkeys(m for _, models in self.streams for m in models))
        demand = [(src.fps, models) for src, models in self.streams]
        self.scheduler = ModelScheduler.for_bundle(bundle, used, options.policy, options.memory_budget, self.device,
                                                   options.eviction, demand)
        self.inputs = {m: tuple(bundle.manifest.model(m).input_size) for m in used}
        self.preprocessing = {m: bundle.manifest.model(m).preprocessing.image_preprocessing() for m in used}
        self.threads = options.threads  # None: torch's own (one per core), onnxruntime's sessions taking it too
        self.threads_used: int | None = None  # torch's intra-op threads while the run worked
        self._ort = OrtRunner(bundle, self.scheduler, used, options.threads) if backend == "onnxruntime" else None
        self._torch = TorchRunner(bundle)
        self.load = load
        # model -> its layer plan; model -> why it loads whole although layered was asked
        self.layer_plans, self.load_notes = plan_layers(bundle, used) if load == "layered" else ({}, {})
        names = [src.name for src, _ in self.streams]
        self.stats = [StreamStats(n if names.count(n) == 1 else f"{n}#{i}", models, src.fps, deadline_s=deadline_s)
                      for i, (n, (src, models)) in enumerate(zip(names, self.streams))]
        self.deadline_s = deadline_s
        self.batching = options.batching
        # Measured on a 2-core CPU (benchmarks/runtime.py --compare-prefetch): a copy on the CPU takes
        # a core from inference, and time-sharing processed fewer frames with it; on CUDA it is DMA.
        self.prefetch = options.prefetch == "on" or (options.prefetch == "auto" and self.device.type == "cuda")
        self._current: list[Job] = []  # the batch running now (the prefetch predicts what follows it)
        self.sinks = list(sinks or [])
        self.estimates = LatencyEstimates()
        self.max_batch: dict[str, int] = {m: 1 for m in used}
        self.planner = BatchPlanner(self.estimates, self.max_batch, options.order)
        self.batches = {m: 0 for m in used}  # batches run per model
        self.batched_frames = {m: 0 for m in used}  # frames those batches held
        self.profile: dict[str, dict[str, float]] = {}  # model -> batch size -> ms (the start's profile)
        self.clock = time.monotonic
        self._waiting: list[Job] = []
        self._usage = [0.0] * len(self.streams)  # recent compute per stream (see FAIR_SHARE_TIME_S)
        self._usage_at: float | None = None
        self._profiling = False
        self.profiled = False
        self._running = False
        self.infer_seconds = {m: 0.0 for m in used}
        self.specs = {m: bundle.manifest.model(m) for m in used}
        # Per stream, the last frame processed in time and what each model made of it (previews).
        self.latest: list[dict | None] = [None] * len(self.streams)
        self._queue: queue.Queue = queue.Queue()
        self.heap = HeapTrimmer()  # freed heap memory back to the system, when idle (heap.py)
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
        now = self.clock()
        batch, drop = self.planner.plan(now, self._waiting, self.recent_usage(now), self._load_estimate,
                                        self.scheduler.order_bytes)
        for j in drop:
            self._waiting.remove(j)
            self.stats[j.stream].dropped_late += 1
        if not batch:
            return False
        for j in batch:
            self._waiting.remove(j)
        self._run_batch(batch)
        return True

    def recent_usage(self, now: float) -> list[float]:
        """Per stream, the compute it had recently: each second of it counts e^(-age /
        FAIR_SHARE_TIME_S) (the planner shares compute max-min fairly on these)."""
        if self._usage_at is not None and now > self._usage_at:
            keep = math.exp(-(now - self._usage_at) / FAIR_SHARE_TIME_S)
            self._usage = [u * keep for u in self._usage]
        if self._usage_at is None or now > self._usage_at:
            self._usage_at = now
        return list(self._usage)

    def _run_batch(self, batch: list[Job]) -> None:
        m = batch[0].model
        assert all(j.model == m for j in batch)
        sched = self.scheduler.stats[m]
        before_bytes, before_load = sched.loaded_bytes, sched.load_seconds
        started = self.clock()
        self._current = batch
        try:
            x = torch.cat([prepare_input(j.frame, self.preprocessing[m], self.device) for j in batch])
            out = self._run_model(m, x, self._future(batch))
        except Exception:
            for j in batch:
                self.stats[j.stream].dropped_error += 1
            raise
        finally:
            ended = self.clock()
            spent = ended - started
            self.recent_usage(ended)
            for j in batch:
                self.stats[j.stream].compute_s += spent / len(batch)
                self._usage[j.stream] += spent / len(batch)
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
        if pending is None:
            self._start_prefetch(m, future)
        try:
            if self._ort is not None:
                self._ort.prepare(m, state)
            start = time.perf_counter()
            if self._ort is not None:
                out = self._ort.run(m, x)
            elif pending is not None:
                try:
                    out = run_layered(self.scheduler, m, self.bundle.models[m], plan, self.specs[m].tensors,
                                      self.bundle.tensors, state, pending, x)
                except Exception as exc:  # noqa: BLE001 (the layer plan missed something: run it whole)
                    self.scheduler.finish(pending)  # every tensor resident now
                    pending = None
                    del self.layer_plans[m]
                    self.load_notes[m] = f"loads whole: layer-by-layer run failed ({exc})"
                    out = self._torch.run(m, self.scheduler.resident_state(m), x)
                start += 0.0 if pending is None else pending.wait_seconds  # waiting for weights is loading
            else:
                out = self._torch.run(m, state, x)
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

    def _start_prefetch(self, m: str, future: list[str] | None = None) -> bool:
        """While model `m` (resident now) runs, start loading the model the planner would pick
        after this batch (scheduler.prefetch: within the budget, evicting nothing `m` needs)."""
        if not self.prefetch or self._profiling:
            return False
        nxt = self._predict_next(m)
        return nxt is not None and self.scheduler.prefetch(nxt, m, future)

    def _predict_next(self, m: str) -> str | None:
        """The model of the batch the planner would choose once the running batch (of model
        `m`) is done, from what is waiting now and where the batch's frames go next (frames
        arriving meanwhile are unknown: the guess can miss). None: nothing waiting, or `m`."""
        batch = [j for j in self._current if j.model == m]
        after = list(self._waiting)
        for j in batch:
            if j.step + 1 < len(j.models):
                after.append(Job(j.stream, j.index, j.ts, j.deadline, j.frame, j.models, j.step + 1))
        if not after:
            return None
        now = self.clock()
        spent = self.estimates.run(m, max(1, len(batch)))
        usage = self.recent_usage(now)
        for j in batch:
            usage[j.stream] += spent / len(batch)
        nxt, _ = self.planner.plan(now + spent, after, usage, self._load_estimate, self.scheduler.order_bytes,
                                   commit=False)
        return nxt[0].model if nxt and nxt[0].model != m else None

    @contextlib.contextmanager
    def _torch_threads(self):
        """torch's intra-op threads at `threads` while the engine works (the profile too, so that
        its latencies are those of the run), torch's own setting again after. With OpenMP the
        count is the calling thread's, and the one a thread takes when it first uses torch: a
        thread that starts using torch while a run works takes the run's count."""
        before = torch.get_num_threads()
        if self.threads is not None and self.threads != before:
            torch.set_num_threads(self.threads)
        if self._ort is not None and self._ort.threads is None:
            # onnxruntime's sessions take the same count, so that the one shown is theirs too
            # (left to itself onnxruntime picks its own, which the summary could not report)
            self._ort.threads = torch.get_num_threads()
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def profile_batches(self) -> None:
        """The short profile made at the start of a run (batching.profile_engine)."""
        with self._torch_threads():
            profile_engine(self)

    def run(self, duration_s: float | None = None, progress=None,
            on_update: Callable[[RunSnapshot], None] | None = None, update_every_s: float = 0.5) -> RunSummary:
        """Process until `duration_s` passes, every source ends, `progress.cancel()` or Ctrl-C.
        Profiles the models' batch latencies first, unless `profile_batches()` already ran."""
        with self._torch_threads():
            return self._run(duration_s, progress, on_update, update_every_s)

    def _run(self, duration_s, progress, on_update, update_every_s) -> RunSummary:
        self._running = True
        if not self.profiled:
            self.profile_batches()
        self.threads_used = torch.get_num_threads()
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
                        self.heap.maybe_trim(now)  # nothing is waiting: the trim (ms) delays no frame
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
        self.scheduler.settle_prefetch()  # a copy still pending is let go before the counts are read
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

    def _models(self) -> dict[str, ModelRow]:
        out = {}
        for name, s in self.scheduler.stats.items():
            batches, runs = self.batches[name], s.runs
            out[name] = ModelRow(
                **s.to_dict(), infer_seconds=self.infer_seconds[name],
                mean_infer_ms=1000.0 * self.infer_seconds[name] / runs if runs else None,
                load="layered" if name in self.layer_plans else "whole", batches=batches,
                mean_batch_size=self.batched_frames[name] / batches if batches else None,
                max_batch=self.max_batch[name], profile_ms=self.profile.get(name), load_note=self.load_notes.get(name))
        return out

    def snapshot(self) -> RunSnapshot:
        """Counters so far; safe to call from another thread while `run()` works."""
        elapsed = (self.elapsed_s if self.stopped else time.monotonic() - self._start) if self._start else 0.0
        sched = self.scheduler
        # Running from the call to run(): its batch profile comes first (frames arrive after it).
        state = f"stopped: {self.stopped}" if self.stopped else "running" if self._start or self._running \
            else "not started"
        return RunSnapshot(bundle=str(self.bundle.path), policy=sched.policy, backend=self.backend,
                           device=str(self.device), eviction=sched.eviction, state=state, last_error=self.last_error,
                           elapsed_s=elapsed, streams=[s.row(elapsed) for s in self.stats], models=self._models(),
                           memory=memory_snapshot(self.device, sched.resident_bytes, sched.peak_resident_bytes,
                                                  sched.budget), **self._scheduling())

    def _scheduling(self) -> dict:
        """The threads, the order in use and the prefetch counters (telemetry.Scheduling's fields)."""
        sched = self.scheduler
        return {"threads": self.threads_used, "order": self.planner.order, "reordered_batches": self.planner.reordered,
                "prefetch": self.prefetch, "prefetches": sched.prefetches, "prefetch_misses": sched.prefetch_misses}

    def summary(self) -> RunSummary:
        sched = self.scheduler
        memory = SummaryMemory(**vars(memory_snapshot(self.device, sched.resident_bytes, sched.peak_resident_bytes,
                                                      sched.budget)),
                               all_models_bytes=sched.total_bytes(), static_set=sched.static_set)
        return RunSummary(bundle=str(self.bundle.path), backend=self.backend, device=str(self.device),
                          policy=sched.policy, budget_bytes=sched.budget, elapsed_s=self.elapsed_s,
                          stopped=self.stopped, last_error=self.last_error,
                          streams=[s.row(self.elapsed_s) for s in self.stats], models=self._models(),
                          memory=memory, eviction=sched.eviction, batching=self.batching,
                          **self._scheduling())


def run(bundle, streams: list[tuple[FrameSource, list[str]]], options: RunOptions | None = None,
        duration_s: float | None = None, progress=None, on_update: Callable[[RunSnapshot], None] | None = None,
        sinks: list | None = None, **legacy) -> RunSummary:
    """Run `streams` (each a source and the names of the models its frames go through; an empty
    list means every model of the bundle) and return what happened. `legacy`: the older keyword
    arguments (`policy`, `budget_bytes`, `device`, `backend`, `load`, `deadline_s`, `eviction`,
    `batching`) instead of `options`."""
    if isinstance(options, str):  # the older positional policy
        legacy["policy"], options = options, None
    if options is None:
        options = RunOptions.from_keywords(**legacy)
    return Engine(bundle, streams, options, sinks=sinks).run(duration_s, progress, on_update)


__all__ = ["Engine", "FAIR_SHARE_TIME_S", "MAX_CONSECUTIVE_ERRORS", "OVERRATE_SLACK", "run"]
