"""The runtime recovers when the machine gets fast again, and starves no stream while it is
slow: the latency estimates follow the current run time (not a history inflated by slow
runs), and compute is shared on what streams had recently. Synthetic timings and a fake clock
only, so nothing here depends on how busy the machine is."""

from __future__ import annotations

import pytest
import torch

from gemel_studio.runtime import load_bundle
from gemel_studio.runtime.batching import BatchPlanner, Job, LatencyEstimates

from .test_bundle import bundle, merged  # noqa: F401  (fixtures)
from .test_scheduling import MS, arrive_and_step, fake_engine

# --- the estimates and the planner ---------------------------------------------------------


def test_after_a_burst_of_slow_runs_a_few_fast_ones_bring_the_estimate_back():
    est = LatencyEstimates()
    est.observe("m", 1, 10 * MS, replace=True)  # the profile
    est.observe("m", 1, 900 * MS)  # one slow run (a swap, the machine busy for a moment) ...
    assert est.run("m", 1) < 500 * MS  # ... is not what a run costs now
    for _ in range(50):  # the machine slow for a while: the estimate follows it
        est.observe("m", 1, 600 * MS)
    assert est.run("m", 1) == pytest.approx(600 * MS)
    for _ in range(est.window // 2 + 1):  # fast again: half a window of fast runs is enough
        est.observe("m", 1, 10 * MS)
    assert est.run("m", 1) == pytest.approx(10 * MS)


def test_the_load_rate_follows_the_current_loads_too():
    est = LatencyEstimates()
    for _ in range(20):
        est.observe_load(10**6, 1.0)  # 1 MB/s, slow
    for _ in range(est.window // 2 + 1):
        est.observe_load(10**6, 0.001)
    assert est.load(10**6) == pytest.approx(0.001)


def test_the_planner_admits_frames_again_once_runs_are_fast():
    est = LatencyEstimates()
    planner = BatchPlanner(est, {"m": 4})
    now = 100.0

    def frame():  # a fresh frame with a 33 ms deadline
        return Job(0, 0, now, now + 33 * MS, None, ["m"])

    for _ in range(30):
        est.observe("m", 1, 500 * MS)
    batch, drop = planner.plan(now, [frame()], [0.0])
    assert not batch and len(drop) == 1  # 500 ms a run: a 33 ms frame cannot make it
    for _ in range(3):
        est.observe("m", 1, 8 * MS)
    batch, drop = planner.plan(now, [frame()], [0.0])
    assert len(batch) == 1 and not drop


def test_a_frame_due_sooner_jumps_the_queue_only_while_its_stream_is_not_far_ahead():
    est = LatencyEstimates()
    est.observe("slow", 1, 400 * MS)
    est.observe("fast", 1, 200 * MS)
    planner = BatchPlanner(est, {"slow": 1, "fast": 1})
    now = 10.0
    lead = Job(0, 0, now, now + 0.85, None, ["slow"])  # least compute; slack for the other first
    soon = Job(1, 0, now, now + 0.4, None, ["fast"])  # due sooner: lost by waiting for the lead
    batch, _ = planner.plan(now, [lead, soon], [0.0, 0.1])
    assert batch == [soon]
    # The sooner stream far ahead in compute (it jumped the queue every time, the lead's frame
    # being replaced by a newer one with fresh slack): the lead runs.
    batch, _ = planner.plan(now, [lead, soon], [0.0, 5.0])
    assert batch == [lead]


# --- the engine on a fake clock ------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(bundle):  # noqa: F811
    with load_bundle(bundle[1]) as b:
        yield b


def test_the_engine_recovers_after_the_machine_was_slow_and_starves_no_stream_meanwhile(loaded):
    # Four streams at 30 fps, one model each, about 60% of them served at the normal speed; then
    # every run takes 20 times as long for 40 s (other work on the machine); then normal again.
    # The fake model runs are measured as the engine measures real ones.
    names = ["color", "shape", "size", "spare"]
    base = {"color": 13, "shape": 21, "size": 11, "spare": 10}
    slow = {"factor": 1.0}
    costs = {m: (lambda b, m=m: base[m] * MS * (0.6 + 0.4 * b) * slow["factor"]) for m in names}
    engine, clock, runs = fake_engine(loaded, [(30, [m]) for m in names], costs, max_batch=4)
    fake_run = engine._run_model

    def measured_run(m, x, future=None):
        start = clock.t
        out = fake_run(m, x, future)
        engine.estimates.observe(m, int(x.shape[0]), clock.t - start)
        return out

    engine._run_model = measured_run
    frame = torch.rand(3, 16, 16)
    due = [clock.t] * len(names)
    t0 = clock.t
    marks = {0.0: [(0, 0)] * len(names)}

    def until(t: float):
        while clock.t < t0 + t:
            arrive_and_step(engine, clock, frame, due)
        marks[t] = [(s.frames_in, s.processed) for s in engine.stats]

    def fractions(a: float, b: float) -> list[float]:
        return [(pb - pa) / (fb - fa) for (fa, pa), (fb, pb) in zip(marks[a], marks[b])]

    until(10.0)
    slow["factor"] = 20.0
    slow_marks = [15.0 + 5.0 * k for k in range(8)]  # the estimates catch up by 15 s; slow until 50 s
    for t in slow_marks:
        until(t)
    slow["factor"] = 1.0
    until(55.0)  # the estimates catch up with the fast runs
    until(70.0)
    before, after = fractions(0.0, 10.0), fractions(55.0, 70.0)
    assert sum(before) / 4 > 0.5, before
    # Slow: fewer frames, but every stream gets some in every 5 s (none waits for the others
    # for as long as sooner frames keep coming).
    for a, b in zip(slow_marks, slow_marks[1:]):
        during = fractions(a, b)
        assert min(during) > 0.0 and min(during) >= 0.25 * max(during), (a, b, during)
    # Fast again: as many frames as before the slow spell, for every stream, within seconds
    # (no stream waits while the others catch up on the compute its slow runs were charged).
    assert sum(after) >= 0.95 * sum(before), (before, after)
    assert all(a >= 0.8 * b for a, b in zip(after, before)), (before, after)
    for m in names:
        assert engine.estimates.run(m, 1) == pytest.approx(costs[m](1))
    engine._drain()
    for s in engine.stats:
        assert s.frames_in == s.processed + s.dropped, s
