"""Batching: which waiting frames run next, together, and what each model and batch size
costs on this device (as GEMEL's evaluation and Nexus do it).

- Frames waiting for the same model run as one batch, up to a per-model maximum chosen from
  a short profile made when a run starts (latency per batch size on this device and
  backend), and only as large as still lets every frame in it meet its deadline.
- No compute is spent on a frame that can no longer meet its deadline: before a batch starts,
  each frame's finish is estimated from the measured latency of its remaining models (and the
  load of the next one when it is not resident); a frame that cannot make it is dropped then.
- Compute is shared max-min fairly: the next batch serves the stream that has had the least
  compute recently (`usage`: the engine's decaying sums, see engine.FAIR_SHARE_TIME_S), unless
  a frame due sooner would be lost by waiting and fits in before it without making it late
  (its batch, that is: the batch built around it is capped to what the first's slack allows;
  when the first is a merge-aware reorder, below, to what the fair choice's slack allows too),
  and its stream is not already more than one of the first's runs ahead in compute (else a
  stream with a long deadline would be passed over for as long as sooner frames kept coming).
- Merge-aware order (`order="merge-aware"`, the default): when the fair choice's model has
  bytes to load, a frame whose model has fewer bytes left to load goes first instead (the
  fewest first: models that share layers with the one just run run back to back, and the
  shared layers are loaded once), but only while its stream is at most one of the fair
  choice's runs (its load included) ahead in compute, only when the fair choice still meets
  its deadline after it (twice the inserted work must fit, as above: the work of the whole
  batch built around the frame moved ahead, which is capped to what fits), and only for as long
  as one of the fair choice's runs, its load included, from the first time its stream was
  passed over. So no stream is starved: the fair rule still decides whose turn it is, the
  order only moves a load back by one run. (A bound in compute alone is not enough: compute
  shares decay, and a stream whose model loads slowly could stay within one load of every
  other stream for ever.) `order="fair"` is max-min fairness alone (for comparison).

`BatchPlanner` has no clock of its own (`now` is given), so tests drive it with a fake one.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
import time
from typing import Callable

import torch

from .backends import prepare_input
from .options import ORDERS

MAX_BATCH = 16  # the profile tries batch sizes 1, 2, 4, ... up to this
PROFILE_STOP_S = 0.25  # the profile tries no larger batch once one takes this long


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
    """Measured seconds per model and batch size, and the load rate in bytes per second: each
    the median of its last `window` measurements (seeded by the profile). Unknown figures
    estimate as 0 (nothing is dropped on a guess).

    A median of recent runs, not an average of all of them: the estimate is what a run costs
    now. One slow run (a swap, a collection, the machine busy for a moment) moves it not at
    all, a sustained change moves it within half a window, and when the machine gets fast
    again it falls back as soon as a few fast runs are measured. (An average weighted over
    the history kept slow times for long, and a model whose estimate is too high runs less,
    so its estimate is corrected less.)"""

    def __init__(self, window: int = 5):
        if window < 1:
            raise ValueError(f"window {window}: must be at least 1")
        self.window = window
        self.seconds: dict[str, dict[int, float]] = {}  # model -> batch size -> the estimate
        self._recent: dict[tuple[str, int], deque] = {}
        self.load_rate: float | None = None  # bytes per second
        self._load_rates: deque = deque(maxlen=window)

    def observe(self, model: str, batch: int, seconds: float, replace: bool = False) -> None:
        """One measured run of `batch` frames of `model`; `replace`: forget the earlier ones."""
        recent = self._recent.get((model, batch))
        if recent is None or replace:
            recent = self._recent[(model, batch)] = deque(maxlen=self.window)
        recent.append(float(seconds))
        self.seconds.setdefault(model, {})[batch] = _median(recent)

    def observe_load(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self._load_rates.append(nbytes / seconds)
            self.load_rate = _median(self._load_rates)

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


def _median(values) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


class BatchPlanner:
    """Picks the next batch to run from the waiting frames (no clock of its own: `now` is
    given, so tests drive it with a fake one). See the module's docstring for the rules."""

    def __init__(self, estimates: LatencyEstimates, max_batch: dict[str, int] | None = None,
                 order: str = "fair"):
        if order not in ORDERS:
            raise ValueError(f"order '{order}': expected one of {', '.join(ORDERS)}")
        self.estimates = estimates
        self.max_batch = max_batch if max_batch is not None else {}
        self.order = order
        self.reordered = 0  # batches the merge-aware order moved ahead of the fair choice
        self._passed_since: dict[int, float] = {}  # stream -> when the merge-aware order first passed it over

    def rest(self, job: Job) -> float:
        """Estimated seconds of the job's models after the next one, each alone."""
        return sum(self.estimates.run(m, 1) for m in job.models[job.step + 1:])

    def plan(self, now: float, waiting: list[Job], usage: list[float],
             load_s: Callable[[str], float] = lambda m: 0.0,
             missing: Callable[[str], int] | None = None, commit: bool = True) -> tuple[list[Job], list[Job]]:
        """(the batch to run now, all for one model; the frames to drop, which can no longer
        meet their deadline). `usage[i]`: the compute stream i has had (recently); `load_s(m)`:
        the estimated seconds to load what model m lacks; `missing(m)`: the bytes it lacks
        (the merge-aware order reads it; without it the order is fair). `commit=False`: a
        guess at what comes next (the prefetch's), which the planner does not remember."""
        if not commit:
            saved = (self.reordered, dict(self._passed_since))
            try:
                return self.plan(now, waiting, usage, load_s, missing)
            finally:
                self.reordered, self._passed_since = saved
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
        lead = fair = min(feasible, key=lambda j: (usage[j.stream], j.deadline, j.ts))
        batch = None  # the batch moved ahead of the fair choice, as large as its check allowed
        if self.order == "merge-aware" and missing is not None:
            lead, batch = self._merge_aware(now, lead, feasible, usage, load, missing)
        # ... unless a frame due sooner would be lost by waiting for it and fits in before it
        # without making it late (work the lead's slack can pay for).
        soonest = min(feasible, key=lambda j: (j.deadline, usage[j.stream], j.ts))
        if soonest.deadline < lead.deadline and soonest.model != lead.model:
            first = load(soonest.model) + est.run(soonest.model, 1)
            second = load(lead.model) + est.run(lead.model, 1)
            lost = now + second + first + self.rest(soonest) > soonest.deadline
            # Twice the inserted work must fit: estimates are averages, and a lead pushed out by
            # one bad guess after another would starve. And only while the sooner stream is not
            # already a run of the lead's ahead in compute: a lead whose frame is replaced by a
            # newer one (an over-rate stream, latest frame first) has fresh slack every time, and
            # a sooner stream could otherwise take all of it, every time, for as long as it lasts.
            # The inserted work is the batch built around the sooner frame, capped to what fits.
            ahead = usage[soonest.stream] - usage[lead.stream]
            if lost and ahead <= second:
                # When it displaces a reorder, the fair choice waits for it too: both are checked.
                waits = [lead] if lead is fair or soonest is fair else [lead, fair]
                inserted = self._ahead_of(now, soonest, waits, feasible, usage, load)
                if inserted:
                    lead, batch = soonest, inserted
        if batch is None:
            batch = self._batch(now, lead, feasible, usage, load)
        for j in batch:  # served: passed over no longer
            self._passed_since.pop(j.stream, None)
        return batch, drop

    def _batch(self, now: float, lead: Job, feasible: list[Job], usage: list[float],
               load: Callable[[str], float]) -> list[Job]:
        """The batch built around `lead`: frames for its model, fairest first, up to the model's
        maximum and only while every frame in it still meets its deadline. (Each of its
        prefixes is a batch that meets every deadline too.)"""
        est = self.estimates
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
        return batch

    def _ahead_of(self, now: float, first: Job, leads: list[Job], feasible: list[Job], usage: list[float],
                  load: Callable[[str], float]) -> list[Job]:
        """The batch around `first` to run before `leads` (the frames it makes wait), as large as
        keeps each of them in time with twice that batch's work before its own run (its load
        included); [] when even `first` alone does not. The batch built around `first` may hold
        up to its model's maximum, so the check is of the batch that would run, not of `first`
        alone."""
        est = self.estimates
        m = first.model
        batch = self._batch(now, first, feasible, usage, load)
        for size in range(len(batch), 0, -1):
            inserted = 2 * (load(m) + est.run(m, size))
            if all(now + inserted + load(w.model) + est.run(w.model, 1) + self.rest(w) <= w.deadline for w in leads):
                return batch[:size]
        return []

    def _merge_aware(self, now: float, lead: Job, feasible: list[Job], usage: list[float],
                     load: Callable[[str], float], missing: Callable[[str], int]) -> tuple[Job, list[Job] | None]:
        """The frame to run instead of the fair `lead` because its model has fewer bytes left
        to load, and the batch to run around it (as large as still keeps `lead` in time); or
        (`lead`, None). See the module's docstring for the bounds."""
        need = {}

        def lacks(m: str) -> int:
            if m not in need:
                need[m] = missing(m)
            return need[m]

        if lacks(lead.model) == 0:
            return lead, None
        est = self.estimates
        second = load(lead.model) + est.run(lead.model, 1)  # the fair choice's run, its load included
        since = self._passed_since.get(lead.stream)
        if since is not None and now - since > second:  # passed over for one of its runs already
            return lead, None
        best = None
        for j in feasible:
            if j.model == lead.model or lacks(j.model) >= lacks(lead.model):
                continue
            if usage[j.stream] - usage[lead.stream] > second:  # its stream would get too far ahead
                continue
            key = (lacks(j.model), usage[j.stream], j.deadline, j.ts)
            if best is not None and key >= best[0]:
                continue
            batch = self._ahead_of(now, j, [lead], feasible, usage, load)
            if not batch:  # the fair choice would be lost even behind j alone
                continue
            best = (key, j, batch)
        if best is None:
            return lead, None
        self.reordered += 1
        self._passed_since.setdefault(lead.stream, now)
        return best[1], best[2]


def profile_latency(run: Callable[[int], object], estimates: LatencyEstimates, model: str, longest_s: float,
                    max_batch: int = MAX_BATCH, clock: Callable[[], float] = time.perf_counter,
                    ) -> tuple[int, dict[str, float]]:
    """The latency of batches of 1, 2, 4, ... frames of `model` (`run(b)` runs one batch of b),
    each the best of two after a warm-up (timed by `clock`), until a batch takes longer than
    `longest_s` (the longest deadline of the streams that use the model), fails (an ONNX graph
    with a fixed batch of one), passes `max_batch` or takes PROFILE_STOP_S. Returns the largest
    batch size within `longest_s` and the milliseconds per batch size; `estimates` learns each
    figure.

    Every other size up to that largest one is then run once, untimed: a batch shape seen for
    the first time makes kernels and caches (oneDNN's primitives, the allocator's pools) that
    stay for the rest of the run, and made at start they do not show as resident memory
    growing in the middle of a long run (0.5-0.8 MiB per new size across four ResNets on this
    project's 2-core CPU, then flat when a size recurs)."""
    row: dict[str, float] = {}
    best = 1
    b = 1
    while b <= max_batch:
        try:
            run(b)  # warm-up (and the load, for b == 1)
            times = []
            for _ in range(2):
                start = clock()
                run(b)
                times.append(clock() - start)
        except Exception:  # noqa: BLE001 (this batch size cannot run: the largest that did is the limit;
            break           # a model that fails alone fails on the frames, which count it)
        t = min(times)
        estimates.observe(model, b, t, replace=True)
        row[str(b)] = round(1000.0 * t, 3)
        if t > longest_s:
            break
        best = b
        if t > PROFILE_STOP_S:  # larger batches would only make the profile long
            break
        b *= 2
    for size in range(2, best + 1):
        if str(size) not in row:
            try:
                run(size)
            except Exception:  # noqa: BLE001 (as above: the sizes that ran are the ones that can)
                break
    return best, row


def profile_engine(engine) -> None:
    """The short profile made at the start of a run: per model, the latency of batches of
    1, 2, 4, ... frames on this device and backend, until a batch would take longer than
    the longest deadline of the streams that use the model (or fails: an ONNX graph with a
    fixed batch of one); the largest batch size within it is the model's maximum. The
    weights are loaded through the scheduler (the budget holds); the counters are put back
    afterwards and, for the policies that load on demand, the run starts with nothing
    resident, as without a profile (see batching.profile_latency)."""
    sched = engine.scheduler
    saved = (copy.deepcopy(sched.stats), dict(engine.infer_seconds), sched.peak_resident_bytes)
    engine._profiling = True
    try:
        for m in engine.max_batch:
            if sched.refuses(m):
                continue
            deadlines = [engine.stream_deadline(i) for i, s in enumerate(engine.stats) if m in s.models]
            longest = max(deadlines) if deadlines else 1.0
            c, h, w = engine.inputs[m]
            frame = torch.rand(c, h, w, generator=torch.Generator().manual_seed(0))
            one = prepare_input(frame, engine.preprocessing[m], engine.device)
            best, row = profile_latency(lambda b: engine._run_model(m, torch.cat([one] * b)), engine.estimates, m,
                                        longest, MAX_BATCH if engine.batching else 1)
            engine.max_batch[m] = best
            engine.profile[m] = row
    finally:
        engine._profiling = False
        engine.profiled = True
        sched.stats, engine.infer_seconds, peak = saved
        if engine._ort is not None:
            engine._ort.sessions_made = {n: 0 for n in engine._ort.sessions_made}
        if sched.policy in ("merged", "time-sharing"):
            sched.release()
            sched.peak_resident_bytes = peak


__all__ = ["BatchPlanner", "Job", "LatencyEstimates", "MAX_BATCH", "PROFILE_STOP_S", "profile_engine",
           "profile_latency"]
