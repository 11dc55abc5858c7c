"""The merge-aware order on a fake clock: among the frames the fair rule allows, the model
with the fewest bytes left to load runs first, so models that share layers run back to back
and the shared layers load once; no stream is starved."""

from __future__ import annotations

import pytest
import torch

from gemel_studio.runtime.batching import BatchPlanner, Job, LatencyEstimates
from gemel_studio.runtime.scheduler import ModelScheduler

from .test_bundle import bundle, merged  # noqa: F401  (fixtures)
from .test_scheduling import MS, fake_engine, linear, loaded, simulate  # noqa: F401  (fixtures)

MIB = 2**20


def paired(policy: str, budget: int | None) -> ModelScheduler:
    """Two pairs of models: color and shape share a 1 MiB tensor, size and spare another; each
    model has 4 KiB of its own."""
    names = ("color", "shape", "size", "spare")
    big = {k: torch.zeros(MIB // 4) for k in ("A", "B")}
    own = {f"own.{m}": torch.zeros(1024) for m in names}
    maps = {m: {"body": "A" if m in ("color", "shape") else "B", "head": f"own.{m}"} for m in names}
    return ModelScheduler({**big, **own}, maps, policy, budget, "cpu")


def paired_scheduler(policy="merged"):
    """`paired` with a budget that holds one of the big tensors, not two."""
    budget = MIB + 4 * 4096 + 1000
    return paired(policy, budget), budget


def run_paired(loaded, order):  # noqa: F811
    # The streams' order alternates the pairs, so the fair rule's turns alternate them too.
    streams = [(30, ["color"]), (30, ["size"]), (30, ["shape"]), (30, ["spare"])]
    costs = {m: linear(3, 1) for m in ("color", "shape", "size", "spare")}
    engine, clock, runs = fake_engine(loaded, streams, costs, "merged", 10**9, load_s_per_mib=0.005, order=order)
    engine.scheduler, budget = paired_scheduler()
    assert engine.planner.order == order  # from RunOptions.order
    fractions = simulate(engine, clock, 5.0)
    sched = engine.scheduler
    assert sched.peak_resident_bytes <= budget
    return fractions, sum(s.loaded_bytes for s in sched.stats.values()), engine, runs


def test_models_sharing_layers_run_back_to_back_and_load_fewer_bytes(loaded):  # noqa: F811
    fair, fair_bytes, _, fair_runs = run_paired(loaded, "fair")
    aware, aware_bytes, engine, runs = run_paired(loaded, "merge-aware")
    assert aware_bytes < 0.75 * fair_bytes, (fair_bytes, aware_bytes)
    assert engine.planner.reordered > 0
    # Every stream still served, none starved: the worst within 1.25x of the best, and no
    # worse off than under the fair order.
    assert min(aware) >= 0.8 * max(aware), aware
    assert min(aware) >= min(fair) - 0.02, (fair, aware)


def planner_case(order="merge-aware"):
    est = LatencyEstimates()
    for m in ("a", "b"):
        est.observe(m, 1, 5 * MS)
    return BatchPlanner(est, {"a": 4, "b": 4}, order)


def test_the_fair_choice_keeps_its_turn_when_its_stream_is_too_far_behind_or_would_lose_its_frame():
    now = 10.0
    lead = Job(0, 0, now, now + 0.100, None, ["a"])  # stream 0 has had the least compute; a must load
    other = Job(1, 0, now, now + 0.100, None, ["b"])  # b is resident
    load = {"a": 10 * MS, "b": 0.0}.get
    missing = {"a": 4 * MIB, "b": 0}.get
    # Within one of the lead's runs (10 ms load + 5 ms run) in compute: the resident model first.
    planner = planner_case()
    batch, _ = planner.plan(now, [lead, other], [0.0, 0.010], load, missing)
    assert batch == [other] and planner.reordered == 1
    # The fair order alone, or no residency figures: the lead.
    assert planner_case("fair").plan(now, [lead, other], [0.0, 0.010], load, missing)[0] == [lead]
    assert planner_case().plan(now, [lead, other], [0.0, 0.010], load)[0] == [lead]
    # Its stream more than one of the lead's runs ahead: the lead's turn (no stream starves).
    assert planner_case().plan(now, [lead, other], [0.0, 0.016], load, missing)[0] == [lead]
    # The lead would miss its deadline behind the other's run: the lead.
    tight = Job(0, 0, now, now + 0.022, None, ["a"])
    assert planner_case().plan(now, [tight, other], [0.0, 0.0], load, missing)[0] == [tight]
    # The lead's model resident already: nothing to gain, the lead.
    assert planner_case().plan(now, [lead, other], [0.0, 0.0], load, {"a": 0, "b": 0}.get)[0] == [lead]


def test_an_unknown_order_is_refused_with_the_flag_that_fixes_it():
    from gemel_studio.errors import GemelError
    from gemel_studio.runtime.options import RunOptions
    from gemel_studio.options import validate

    with pytest.raises(GemelError, match="order"):
        validate(RunOptions, {"order": "random"})
    assert RunOptions().order == "merge-aware"


def test_the_order_and_prefetch_are_flags_of_gemel_run():
    import argparse

    from gemel_studio.options import add_arguments, from_args
    from gemel_studio.runtime.options import RunOptions

    parser = argparse.ArgumentParser()
    add_arguments(parser, RunOptions)
    options = from_args(RunOptions, parser.parse_args(["--order", "fair", "--prefetch", "on"]))
    assert options.order == "fair" and options.prefetch == "on"
    assert from_args(RunOptions, parser.parse_args([])) == RunOptions()


def test_a_stream_whose_model_loads_slowly_is_not_passed_over_for_ever():
    # b must load for 0.5 s, a is resident and cheap; the shares of compute decay, so b's stream
    # can stay within one of its loads of a's for ever: the order may move it back, not skip it.
    est = LatencyEstimates()
    est.observe("a", 1, 1 * MS)
    est.observe("b", 1, 1 * MS)
    planner = BatchPlanner(est, {"a": 1, "b": 1}, "merge-aware")
    load = {"a": 0.0, "b": 0.5}.get
    missing = {"a": 0, "b": MIB}.get
    now, first_passed, served_b = 100.0, None, None
    while now < 103.0 and served_b is None:
        waiting = [Job(0, 0, now, now + 5.0, None, ["a"]), Job(1, 0, now - 0.01, now + 5.0, None, ["b"])]
        (job,), _ = planner.plan(now, waiting, [0.2, 0.0], load, missing)  # b's stream has had less
        if job.model == "a":
            first_passed = now if first_passed is None else first_passed
        else:
            served_b = now
        now += 0.05
    assert first_passed == 100.0 and served_b is not None
    assert served_b - first_passed <= 0.501 + 0.05, served_b - first_passed
    # Served, it starts afresh: the next time b's load waits again, it may be moved back again.
    waiting = [Job(0, 1, now, now + 5.0, None, ["a"]), Job(1, 1, now, now + 5.0, None, ["b"])]
    assert planner.plan(now, waiting, [0.2, 0.0], load, missing)[0][0].model == "a"
    # A guess (commit=False) leaves no trace.
    before = (planner.reordered, dict(planner._passed_since))
    planner.plan(now + 1.0, waiting, [0.2, 0.0], load, missing, commit=False)
    assert (planner.reordered, planner._passed_since) == before
