"""Loads that overlap the previous model's run: while one model runs, what the next one lacks
is copied on the loader thread, counted against the budget from the start, and never at the
cost of a tensor the running model needs."""

from __future__ import annotations

import threading

import pytest
import torch

from gemel_studio.runtime import layered, scheduler as scheduler_module
from gemel_studio.runtime.engine import Engine
from gemel_studio.runtime.scheduler import ModelScheduler
from gemel_studio.runtime.sources import SyntheticSource

from .test_bundle import bundle, merged  # noqa: F401  (fixtures)
from .test_merge_order import paired
from .test_scheduling import loaded  # noqa: F401  (fixture)

MIB = 2**20


@pytest.mark.parametrize("policy", ["merged", "time-sharing"])
def test_a_prefetch_never_evicts_what_the_running_model_needs(policy):
    sched = paired(policy, 2 * MIB + 16 * 1024)  # room for two models' bodies, not three
    sched.acquire("color")
    running = sched.resident_state("color")
    assert sched.prefetch("size", "color")
    assert sched.resident_bytes <= sched.budget and sched.peak_resident_bytes <= sched.budget
    # Still copying, what is left counts as missing (size waits for it); once copied, nothing.
    assert sched.missing_bytes("size") <= sched.stats["size"].bytes
    sched._prefetch.join()
    assert sched.missing_bytes("size") == 0
    assert sched.resident_state("color")["body"] is running["body"]  # untouched while it runs
    state = sched.acquire("size")
    s = sched.stats["size"]
    assert s.swaps == 1 and s.loaded_bytes == s.prefetched_bytes == sched.stats["size"].bytes
    assert torch.equal(state["body"], torch.zeros(MIB // 4)) and sched.prefetch_misses == 0
    # No room for a third body without evicting the running model's: no prefetch at all.
    tight = paired(policy, MIB + 16 * 1024)
    tight.acquire("color")
    assert not tight.prefetch("size", "color") and tight.resident_bytes <= tight.budget
    assert tight.is_resident("color")


def test_a_prefetch_for_a_model_that_does_not_run_next_is_cancelled_or_filed_and_the_budget_holds():
    sched = paired("merged", 2 * MIB + 16 * 1024)
    sched.acquire("color")
    held = sched.resident_bytes
    assert sched.prefetch("size", "color")
    assert not sched.prefetch("spare", "color")  # one at a time
    sched.acquire("shape")  # the guess missed and shape shares nothing with size: cancelled, bytes freed
    assert sched.prefetch_misses == 1 and not sched.is_resident("size")
    assert sched.resident_bytes == held + 4096 and sched.stats["size"].prefetched_bytes == 0
    assert sched.prefetch("size", "shape")
    sched.acquire("spare")  # missed again, but spare shares size's body: filed, and only spare's own loads
    assert sched.prefetch_misses == 2 and sched.is_resident("size") and sched.is_resident("spare")
    assert sched.stats["spare"].loaded_bytes == 4096
    assert sched.peak_resident_bytes <= sched.budget
    sched.acquire("color")
    assert sched.prefetch("shape", "color") is False  # resident already: nothing to copy
    assert not paired("unlimited", None).prefetch("size", "color")  # everything resident already


def test_releasing_cancels_a_pending_prefetch():
    sched = paired("time-sharing", 2 * MIB + 16 * 1024)
    sched.acquire("color")
    assert sched.prefetch("size", "color")
    sched.release()
    assert sched.resident_bytes == 0 and not sched.is_resident("size") and sched.prefetch_misses == 0


def test_the_copy_runs_on_the_loader_thread_while_the_caller_goes_on(monkeypatch):
    release = threading.Event()
    entered = threading.Event()

    class SlowLoad(layered.PendingLoad):
        def _load(self, sources):
            entered.set()
            release.wait(timeout=30)
            super()._load(sources)

    monkeypatch.setattr(scheduler_module, "PendingLoad", SlowLoad)
    sched = paired("time-sharing", 2 * MIB + 16 * 1024)
    sched.acquire("color")
    assert sched.prefetch("size", "color")  # returned while the copy has not even started
    assert entered.wait(timeout=30) and not sched.is_resident("size")
    assert sched.is_resident("color")  # the running model keeps its tensors meanwhile
    release.set()
    sched.acquire("size")  # the guess was right: the copy under way is what size loads
    assert sched.is_resident("size") and sched.stats["size"].swaps == 1 and sched.prefetch_misses == 0
    assert sched.stats["size"].loaded_bytes == sched.stats["size"].prefetched_bytes > 0


def test_a_real_run_prefetches_within_the_budget_and_counts_every_frame(loaded):  # noqa: F811
    names = ["color", "shape", "spare"]  # time-sharing: room for any two of the three, never all
    one = {n: ModelScheduler.for_bundle(loaded, [n], "time-sharing", 10**12).stats[n].bytes for n in names}
    budget = sum(one.values()) - min(one.values()) + 1000
    # Sources that end (the run lasts as long as their frames, however fast the box is).
    streams = [(SyntheticSource(fps=30, size=(16, 16), frames=30, seed=i), [n]) for i, n in enumerate(names)]
    engine = Engine(loaded, streams, "time-sharing", budget, "cpu", deadline_s=0.5, prefetch="on")
    sched = engine.scheduler
    real = sched.prefetch
    held = []

    def checked(name, running, future=None):
        started = real(name, running, future)
        held.append((sched.resident_bytes, sched.is_resident(running)))
        return started

    sched.prefetch = checked
    summary = engine.run()
    for s in summary.streams:
        assert s.frames_in == s.processed + s.dropped
    assert summary.memory.runtime_peak_resident_bytes <= budget
    assert held and all(b <= budget and kept for b, kept in held)
    assert summary.prefetch and summary.prefetches > 0, summary.to_dict()
    assert summary.prefetch_misses <= summary.prefetches
    assert sum(m.prefetched_bytes for m in summary.models.values()) > 0
    # What a prefetch copied ahead is part of what was loaded; one let go at the end is not.
    assert all(m.prefetched_bytes <= m.loaded_bytes for m in summary.models.values()), summary.to_dict()


def test_prefetch_is_on_by_default_on_cuda_only(loaded):  # noqa: F811
    streams = [(SyntheticSource(fps=30, size=(16, 16)), ["color"])]
    assert not Engine(loaded, streams, "unlimited", None, "cpu").prefetch  # a copy would take a core
    assert Engine(loaded, streams, "unlimited", None, "cpu", prefetch="on").prefetch
    assert not Engine(loaded, streams, "unlimited", None, "cpu", prefetch="off").prefetch
