"""Fixes from a review of the runtime, each on fake clocks and invented estimates (nothing here
depends on how fast the machine is): the reorders check the batch they actually run, a copy
still in flight counts as missing, the live snapshot carries the order and prefetch counters,
a summary claims no prefetch unless told, and both copy paths start their copy the same way."""

from __future__ import annotations

import json
import random
import threading

import torch

from gemel_studio.runtime import layered, scheduler as scheduler_module
from gemel_studio.runtime.batching import BatchPlanner, Job, LatencyEstimates
from gemel_studio.runtime.scheduler import ModelScheduler
from gemel_studio.runtime.telemetry import MemoryReport, RunSnapshot, RunSummary, SummaryMemory

from .test_bundle import bundle, merged  # noqa: F401  (fixtures)
from .test_merge_order import paired, paired_scheduler
from .test_scheduling import MS, fake_engine, linear, loaded, simulate  # noqa: F401  (fixtures)

MIB = 2**20


def estimates(rows: dict[str, dict[int, float]]) -> LatencyEstimates:
    est = LatencyEstimates()
    for m, row in rows.items():
        for b, s in row.items():
            est.observe(m, b, s)
    return est


def fair_lead(planner: BatchPlanner, now: float, waiting: list[Job], usage, load) -> Job:
    """The frame the fair rule chooses (as the planner does, among the frames that can make it)."""
    est = planner.estimates
    feasible = [j for j in waiting if now + load(j.model) + est.run(j.model, 1) + planner.rest(j) <= j.deadline]
    return min(feasible, key=lambda j: (usage[j.stream], j.deadline, j.ts))


def fair_lead_still_in_time(planner: BatchPlanner, now: float, batch: list[Job], lead: Job, load) -> bool:
    """Twice the batch that runs before the fair lead, then the lead's own run, fit its deadline
    (the rule the reorders state, with the batch's real size)."""
    est = planner.estimates
    m = batch[0].model
    first = load(m) + est.run(m, len(batch))
    second = load(lead.model) + est.run(lead.model, 1)
    return now + 2 * first + second + planner.rest(lead) <= lead.deadline + 1e-12


# --- 1. the reorders check the batch that runs, not a batch of one ----------------------------


def test_the_merge_aware_order_checks_the_fair_lead_against_the_whole_batch_it_moves_ahead():
    now = 10.0
    # b is resident and batches poorly (20 ms for 4 frames); a must load for 10 ms and runs 5 ms.
    est = estimates({"a": {1: 5 * MS}, "b": {1: 5 * MS, 4: 20 * MS}})
    load = {"a": 10 * MS, "b": 0.0}.get
    missing = {"a": 4 * MIB, "b": 0}.get
    lead = Job(0, 0, now, now + 0.030, None, ["a"])  # stream 0 has had the least compute
    others = [Job(i, 0, now, now + 0.100, None, ["b"]) for i in (1, 2, 3, 4)]
    usage = [0.0, 0.010, 0.010, 0.010, 0.010]  # within one of the lead's runs (15 ms)
    planner = BatchPlanner(est, {"a": 4, "b": 4}, "merge-aware")
    batch, drop = planner.plan(now, [lead, *others], usage, load, missing)
    assert not drop and batch and batch[0].model == "b" and planner.reordered == 1
    # One b frame (5 ms) fits before the lead twice over (2 x 5 + 15 <= 30); four (20 ms) would
    # make it late even once (20 + 15 > 30): the batch moved ahead is only as large as was checked.
    assert fair_lead_still_in_time(planner, now, batch, lead, load), len(batch)
    assert len(batch) == 1
    # With slack for the whole batch (2 x 20 + 15 <= 100), it runs whole.
    roomy = Job(0, 0, now, now + 0.100, None, ["a"])
    planner = BatchPlanner(est, {"a": 4, "b": 4}, "merge-aware")
    batch, _ = planner.plan(now, [roomy, *others], usage, load, missing)
    assert [j.model for j in batch] == ["b"] * 4 and planner.reordered == 1


def test_a_sooner_frame_moved_ahead_of_the_fair_lead_brings_no_batch_that_makes_the_lead_late():
    now = 10.0
    est = estimates({"a": {1: 10 * MS}, "b": {1: 5 * MS, 2: 8 * MS, 4: 16 * MS}})
    load = {"a": 0.0, "b": 0.0}.get
    lead = Job(0, 0, now, now + 0.021, None, ["a"])  # the fair choice: 10 ms of a
    # Three frames of b due sooner (14 ms), lost behind the lead (10 + 5 > 14); three of them
    # take 12 ms, which alone would make the lead late (12 + 10 > 21).
    sooner = [Job(i, 0, now, now + 0.014, None, ["b"]) for i in (1, 2, 3)]
    usage = [0.0, 0.005, 0.005, 0.005]
    planner = BatchPlanner(est, {"a": 4, "b": 4}, "fair")
    batch, drop = planner.plan(now, [lead, *sooner], usage, load)
    assert not drop and batch[0].model == "b"  # one b frame still goes first (2 x 5 + 10 <= 21)
    assert fair_lead_still_in_time(planner, now, batch, lead, load), len(batch)
    assert len(batch) == 1


def test_a_sooner_frame_that_displaces_a_merge_aware_reorder_is_checked_against_the_fair_lead():
    now = 10.0
    est = estimates({"a": {1: 10 * MS}, "b": {1: 5 * MS}, "c": {1: 4 * MS, 2: 8 * MS, 4: 16 * MS}})
    load = {"a": 0.0, "b": 0.0, "c": 0.0}.get
    lacks = {"a": 4 * MIB, "b": 0, "c": MIB}.get
    fair = Job(0, 0, now, now + 0.022, None, ["a"])  # the fair choice: 10 ms of a, which lacks the most
    # The order moves b (resident, 5 ms) ahead of it: 2 x 5 + 10 <= 22. b's frame has time to spare.
    reorder = Job(1, 0, now, now + 0.100, None, ["b"])
    # Two frames of c due in 8 ms, lost behind b (5 + 4 > 8), displace that reorder. Their batch
    # (8 ms) keeps b in time (2 x 8 + 5 <= 100) but not the fair choice (2 x 8 + 10 > 22): one
    # frame of c is what the fair choice can wait for (2 x 4 + 10 <= 22).
    sooner = [Job(i, 0, now, now + 0.008, None, ["c"]) for i in (2, 3)]
    usage = [0.0, 0.002, 0.002, 0.002]
    planner = BatchPlanner(est, {"a": 4, "b": 4, "c": 4}, "merge-aware")
    batch, drop = planner.plan(now, [fair, reorder, *sooner], usage, load, lacks)
    assert not drop and [j.model for j in batch] == ["c"]
    assert fair_lead_still_in_time(planner, now, batch, fair, load)


def test_whatever_the_planner_moves_ahead_of_the_fair_lead_leaves_it_in_time():
    rng = random.Random(7)
    models = ["a", "b", "c"]
    reorders = 0
    for trial in range(400):
        order = "merge-aware" if trial % 2 else "fair"
        est = LatencyEstimates()
        for m in models:
            one = rng.uniform(1, 10) * MS
            for b in (1, 2, 4, 8):
                est.observe(m, b, one * (0.3 + 0.7 * b) * rng.uniform(0.9, 1.1))
        planner = BatchPlanner(est, {m: rng.choice([1, 2, 4, 8, 16]) for m in models}, order)
        now = 100.0
        common = rng.uniform(0.02, 0.15)
        waiting = []
        for i in range(rng.randint(2, 12)):
            chain = rng.sample(models, rng.randint(1, 2))
            ts = now - rng.uniform(0, 0.01)
            # Merge-aware: in half its trials one deadline for all, so that only its own reorder
            # moves a frame ahead; in the rest a sooner frame may displace the reorder as well.
            deadline = now + common if order == "merge-aware" and trial % 4 == 1 else ts + rng.uniform(0.005, 0.12)
            waiting.append(Job(rng.randrange(4), i, ts, deadline, None, chain))
        loads = {m: rng.choice([0.0, rng.uniform(0, 10) * MS]) for m in models}
        lacks = {m: 0 if loads[m] == 0.0 else rng.randint(1, 4) * MIB for m in models}
        usage = [rng.uniform(0, 0.02) for _ in range(4)]
        batch, _ = planner.plan(now, waiting, usage, loads.get, lacks.get if order == "merge-aware" else None)
        if not batch:
            continue
        lead = fair_lead(planner, now, waiting, usage, loads.get)
        if batch[0].model != lead.model:
            reorders += 1
            assert fair_lead_still_in_time(planner, now, batch, lead, loads.get), (trial, len(batch))
    assert reorders > 20  # the property was exercised


# --- 2. a copy still in flight is not yet loaded ---------------------------------------------


def test_a_prefetch_still_copying_counts_its_remaining_bytes_as_missing(monkeypatch):
    first_done, gate = threading.Event(), threading.Event()

    class GatedLoad(layered.PendingLoad):
        """Copies the first tensor, then waits for the test before the rest."""

        def _load(self, sources):
            try:
                for i, (u, src) in enumerate(zip(self.units, sources)):
                    if i == 1:
                        first_done.set()
                        gate.wait(timeout=30)
                    self.tensors[u] = src.to(self.device, copy=True)
                    self._ready[u].set()
            finally:
                for event in self._ready.values():
                    event.set()

    monkeypatch.setattr(scheduler_module, "PendingLoad", GatedLoad)
    sched = paired("merged", 2 * MIB + 16 * 1024)
    sched.acquire("color")
    size, own = sched.stats["size"].bytes, 4096  # size: the 1 MiB body B and 4 KiB of its own
    assert sched.missing_bytes("size") == size
    assert sched.prefetch("size", "color")
    assert first_done.wait(timeout=30)
    # B is copied, size's own tensor not yet: what size would still wait for is that tensor.
    assert sched.missing_bytes("size") == own
    # spare shares B; running it files the copy under way first, so it waits for what remains
    # of that copy, and then loads its own tensor.
    assert sched.missing_bytes("spare") == own + own
    assert sched.missing_bytes("shape") == own  # shares nothing with it: the copy is cancelled
    # The merge-aware order ranks by bytes moved: running shape would throw B away (copied
    # already, and copied again when size runs); size and spare file the copy, as above.
    assert sched.order_bytes("shape") == own + (size - own)
    assert sched.order_bytes("size") == own and sched.order_bytes("spare") == own + own
    gate.set()
    sched._prefetch.join()
    assert sched.missing_bytes("size") == 0 and sched.missing_bytes("spare") == own
    assert sched.order_bytes("shape") == own + size  # all of it copied, not filed yet: all thrown away
    sched.acquire("size")
    assert sched.stats["size"].swaps == 1 and sched.stats["size"].prefetched_bytes == size


def test_the_engine_estimates_a_load_for_a_model_whose_prefetch_has_not_copied_yet(loaded, monkeypatch):  # noqa: F811
    release = threading.Event()

    class SlowLoad(layered.PendingLoad):
        def _load(self, sources):
            release.wait(timeout=30)
            super()._load(sources)

    monkeypatch.setattr(scheduler_module, "PendingLoad", SlowLoad)
    engine, _, _ = fake_engine(loaded, [(30, ["color"]), (30, ["size"])], {m: linear(3, 1) for m in ("color", "size")},
                               "merged", 10**9, load_s_per_mib=0.010, prefetch="on")
    engine.scheduler = sched = paired("merged", 2 * MIB + 16 * 1024)  # room for two bodies
    sched.acquire("color")
    try:
        assert sched.prefetch("size", "color")
        # Nothing copied yet: the whole load is still ahead (10 ms a MiB).
        assert engine._load_estimate("size") == engine.estimates.load(sched.stats["size"].bytes) > 0.010
    finally:
        release.set()
    sched._prefetch.join()
    assert engine._load_estimate("size") == 0.0
    sched.release()


# --- 3. the live snapshot carries the order and prefetch counters -----------------------------


def test_the_snapshot_carries_the_order_and_prefetch_counters_the_summary_reads(loaded):  # noqa: F811
    streams = [(30, ["color"]), (30, ["size"]), (30, ["shape"]), (30, ["spare"])]
    costs = {m: linear(3, 1) for m in ("color", "shape", "size", "spare")}
    engine, clock, _ = fake_engine(loaded, streams, costs, "merged", 10**9, load_s_per_mib=0.005,
                                   order="merge-aware", prefetch="on")
    engine.scheduler, _ = paired_scheduler()
    simulate(engine, clock, 2.0)
    snap, summary = engine.snapshot(), engine.summary()
    assert summary.prefetches > 0 and summary.reordered_batches > 0, summary.to_dict()
    for key in ("order", "reordered_batches", "prefetch", "prefetches", "prefetch_misses"):
        assert getattr(snap, key) == getattr(summary, key), key
    assert snap.order == "merge-aware" and snap.prefetch is True
    served = json.loads(json.dumps(snap.to_dict()))
    assert served["order"] == "merge-aware" and served["prefetches"] == summary.prefetches
    assert served["prefetch_misses"] == summary.prefetch_misses and served["prefetch"] is True
    assert RunSnapshot.from_dict(served).to_dict() == served
    # Per model, the bytes copied ahead are there too (as in the summary).
    assert {n: m.prefetched_bytes for n, m in snap.models.items()} == \
        {n: m.prefetched_bytes for n, m in summary.models.items()}
    engine.scheduler.release()


def test_a_snapshot_from_an_older_runtime_reads_with_no_order_and_no_prefetch():
    back = RunSnapshot.from_dict({"state": "running", "elapsed_s": 1.0})
    assert back.order is None and back.prefetch is False and back.prefetches == back.prefetch_misses == 0
    assert back.reordered_batches == 0 and back.extra == {}
    positional = RunSnapshot("b", "merged", "torch", "cpu", "belady", "running", None, 1.0, [], {}, MemoryReport())
    assert json.loads(json.dumps(positional.to_dict()))["prefetches"] == 0


# --- 4. a summary claims no prefetch unless told ---------------------------------------------


def test_a_summary_built_without_saying_claims_no_prefetch(loaded):  # noqa: F811
    summary = RunSummary(bundle="b", backend="torch", device="cpu", policy="merged", budget_bytes=None,
                         elapsed_s=1.0, stopped="duration", last_error=None, streams=[], models={},
                         memory=SummaryMemory())
    assert summary.prefetch is False and summary.to_dict()["prefetch"] is False
    # The engine says so either way.
    for prefetch in ("on", "off"):
        engine, _, _ = fake_engine(loaded, [(30, ["color"])], {"color": linear(3, 1)}, prefetch=prefetch)
        assert engine.summary().prefetch is (prefetch == "on") is engine.snapshot().prefetch


# --- 5. one way to start a copy ------------------------------------------------------------


def test_a_deferred_load_and_a_prefetch_start_their_copy_the_same_way(monkeypatch):
    calls = []
    real = ModelScheduler._start_copy

    def spy(self, name, missing, need, *args):
        calls.append((name, need))
        return real(self, name, missing, need, *args)

    monkeypatch.setattr(ModelScheduler, "_start_copy", spy)
    sched = paired("merged", 2 * MIB + 16 * 1024)
    state, pending = sched.acquire_deferred("color", ["head", "body"])
    assert state["body"] is None and pending is not None
    assert sched.resident_bytes == sched.peak_resident_bytes == sched.stats["color"].bytes
    sched.finish(pending)
    assert sched.is_resident("color") and sched.stats["color"].prefetched_bytes == 0
    assert sched.prefetch("size", "color")
    assert sched.stats["size"].prefetched_bytes == sched.stats["size"].bytes and sched.prefetches == 1
    sched.acquire("size")
    assert calls == [("color", sched.stats["color"].bytes), ("size", sched.stats["size"].bytes)]
    assert sched.peak_resident_bytes <= sched.budget and torch.equal(sched.resident_state("size")["body"],
                                                                     torch.zeros(MIB // 4))
