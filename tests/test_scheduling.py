"""The runtime's scheduling, driven without the wall clock: the batch planner on invented
frames and estimates, and the engine on a fake clock whose model runs cost what the test says
(so nothing here depends on how busy the machine is), then invariants of real runs."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gemel_studio.runtime import load_bundle
from gemel_studio.runtime.batching import BatchPlanner, Job, LatencyEstimates, profile_latency
from gemel_studio.runtime.engine import Engine
from gemel_studio.runtime.scheduler import POLICIES, ModelScheduler
from gemel_studio.runtime.sinks import JsonlSink
from gemel_studio.runtime.sources import SyntheticSource

from .test_bundle import bundle, merged  # noqa: F401  (fixtures)

MS = 1e-3


# --- the planner alone ---------------------------------------------------------------------


def test_a_batch_never_includes_a_frame_that_cannot_meet_its_deadline():
    rng = random.Random(0)
    models = ["a", "b", "c"]
    for trial in range(300):
        est = LatencyEstimates()
        for m in models:
            one = rng.uniform(1, 20) * MS
            for b in (1, 2, 4, 8):
                est.observe(m, b, one * (0.5 + 0.5 * b) * rng.uniform(0.9, 1.1))
        planner = BatchPlanner(est, {m: rng.choice([1, 2, 4, 8, 16]) for m in models})
        now = 100.0
        waiting = []
        for i in range(rng.randint(1, 12)):
            chain = rng.sample(models, rng.randint(1, 3))
            ts = now - rng.uniform(0, 0.05)
            job = Job(rng.randrange(4), i, ts, ts + rng.uniform(0.005, 0.12), None, chain,
                      step=rng.randrange(len(chain)))
            waiting.append(job)
        loads = {m: rng.choice([0.0, rng.uniform(0, 10) * MS]) for m in models}
        usage = [rng.uniform(0, 1) for _ in range(4)]
        batch, drop = planner.plan(now, waiting, usage, loads.get)
        assert not set(map(id, batch)) & set(map(id, drop))
        for j in drop:  # dropped: could not make it even alone
            assert now + loads[j.model] + est.run(j.model, 1) + planner.rest(j) > j.deadline
        if batch:
            m = batch[0].model
            assert all(j.model == m for j in batch) and len(batch) <= planner.max_batch[m]
            for j in batch:  # every frame in the batch still meets its deadline, the batch's time included
                assert now + loads[m] + est.run(m, len(batch)) + planner.rest(j) <= j.deadline
        else:
            assert len(drop) == len(waiting)


def test_the_estimates_interpolate_between_measured_batch_sizes():
    est = LatencyEstimates()
    assert est.run("m", 4) == 0.0 and est.load(10**6) == 0.0  # unknown: no frame is dropped on a guess
    est.observe("m", 1, 0.010)
    est.observe("m", 4, 0.016)
    assert est.run("m", 2) == pytest.approx(0.012) and est.run("m", 8) == pytest.approx(0.032)
    est.observe("m", 1, 0.020)  # the median of the recent runs
    assert 0.010 < est.run("m", 1) < 0.020
    est.observe_load(10**6, 0.001)
    assert est.load(2 * 10**6) == pytest.approx(0.002)


# --- the engine on a fake clock ------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(bundle):  # noqa: F811
    with load_bundle(bundle[1]) as b:
        yield b


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def fake_engine(loaded, streams, costs, policy="unlimited", budget=None, max_batch=16, load_s_per_mib=0.0,
                **kwargs):
    """An engine whose model runs take `costs[m](batch)` seconds of a fake clock (and loads
    `load_s_per_mib` per MiB); residency goes through the real scheduler."""
    sources = [(SyntheticSource(fps=fps, size=(16, 16)), models) for fps, models in streams]
    engine = Engine(loaded, sources, policy, budget, "cpu", **kwargs)
    clock = FakeClock()
    engine.clock = clock
    runs = []

    def fake_run(m, x, future=None):
        # The fake clock hides a prefetch's load entirely (it overlapped the run before): what a
        # pending prefetch brings is filed first, and only what is still missing then costs time.
        engine.scheduler.settle_prefetch(m)
        missing = engine.scheduler.missing_bytes(m)
        engine.scheduler.acquire(m, future)
        engine._start_prefetch(m, future)
        clock.t += missing / 2**20 * load_s_per_mib + costs[m](int(x.shape[0]))
        runs.append((m, int(x.shape[0])))
        return torch.zeros(int(x.shape[0]), 4)

    engine._run_model = fake_run
    for m in costs:
        for b in (1, 2, 4, 8, 16):
            engine.estimates.observe(m, b, costs[m](b), replace=True)
        engine.max_batch[m] = max_batch
    if load_s_per_mib:
        engine.estimates.load_rate = 2**20 / load_s_per_mib
    return engine, clock, runs


def arrive_and_step(engine, clock, frame, due: list[float]) -> None:
    """One turn of the worker on the fake clock: the frames due by now arrive at each stream
    (`due`: each stream's next arrival, moved on), then one batch runs, or the clock jumps to
    the next arrival when there is nothing to run."""
    for i, s in enumerate(engine.stats):
        while due[i] <= clock.t:
            index = s.frames_in
            s.frames_in += 1
            engine._admit((i, index, due[i], frame))
            due[i] += 1.0 / s.fps
    if not engine.step():
        clock.t = max(clock.t, min(due))


def simulate(engine, clock, duration_s: float, started: list | None = None):
    """Frames arrive at each stream's rate on the fake clock; the engine plans and runs batches
    between arrivals, as its worker does."""
    frame = torch.rand(3, 16, 16)
    due = [clock.t] * len(engine.stats)
    end = clock.t + duration_s
    real_run_batch = engine._run_batch

    def run_batch(batch):
        if started is not None:
            started.extend((clock.t, j) for j in batch)
        real_run_batch(batch)

    engine._run_batch = run_batch
    while clock.t < end:
        arrive_and_step(engine, clock, frame, due)
    engine._drain()
    for s in engine.stats:
        assert s.frames_in == s.processed + s.dropped, s
    return [s.processed / s.frames_in for s in engine.stats]


def linear(one_ms: float, each_ms: float):
    return lambda b: (one_ms + each_ms * (b - 1)) * MS


def test_under_overload_streams_get_a_fair_share_and_no_compute_goes_to_late_frames(loaded):
    # Four streams at 30 fps, one model each, 15 ms a frame: twice what the worker can do.
    names = ["color", "shape", "size", "spare"]
    costs = {m: linear(15, 15) for m in names}
    engine, clock, runs = fake_engine(loaded, [(30, [m]) for m in names], costs)
    started = []
    fractions = simulate(engine, clock, 10.0, started)
    assert 0.4 < sum(fractions) / 4 < 0.6
    assert min(fractions) >= 0.8 * max(fractions), fractions  # the stated factor: within 1.25x
    # Nothing ran that was late when it started, and the estimates being exact, every frame that
    # got compute was processed: none was wasted.
    assert all(t <= j.deadline for t, j in started)
    assert len(started) == sum(s.processed for s in engine.stats)


def test_a_cheap_stream_keeps_its_frames_beside_an_expensive_one(loaded):
    # The expensive stream (40 ms a frame, more than its 33 ms interval) is served at the rate it
    # can be, and the cheap one is not starved by it. (Runs are not preempted and arrivals not
    # predicted: a cheap frame arriving early in a 40 ms run misses its 33 ms deadline.)
    costs = {"color": linear(5, 5), "shape": linear(40, 40)}
    engine, clock, runs = fake_engine(loaded, [(30, ["color"]), (30, ["shape"])], costs)
    cheap, slow = simulate(engine, clock, 10.0)
    assert cheap >= 0.7 and slow > 0.4 and min(cheap, slow) >= 0.6 * max(cheap, slow), (cheap, slow)
    # Max-min in compute: the cheap stream had less compute than the expensive one, all it could use.
    assert engine.stats[0].compute_s < engine.stats[1].compute_s
    s = engine.stats[1]
    assert s.processed > 0 and max(s.latencies) <= 2 * 0.040 + 1e-9  # its stretched deadline
    # Latest frame first: frames not started were replaced by newer ones, never run late.
    assert s.dropped_late > 0 and s.dropped_error == 0


def test_a_stream_whose_models_are_too_slow_is_served_rather_than_starved(loaded):
    # Two 224x224-like models of 30 ms each on a 33 ms deadline: no frame can make 33 ms.
    costs = {"color": linear(30, 30), "shape": linear(30, 30)}
    engine, clock, runs = fake_engine(loaded, [(30, ["color", "shape"])], costs)
    (fraction,) = simulate(engine, clock, 10.0)
    assert fraction > 0.2, fraction
    assert engine.stream_deadline(0) == pytest.approx(2 * 0.060)


def test_frames_waiting_for_the_same_model_run_as_one_batch_and_meet_their_deadlines(loaded):
    # Two streams on one model at 60 fps, 100 ms deadline; a batch costs 10 ms + 5 ms a frame.
    costs = {"color": linear(15, 5)}
    streams = [(60, ["color"]), (60, ["color"])]
    batched, clock, runs = fake_engine(loaded, streams, costs, deadline_s=0.1)
    started = []
    with_batches = simulate(batched, clock, 5.0, started)
    alone, clock2, runs2 = fake_engine(loaded, streams, costs, deadline_s=0.1, max_batch=1)
    without = simulate(alone, clock2, 5.0)
    assert sum(with_batches) > 1.9 and sum(without) < 1.6, (with_batches, without)
    sizes = [b for _, b in runs]
    assert max(sizes) > 1 and max(sizes) <= 16 and {b for _, b in runs2} == {1}
    model = batched.summary().models["color"]
    assert model.mean_batch_size > 1 and model.batches == len(runs)
    assert all(t <= j.deadline for t, j in started)
    assert all(lat <= 0.1 for s in batched.stats for lat in s.latencies)


@pytest.mark.parametrize("policy", POLICIES)
def test_with_batching_the_budget_holds_and_every_frame_is_counted_once(loaded, policy):
    names = ["color", "shape", "size", "spare"]
    one = max(ModelScheduler.for_bundle(loaded, [n], "time-sharing", 10**12).stats[n].bytes for n in names)
    rng = random.Random(policy)
    for trial in range(4):
        budget = rng.randint(one, 3 * one)
        streams = [(rng.choice([10, 30, 60]), rng.sample(names, rng.randint(1, 2))) for _ in range(rng.randint(2, 5))]
        costs = {m: linear(rng.uniform(2, 12), rng.uniform(0.5, 6)) for m in names}
        engine, clock, runs = fake_engine(loaded, streams, costs, policy, None if policy == "unlimited" else budget,
                                          max_batch=rng.choice([1, 4, 16]), load_s_per_mib=rng.choice([0, 0.0002]),
                                          deadline_s=rng.choice([None, 0.05, 0.2]),
                                          prefetch=rng.choice(["on", "off"]))
        sched = engine.scheduler
        real_acquire = sched.acquire

        def checked(name, future=None):
            state = real_acquire(name, future)
            if policy != "unlimited":
                assert sched.resident_bytes <= budget and sched.peak_resident_bytes <= budget
            return state

        sched.acquire = checked
        simulate(engine, clock, 2.0)
        assert runs, "nothing ran"


def test_a_real_overloaded_run_never_starts_a_late_frame(loaded):
    """Real models and the wall clock; only what holds however busy the machine is: nothing
    starts on a frame already past its deadline, every frame is counted once, the budget holds."""
    names = ["color", "shape", "size"]
    budget = max(ModelScheduler.for_bundle(loaded, [n], "time-sharing", 10**12).stats[n].bytes for n in names)
    streams = [(SyntheticSource(fps=200, size=(16, 16), seed=i), [names[i % 3]]) for i in range(4)]
    engine = Engine(loaded, streams, "time-sharing", budget, "cpu")
    late_starts = []
    real_run_batch = engine._run_batch

    def run_batch(batch):
        now = engine.clock()
        late_starts.extend(j for j in batch if now > j.deadline)
        real_run_batch(batch)

    engine._run_batch = run_batch
    summary = engine.run(1.5)
    assert not late_starts
    for s in summary.streams:
        assert s.frames_in == s.processed + s.dropped
    assert summary.memory.runtime_peak_resident_bytes <= budget
    assert all(m.max_batch >= 1 and m.profile_ms for m in summary.models.values() if m.name in names)


def test_the_profile_leaves_the_counters_and_residency_as_they_were(loaded):
    engine = Engine(loaded, [(SyntheticSource(fps=30, size=(16, 16)), ["color", "shape"])], "merged", 10**9, "cpu")
    engine.profile_batches()
    assert engine.scheduler.resident_bytes == 0
    assert all(s.swaps == 0 and s.runs == 0 for s in engine.scheduler.stats.values())
    assert set(engine.profile) == {"color", "shape"} and all("1" in row for row in engine.profile.values())
    assert engine.estimates.run("color", 1) > 0


def test_the_profile_runs_every_batch_size_up_to_the_largest_it_keeps():
    """Sizes the profile does not time (3, 5, 6, 7 under a largest of 8) are run once at start,
    so that no batch shape is new in the middle of a run; nothing past the largest is."""
    ran = []
    now = [0.0]

    def run(b):  # a batch costs 10 ms a frame on the fake clock: 16 frames pass the 100 ms deadline
        ran.append(b)
        now[0] += 0.010 * b

    best, row = profile_latency(run, LatencyEstimates(), "m", longest_s=0.1, clock=lambda: now[0])
    assert best == 8 and set(row) == {"1", "2", "4", "8", "16"}
    assert set(ran) == set(range(1, 9)) | {16}
    assert all(ran.count(b) == 1 for b in (3, 5, 6, 7))


# --- results sinks -------------------------------------------------------------------------


def test_the_jsonl_sink_appends_flushes_and_rotates(tmp_path):
    path = tmp_path / "r.jsonl"
    sink = JsonlSink(path, max_bytes=400, backups=2)
    records = [{"stream": "s", "frame": i, "timestamp": 1.0 + i, "models": {"m": {"labels": ["x"], "scores": [0.5]}}}
               for i in range(40)]
    for r in records:
        sink.write(r)
        assert path.read_text().endswith("\n")  # flushed line by line
    sink.close()
    files = [path.with_name("r.jsonl.2"), path.with_name("r.jsonl.1"), path]
    assert all(f.exists() for f in files) and not path.with_name("r.jsonl.3").exists()
    assert all(f.stat().st_size <= 400 for f in files) and sink.rotations > 2
    lines = [json.loads(x) for f in files for x in f.read_text().splitlines()]
    frames = [r["frame"] for r in lines]
    assert frames == sorted(frames) and frames[-1] == 39  # the newest kept, in order
    assert all("wall_time" in r for r in lines)


def test_results_to_standard_output(capsys):
    sink = JsonlSink("-")
    sink.write({"stream": "s", "frame": 0, "timestamp": 2.0, "models": {}})
    sink.close()
    assert json.loads(capsys.readouterr().out)["frame"] == 0
