"""The edge runtime: frame sources, the memory-budgeted scheduler, the engine and `gemel run`."""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest
import torch

from gemel_studio.cli import main
from gemel_studio.errors import GemelError
from gemel_studio.progress import Progress
from gemel_studio.runtime import load_bundle
from gemel_studio.runtime.engine import Engine, run
from gemel_studio.runtime.options import RunOptions, parse_bytes
from gemel_studio.runtime.scheduler import POLICIES, ModelScheduler
from gemel_studio.runtime.sources import CameraSource, SyntheticSource, VideoSource, parse_source
from gemel_studio.runtime.summary_text import format_run

# The small merged bundle of test_bundle (three resnet18s at 16x16 sharing layers, a mobilenet).
from .conftest import EDGE_BLOCKED, described_outputs, run_python_blocking
from .test_bundle import bundle, merged  # noqa: F401  (fixtures)


# --- the scheduler, on plain tensors ------------------------------------------------------------


def _workload(seed: int):
    """Stored tensors and models that share some of them: a backbone every 'r' model uses, a
    head two of them share, private tensors, and a model sharing nothing."""
    rng = random.Random(seed)
    tensors = {f"t{i}": torch.zeros(rng.randint(10, 400)) for i in range(30)}
    models = {
        "r1": {f"b{i}": f"t{i}" for i in range(10)} | {"h": "t10", "p": "t11"},
        "r2": {f"b{i}": f"t{i}" for i in range(10)} | {"h": "t10", "p": "t12"},
        "r3": {f"b{i}": f"t{i}" for i in range(8)} | {"p": "t13", "q": "t14"},
        "solo": {f"s{i}": f"t{i}" for i in range(15, 25)},
        "tied": {"a": "t25", "b": "t25", "c": "t26"},  # one tensor twice inside a model
    }
    return tensors, models


def _nbytes(tensors, keys) -> int:
    return sum(tensors[k].numel() * tensors[k].element_size() for k in set(keys))


@pytest.mark.parametrize("eviction", ["belady", "lru"])
@pytest.mark.parametrize("policy", POLICIES)
def test_the_scheduler_never_exceeds_its_budget(policy, eviction):
    for seed in range(40):
        tensors, models = _workload(seed)
        rng = random.Random(seed)
        largest = max(_nbytes(tensors, m.values()) for m in models.values())
        total = _nbytes(tensors, [k for m in models.values() for k in m.values()])
        budget = rng.randint(largest, total + largest)
        sched = ModelScheduler(tensors, models, policy, budget, eviction=eviction)
        for _ in range(300):
            name = rng.choice(list(models))
            future = [rng.choice(list(models)) for _ in range(rng.randint(0, 6))] if rng.random() < 0.7 else None
            if rng.random() < 0.5:  # layer-by-layer: bytes counted before the copy starts
                state, pending = sched.acquire_deferred(name, order=sorted(models[name]), future=future)
                if pending is not None:
                    assert policy == "unlimited" or sched.resident_bytes <= budget
                    sched.finish(pending)
            else:
                state = sched.acquire(name, future)
            if policy != "unlimited":
                assert sched.resident_bytes <= budget and sched.peak_resident_bytes <= budget
            if state is None:
                assert policy == "space-sharing" and name not in sched.static_set
                continue
            assert set(state) == set(models[name]) and sched.is_resident(name)
            assert sum(t.numel() * 4 for t in sched._resident.values()) == sched.resident_bytes
        if policy == "unlimited":
            assert sched.resident_bytes == total and all(s.swaps == 1 for s in sched.stats.values())


def test_merged_loads_fewer_bytes_than_time_sharing_when_models_share():
    tensors, models = _workload(1)
    models.pop("solo")
    budget = max(_nbytes(tensors, m.values()) for m in models.values())  # one model at a time, alone
    rng = random.Random(0)
    sequence = [rng.choice(list(models)) for _ in range(200)]
    loaded = {}
    for policy in ("merged", "time-sharing"):
        sched = ModelScheduler(tensors, models, policy, budget)
        for name in sequence:
            sched.acquire(name)
        loaded[policy] = sum(s.loaded_bytes for s in sched.stats.values())
        assert sum(s.swaps for s in sched.stats.values()) > 0
    assert loaded["merged"] < 0.5 * loaded["time-sharing"], loaded


def test_a_shared_tensor_is_resident_once_only_when_merged():
    tensors, models = _workload(2)
    shared = ModelScheduler(tensors, models, "merged", 10**9)
    apart = ModelScheduler(tensors, models, "time-sharing", 10**9)
    for s in (shared, apart):
        s.acquire("r1"), s.acquire("r2")
    assert shared.acquire("r1")["b0"] is shared.acquire("r2")["b0"]
    assert apart.acquire("r1")["b0"] is not apart.acquire("r2")["b0"]
    assert shared.resident_bytes < apart.resident_bytes
    # A copy, not the stored tensor: loading costs what it costs.
    assert shared.acquire("r1")["b0"].data_ptr() != tensors["t0"].data_ptr()


def test_a_model_larger_than_the_budget_is_refused_at_start():
    tensors, models = _workload(3)
    need = _nbytes(tensors, models["solo"].values())
    pattern = rf"model 'solo' needs .* MiB \({need} bytes\).*at least .* MiB \({need} bytes\)"
    with pytest.raises(GemelError, match=pattern) as info:
        ModelScheduler(tensors, {"solo": models["solo"]}, "merged", need - 1)
    assert "\n" not in str(info.value)
    with pytest.raises(GemelError, match="needs a memory budget"):
        ModelScheduler(tensors, models, "time-sharing", None)
    with pytest.raises(GemelError, match="policy 'fastest'"):
        ModelScheduler(tensors, models, "fastest", 10**6)


def _served(demand, static_set) -> float:
    return sum(fps for fps, ms in demand if set(ms) <= set(static_set))


def test_space_sharing_picks_the_set_that_serves_the_most_frames():
    # Built to show it: the model named first is big and serves one slow stream; two small ones
    # serve fast streams. Naming order keeps the big one; frames per byte keeps the two small ones.
    tensors = {"big": torch.zeros(100), "s1": torch.zeros(50), "s2": torch.zeros(50), "rare": torch.zeros(60)}
    models = {"big": {"w": "big"}, "rare": {"w": "rare"}, "s1": {"w": "s1"}, "s2": {"w": "s2"}}
    demand = [(10.0, ["big"]), (5.0, ["rare"]), (30.0, ["s1"]), (30.0, ["s2", "s1"])]
    budget = 100 * 4
    sched = ModelScheduler(tensors, models, "space-sharing", budget, demand=demand)
    naming, used = [], 0  # the old choice: in the order named, each if it still fits
    for n in models:
        if used + sched.stats[n].bytes <= budget:
            naming.append(n)
            used += sched.stats[n].bytes
    assert naming == ["big"] and sorted(sched.static_set) == ["s1", "s2"]
    assert _served(demand, sched.static_set) == 60.0 > _served(demand, naming) == 10.0
    assert sched.acquire("big") is None and sched.stats["big"].refused == 1
    assert sched.acquire("s1") is not None and sched.stats["s1"].swaps == 1
    # Never worse than naming order, on random cases.
    for seed in range(30):
        tensors, models = _workload(seed)
        rng = random.Random(seed)
        demand = [(rng.choice([1, 5, 30]), rng.sample(list(models), rng.randint(1, 2))) for _ in range(5)]
        largest = max(_nbytes(tensors, m.values()) for m in models.values())
        budget = rng.randint(largest, 3 * largest)
        sched = ModelScheduler(tensors, models, "space-sharing", budget, demand=demand)
        assert sched.resident_bytes <= budget
        naming, used = [], 0
        for n in models:
            if used + sched.stats[n].bytes <= budget:
                naming.append(n)
                used += sched.stats[n].bytes
        assert _served(demand, sched.static_set) >= _served(demand, naming), (seed, sched.static_set, naming)


@pytest.mark.parametrize("policy", ["time-sharing", "merged"])
def test_under_round_robin_the_new_eviction_reloads_fewer_times_than_lru(policy):
    # n models of equal size sharing nothing, room for k of them, requested round robin.
    n, k = 5, 3
    tensors = {f"t{i}": torch.zeros(100) for i in range(n)}
    models = {f"m{i}": {"w": f"t{i}"} for i in range(n)}
    sequence = [f"m{i % n}" for i in range(n * 40)]
    loads = {}
    for eviction, with_future in (("lru", False), ("belady", False), ("belady", True)):
        sched = ModelScheduler(tensors, models, policy, k * 400, eviction=eviction)
        for pos, name in enumerate(sequence):
            sched.acquire(name, future=sequence[pos + 1:pos + 1 + 2 * n] if with_future else None)
            assert sched.resident_bytes <= k * 400
        loads[(eviction, with_future)] = sum(s.swaps for s in sched.stats.values())
    assert loads[("lru", False)] == len(sequence)  # LRU evicts exactly the model needed next
    # MRU (no future known) and Belady (the future known) both keep k - 1 models across a round.
    assert loads[("belady", False)] < 0.6 * loads[("lru", False)], loads
    assert loads[("belady", True)] <= loads[("belady", False)], loads
    with pytest.raises(GemelError, match="eviction 'fifo'"):
        ModelScheduler(tensors, models, policy, k * 400, eviction="fifo")


@pytest.mark.parametrize("text,value", [("200MiB", 200 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("1024", 1024),
                                        ("64k", 65536), ("2 MB", 2_000_000)])
def test_memory_budgets_accept_suffixes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-5MiB", "0", "12XB"])
def test_a_bad_memory_budget_is_a_clear_error(text):
    with pytest.raises(GemelError, match="memory budget"):
        parse_bytes(text)


# --- sources ---------------------------------------------------------------------------------


def test_a_synthetic_source_delivers_frames_in_real_time():
    source = SyntheticSource(fps=50, size=(12, 20), seed=3, frames=10)
    start = time.monotonic()
    frames = list(source.frames())
    assert 0.15 <= time.monotonic() - start < 2.0  # ten frames at 50 fps: about 0.18 s
    assert len(frames) == 10 and source.end_reason == "ended"
    stamps = [t for t, _ in frames]
    assert stamps == sorted(stamps)
    frame = frames[0][1]
    assert frame.shape == (3, 12, 20) and frame.dtype == torch.float32 and 0 <= frame.min() <= frame.max() <= 1
    again = list(SyntheticSource(fps=50, size=(12, 20), seed=3, frames=2, realtime=False).frames())
    assert torch.equal(again[0][1], frame)  # seeded


def _write_video(path, frames: int = 30, fps: float = 30.0, size=(32, 24)):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        image = np.zeros((size[1], size[0], 3), np.uint8)
        image[:, :, 2] = 8 * i  # red rises (OpenCV writes BGR)
        writer.write(image)
    writer.release()
    return path


def test_a_video_decodes_at_its_frame_rate_as_rgb(tmp_path):
    path = _write_video(tmp_path / "clip.avi", frames=12, fps=25)
    source = VideoSource(path, realtime=False)
    frames = [f for _, f in source.frames()]
    assert source.fps == 25 and len(frames) == 12 and source.end_reason == "ended"
    assert frames[5].shape == (3, 24, 32) and frames[5][0].mean() > frames[5][2].mean() + 0.1  # red, as RGB
    looped = VideoSource(path, loop=True, realtime=False)
    got = 0
    for _ in looped.frames():
        got += 1
        if got == 30:
            looped.stop()
    assert got == 30 and looped.end_reason == "stopped"


def test_a_video_replays_at_another_frame_rate(tmp_path):
    path = _write_video(tmp_path / "clip.avi", frames=6, fps=10)
    source = VideoSource(path, realtime=False, fps=30)
    assert source.fps == 30 and source.file_fps == 10 and len(list(source.frames())) == 6
    with pytest.raises(GemelError, match="replay frame rate"):
        VideoSource(path, fps=0)


def test_broken_sources_end_with_a_reason_instead_of_raising(tmp_path):
    path = _write_video(tmp_path / "clip.avi")
    data = path.read_bytes()
    (tmp_path / "half.avi").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    half = VideoSource(tmp_path / "half.avi", realtime=False)
    assert len(list(half.frames())) < 30 and half.end_reason.startswith("truncated")
    junk = VideoSource(tmp_path / "junk.mp4", realtime=False)
    assert list(junk.frames()) == [] and junk.end_reason.startswith("unreadable")
    camera = CameraSource(63)
    assert list(camera.frames()) == [] and camera.end_reason.startswith("gone")


def test_source_specs_parse_or_fail_in_one_line(tmp_path):
    assert parse_source("synthetic").fps == 30 and parse_source("synthetic:7.5").fps == 7.5
    assert isinstance(parse_source("camera:2"), CameraSource)
    assert isinstance(parse_source(str(_write_video(tmp_path / "a.avi", frames=2))), VideoSource)
    for bad, why in [("synthetic:fast", "not a frame rate"), ("synthetic:0", "positive"),
                     ("camera:x", "not a camera index"), (str(tmp_path / "none.mp4"), "no such video file")]:
        with pytest.raises(GemelError, match=why):
            parse_source(bad)


# --- the engine, on the small bundle ----------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(bundle):  # noqa: F811
    with load_bundle(bundle[1]) as b:
        yield b


def _check_counts(summary):
    for s in summary.streams:
        assert s.frames_in == s.processed + s.dropped, s
        assert s.dropped == s.dropped_late + s.dropped_refused + s.dropped_error


def test_a_truncated_video_ends_its_stream_while_a_synthetic_stream_goes_on(loaded, tmp_path):
    path = _write_video(tmp_path / "clip.avi")
    data = path.read_bytes()
    (tmp_path / "half.avi").write_bytes(data[: len(data) // 2])
    streams = [(VideoSource(tmp_path / "half.avi"), ["size"]), (VideoSource(tmp_path / "gone.avi"), ["size"]),
               (SyntheticSource(fps=10, size=(16, 16), frames=12), ["size", "color"])]
    # Sources that end (no wall-clock duration) and a long deadline: no frame is given up for
    # lateness and the run lasts until every frame is through, however busy this machine is.
    summary = run(loaded, streams, policy="merged", budget_bytes=200 * 2**20, deadline_s=30.0)
    _check_counts(summary)
    video, gone, synthetic = summary.streams
    assert video.end_reason.startswith("truncated") and 0 < video.frames_in < 30, video
    assert gone.end_reason.startswith("unreadable") and gone.frames_in == 0, gone
    # It went on to its own end: every frame arrived and the worker ran its models.
    assert summary.stopped == "sources ended" and synthetic.end_reason == "ended", synthetic
    assert synthetic.frames_in == 12 and synthetic.processed >= 1 and summary.models["color"].runs > 0, synthetic
    json.dumps(summary.to_dict())


def test_the_engine_drops_frames_it_cannot_process_in_time_and_counts_them(loaded):
    # Time-sharing with room for one model: every frame swaps whole resnet18s in and out,
    # far slower than a frame every 5 ms.
    budget = max(ModelScheduler.for_bundle(loaded, [n], "time-sharing", 10**12).stats[n].bytes
                 for n in ("color", "shape", "size", "spare"))
    streams = [(SyntheticSource(fps=200, size=(16, 16), seed=1), ["color", "shape", "size"]),
               (SyntheticSource(fps=100, size=(16, 16), seed=2), ["spare"])]
    summary = run(loaded, streams, policy="time-sharing", budget_bytes=budget, duration_s=1.5)
    _check_counts(summary)
    first = summary.streams[0]
    assert first.frames_in > 100 and first.dropped > first.frames_in // 2
    # Swapped in and out, when the worker got to run it at all (a busy machine may leave no frame
    # fresh enough to start on).
    assert summary.models["color"].swaps <= summary.models["color"].runs
    assert summary.memory.runtime_peak_resident_bytes <= budget
    assert summary.memory.process_rss_bytes > 0 and "torch_allocated_bytes" not in summary.memory.to_dict()


def test_the_engine_stops_on_cancel_and_when_its_sources_end(loaded):
    progress = Progress()
    threading.Timer(0.5, progress.cancel).start()
    summary = run(loaded, [(SyntheticSource(fps=30, size=(16, 16)), [])], policy="unlimited", progress=progress)
    assert summary.stopped == "cancelled" and summary.elapsed_s < 3
    assert summary.streams[0].models == ["color", "shape", "size", "spare"]
    _check_counts(summary)
    summary = run(loaded, [(SyntheticSource(fps=4, size=(16, 16), frames=4), ["size"])], policy="unlimited")
    assert summary.stopped == "sources ended" and summary.streams[0].frames_in == 4
    assert summary.streams[0].processed >= 1 and summary.streams[0].latency_p99_ms is not None
    _check_counts(summary)


def test_space_sharing_drops_the_frames_of_models_it_does_not_hold(loaded):
    one = ModelScheduler.for_bundle(loaded, ["color"], "time-sharing", 10**12).stats["color"].bytes
    streams = [(SyntheticSource(fps=20, size=(16, 16), frames=10), ["color"]),
               (SyntheticSource(fps=20, size=(16, 16), frames=10), ["shape"])]
    summary = run(loaded, streams, policy="space-sharing", budget_bytes=int(one * 1.5))
    _check_counts(summary)
    assert summary.memory.static_set == ["color"]
    assert summary.streams[1].dropped_refused == 10 and summary.streams[1].processed == 0
    assert summary.models["shape"].refused == 10


def test_engine_input_errors_are_gemel_errors(loaded):
    with pytest.raises(GemelError, match="model 'nope' is not in the bundle"):
        Engine(loaded, [(SyntheticSource(), ["nope"])], "merged", 10**9)
    with pytest.raises(GemelError, match="more than the memory budget"):
        Engine(loaded, [(SyntheticSource(), ["color"])], "merged", 1000)
    with pytest.raises(GemelError, match="no streams"):
        Engine(loaded, [], "merged", 10**9)


def test_run_options_are_validated_once_with_one_line_errors(loaded):
    from gemel_studio.runtime.options import RunOptions

    options = RunOptions(policy="time-sharing", memory_budget="1.5MiB", deadline_ms=40, batching=False)
    assert options.memory_budget == int(1.5 * 2**20) and options.deadline_s == 0.04
    engine = Engine(loaded, [(SyntheticSource(), ["color"])], options.model_copy(update={"memory_budget": 10**9}))
    assert engine.scheduler.policy == "time-sharing" and engine.batching is False
    assert engine.stats[0].deadline_s == 0.04
    for bad, why in [({"memory_budget": "lots"}, "memory budget 'lots'"), ({"deadline_ms": -1}, "--deadline -1"),
                     ({"backend": "onnxruntime", "load": "layered"}, "needs the torch backend"),
                     ({"policy": "nope"}, "--policy 'nope'"), ({"threads": 0}, "--threads 0")]:
        from gemel_studio.options import validate

        with pytest.raises(GemelError, match=why) as err:
            validate(RunOptions, bad)
        assert "\n" not in str(err.value)


def test_a_run_infers_on_the_threads_it_was_given_and_gives_torch_its_own_setting_back(loaded, monkeypatch):
    import gemel_studio.runtime.engine as engine_module

    before = torch.get_num_threads()
    want = 2 if before == 1 else 1  # a count the process is not at already
    seen = {"profile": [], "frames": []}
    profile = engine_module.profile_engine
    monkeypatch.setattr(engine_module, "profile_engine",
                        lambda engine: (seen["profile"].append(torch.get_num_threads()), profile(engine)))

    class Threads:  # a result sink: the engine writes to it from the thread that runs the models
        def write(self, record):
            seen["frames"].append(torch.get_num_threads())

        def flush(self):
            pass

        def close(self):
            pass

    options = RunOptions(policy="unlimited", device="cpu", threads=want, deadline_ms=30000)
    engine = Engine(loaded, [(SyntheticSource(fps=20, size=(16, 16), frames=6), ["size"])], options, sinks=[Threads()])
    summary = engine.run()
    assert seen["profile"] == [want]  # the start's profile measured the run's own setting
    assert len(seen["frames"]) == summary.streams[0].processed >= 1 and set(seen["frames"]) == {want}
    assert torch.get_num_threads() == before  # given back when the run ended
    assert summary.threads == want and summary.to_dict()["threads"] == want
    assert f"{want} CPU thread(s)" in format_run(summary)
    # Without the option the run leaves torch's setting alone, and says what it was.
    summary = run(loaded, [(SyntheticSource(fps=20, size=(16, 16), frames=2), ["size"])], policy="unlimited",
                  deadline_s=30.0)
    assert summary.threads == before and torch.get_num_threads() == before


def test_the_engine_trims_when_nothing_is_waiting(loaded):
    from gemel_studio.runtime.heap import HeapTrimmer

    engine = Engine(loaded, [(SyntheticSource(fps=20, size=(16, 16), frames=4), ["size"])], "unlimited",
                    deadline_s=30.0)
    calls = []
    engine.heap = HeapTrimmer(every_s=0.0, trim=lambda pad: calls.append(pad) or 1)
    summary = engine.run()
    assert summary.stopped == "sources ended" and summary.streams[0].frames_in == 4
    # Idle at least once: the run ends only when nothing waits, and checks for that after a trim.
    assert calls and engine.heap.trims == len(calls)


def test_onnxruntime_sessions_take_the_runs_thread_count(loaded):
    engine = Engine(loaded, [(SyntheticSource(), ["color"])],
                    RunOptions(policy="unlimited", device="cpu", backend="onnxruntime", threads=1))
    state = engine.scheduler.acquire("color")
    engine._ort.prepare("color", state)
    assert engine._ort.sessions["color"].get_session_options().intra_op_num_threads == 1
    default = loaded.session_over("color", state)
    assert default.get_session_options().intra_op_num_threads == 0  # onnxruntime's own choice


def test_onnxruntime_sessions_take_torchs_count_by_default_so_the_count_shown_is_theirs(loaded, monkeypatch):
    made = []
    real = type(loaded).session_over
    monkeypatch.setattr(type(loaded), "session_over",
                        lambda self, *a, threads=None, **k: made.append(threads) or real(self, *a, threads=threads, **k))
    engine = Engine(loaded, [(SyntheticSource(fps=20, size=(16, 16), frames=3), ["color"])],
                    RunOptions(policy="unlimited", device="cpu", backend="onnxruntime", deadline_ms=30000))
    summary = engine.run()
    assert summary.streams[0].processed == 3
    # Every session (the profile's, the run's) was made with the count the summary shows.
    assert made and summary.threads is not None and set(made) == {summary.threads}
    assert summary.threads == torch.get_num_threads()


def test_a_stream_spec_reads_the_command_line_form():
    from gemel_studio.runtime.sources import StreamSpec

    spec = StreamSpec.parse("synthetic:12=color, size")
    assert spec == StreamSpec("synthetic:12", ("color", "size")) and str(spec) == "synthetic:12=color,size"
    assert StreamSpec.parse("camera:0").models == ()
    source, models = spec.stream(seed=3)
    assert isinstance(source, SyntheticSource) and source.fps == 12 and models == ["color", "size"]
    for text, why in [("=color", "name a source"), ("synthetic=", "no model names")]:
        with pytest.raises(GemelError, match=why):
            StreamSpec.parse(text)


def test_a_snapshot_round_trips_through_its_json(loaded):
    from gemel_studio.runtime.telemetry import RunSnapshot

    engine = Engine(loaded, [(SyntheticSource(size=(16, 16)), ["color", "size"])], "merged", 200 * 2**20, "cpu",
                    load="layered")
    engine.process_frame(torch.rand(3, 16, 16))
    snap = engine.snapshot()
    served = json.loads(json.dumps(snap.to_dict()))
    assert list(served) == ["bundle", "policy", "backend", "device", "eviction", "state", "last_error", "elapsed_s",
                            "streams", "models", "memory", "threads", "order", "reordered_batches", "prefetch",
                            "prefetches", "prefetch_misses"]
    assert served["order"] == "merge-aware" and served["prefetch"] is False  # prefetch: CUDA only by default
    assert served["threads"] is None  # known once run() has set them up
    assert served["streams"][0]["processed"] == snap.streams[0].processed == 1
    assert "torch_allocated_bytes" not in served["memory"] and served["memory"]["budget_bytes"] == 200 * 2**20
    assert RunSnapshot.from_dict(served).to_dict() == served
    # What an older runtime served (fewer keys) and what a newer one adds (kept as extra).
    old = {"state": "running", "elapsed_s": 3.0, "instance": "box-1",
           "streams": [{"name": "s", "frames_in": 4, "processed": 3, "dropped": 1}],
           "models": {"color": {"bytes": 10, "load_seconds": 0.5}}, "memory": {"runtime_resident_bytes": 7}}
    back = RunSnapshot.from_dict(old)
    assert back.streams[0].dropped_error == 0 and back.models["color"].name == "color"
    assert back.models["color"].load_wait_seconds == 0.5 and back.extra == {"instance": "box-1"}
    assert back.to_dict()["instance"] == "box-1" and back.dropped_totals() == (4, 1, 0, 0)
    assert back.threads is None and RunSnapshot.from_dict({**old, "threads": 2}).threads == 2
    summary = engine.summary().to_dict()
    assert list(summary["memory"])[:3] == ["budget_bytes", "all_models_bytes", "static_set"]


# --- gemel run -------------------------------------------------------------------------------


def test_gemel_run_prints_a_json_summary(bundle, capsys, tmp_path):  # noqa: F811
    # Videos that end and a long deadline: the run lasts until every frame is through, so what
    # it counts does not depend on how busy this machine is.
    first_clip = _write_video(tmp_path / "a.avi", frames=12, fps=10)
    second_clip = _write_video(tmp_path / "b.avi", frames=6, fps=5)
    rc = main(["run", str(bundle[1]), "--stream", f"{first_clip}=size,color", "--stream", f"{second_clip}=spare",
               "--memory-budget", "200MiB", "--deadline", "30000", "--json", "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    summary = json.loads(out)
    assert summary["stopped"] == "sources ended" and summary["policy"] == "merged" and summary["threads"] == 1
    assert summary["budget_bytes"] == 200 * 2**20 and summary["device"] == "cpu"
    first, second = summary["streams"]
    assert first["models"] == ["size", "color"] and second["models"] == ["spare"]
    assert (first["frames_in"], second["frames_in"]) == (12, 6) and summary["models"]["size"]["runs"] > 0, first
    assert first["frames_in"] == first["processed"] + first["dropped"]
    assert set(summary["models"]) == {"size", "color", "spare"}
    assert summary["memory"]["runtime_resident_bytes"] <= 200 * 2**20


def test_gemel_run_prints_a_table_without_json(bundle, capsys):  # noqa: F811
    rc = main(["run", str(bundle[1]), "--stream", "synthetic:10=size", "--policy", "unlimited", "--duration", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0 and "stopped: duration" in out and "runtime resident weights" in out and "synthetic:10" in out


@pytest.mark.parametrize("extra,why", [
    (["--stream", "synthetic=nope", "--policy", "unlimited"], "model 'nope' is not in the bundle"),
    (["--stream", "synthetic", "--memory-budget", "lots"], "memory budget 'lots'"),
    (["--stream", "synthetic", "--memory-budget", "1KiB"], "more than the memory budget"),
    (["--stream", "synthetic", "--policy", "unlimited", "--deadline", "0"], "--deadline 0"),
    (["--stream", "synthetic", "--results", "/proc/no/such/dir/r.jsonl"], "--results /proc"),
    (["--stream", "/no/such/video.mp4", "--policy", "unlimited"], "no such video file"),
    (["--stream", "synthetic", "--policy", "unlimited", "--duration", "0"], "--duration 0"),
    (["--stream", "synthetic=", "--policy", "unlimited", "--duration", "5"], "no model names"),
    (["--stream", "synthetic", "--policy", "unlimited", "--metrics-host", "0.0.0.0"], "without --metrics-port"),
])
def test_gemel_run_bad_input_is_one_line_and_exit_2(bundle, capsys, extra, why):  # noqa: F811
    assert main(["run", str(bundle[1]), *extra]) == 2
    err = capsys.readouterr().err
    assert why in err and err.count("\n") == 1


def test_gemel_run_flags_come_from_the_run_options():
    """One options model: the flags are RunOptions' fields, and building them imports no torch."""
    import subprocess
    import sys

    from gemel_studio.cli import build_parser
    from gemel_studio.options import from_args
    from gemel_studio.runtime.options import RunOptions

    args = build_parser().parse_args(["run", "b", "--stream", "synthetic", "--memory-budget", "64MiB", "--no-batching",
                                      "--deadline", "50", "--policy", "time-sharing"])
    assert from_args(RunOptions, args) == RunOptions(policy="time-sharing", memory_budget=64 * 2**20,
                                                     batching=False, deadline_ms=50)
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for flag in ("--backend {torch,onnxruntime}", "--device DEVICE", "--load {whole,layered}",
                 "--memory-budget BYTES", "--deadline MS", "--eviction {belady,lru}", "--no-batching", "--threads N"):
        assert flag in help_text, flag
    script = "import sys\nfrom gemel_studio.cli import build_parser\nbuild_parser()\nassert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_gemel_run_on_a_missing_bundle_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nothing"), "--stream", "synthetic", "--policy", "unlimited"]) == 2
    assert "no such bundle" in capsys.readouterr().err


def test_gemel_run_works_without_the_merging_code(bundle):  # noqa: F811
    """What an edge box does: `gemel run` with merging, export and Qt unimportable."""
    body = f"""
from gemel_studio.cli import main
assert main(['run', {str(bundle[1])!r}, '--stream', 'synthetic:10=size', '--policy', 'unlimited',
             '--duration', '0.5', '--json']) == 0
"""
    proc = run_python_blocking(EDGE_BLOCKED, body)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["streams"][0]["frames_in"] >= 3


def test_ctrl_c_stops_gemel_run_cleanly_with_the_summary(bundle):  # noqa: F811
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "gemel_studio.cli", "run", str(bundle[1]), "--stream",
                             "synthetic:20=size", "--policy", "unlimited", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(50):  # warnings may come first; the handler is in place once this line is out
            line = proc.stderr.readline()
            if "Ctrl-C stops" in line or not line:
                break
        assert "Ctrl-C stops" in line
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["stopped"] == "interrupted" and summary["streams"][0]["frames_in"] >= 3


def test_sigterm_stops_gemel_run_cleanly_with_the_summary(bundle):  # noqa: F811
    """What a service manager does (systemd's stop): SIGTERM stops the streams, the summary is
    printed, the exit code is 0 and the summary says `terminated`."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "gemel_studio.cli", "run", str(bundle[1]), "--stream",
                             "synthetic:20=size", "--policy", "unlimited", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(50):  # the handlers are in place before this line is printed
            line = proc.stderr.readline()
            if "Ctrl-C stops" in line or not line:
                break
        assert "Ctrl-C stops" in line
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["stopped"] == "terminated" and "SIGTERM" in err
    stream = summary["streams"][0]
    assert stream["frames_in"] == stream["processed"] + stream["dropped"]


# --- the onnxruntime backend -------------------------------------------------------------------


def test_both_backends_give_the_same_outputs_on_the_same_frames(loaded):
    frames = [f for _, f in SyntheticSource(fps=30, size=(20, 24), seed=5, frames=3, realtime=False).frames()]
    names = ["color", "shape", "size", "spare"]
    results = {backend: described_outputs(loaded, names, frames, backend)[1] for backend in ("torch", "onnxruntime")}
    for t, o in zip(results["torch"], results["onnxruntime"]):
        for m in names:
            assert t[m]["label"] == o[m]["label"]
            assert t[m]["score"] == pytest.approx(o[m]["score"], abs=1e-4)


def test_onnxruntime_sessions_read_the_resident_weights_and_let_evicted_ones_go(loaded):
    import gc
    import weakref

    one = max(ModelScheduler.for_bundle(loaded, [n], "time-sharing", 10**12).stats[n].bytes
              for n in ("color", "shape"))
    engine = Engine(loaded, [(SyntheticSource(), ["color", "shape"])], "time-sharing", one, "cpu", "onnxruntime")
    state = engine.scheduler.acquire("color")
    engine._ort.prepare("color", state)
    first_color = weakref.ref(next(iter(state.values())))
    del state
    frame = torch.rand(3, 16, 16)
    for _ in range(3):  # color, shape, color, shape, ...: every run swaps
        engine.process_frame(frame)
        assert set(engine._ort.sessions) == {"shape"}  # color's went when shape evicted it
    gc.collect()
    assert first_color() is None  # nothing (no stale session) keeps an evicted tensor alive
    assert engine._ort.sessions_made == {"color": 3, "shape": 3}  # one per load, no more
    assert engine.scheduler.peak_resident_bytes <= one
    models = engine.summary().models
    assert models["color"].swaps == 3 and models["color"].load_seconds > 0


def test_the_onnxruntime_backend_refuses_what_it_cannot_run_in_one_line(loaded):
    with pytest.raises(GemelError, match="backend 'tensorrt'"):
        Engine(loaded, [(SyntheticSource(), ["color"])], "unlimited", None, "cpu", "tensorrt")
    if torch.cuda.is_available():
        with pytest.raises(GemelError, match="CPU only"):
            Engine(loaded, [(SyntheticSource(), ["color"])], "unlimited", None, "cuda", "onnxruntime")


def test_gemel_run_with_the_onnxruntime_backend(bundle, capsys):  # noqa: F811
    rc = main(["run", str(bundle[1]), "--stream", "synthetic:10=size,color", "--memory-budget", "200MiB",
               "--duration", "1.5", "--json", "--device", "cpu", "--backend", "onnxruntime"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["backend"] == "onnxruntime"
    assert summary["models"]["size"]["runs"] > 0 and summary["streams"][0]["processed"] > 0


# --- layer-by-layer loading (MemA's overlap) --------------------------------------------------


def _swap_every_frame(loaded, load, names=("color", "shape", "spare")):
    budget = max(ModelScheduler.for_bundle(loaded, [n], "time-sharing", 10**12).stats[n].bytes for n in names)
    engine = Engine(loaded, [(SyntheticSource(), list(names))], "time-sharing", budget, "cpu", load=load)
    frame = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(3))
    outs = []
    for _ in range(3):  # every model is evicted by the next one: each run loads it whole again
        engine.process_frame(frame)
        outs.append(engine.latest[0]["outputs"])
    return engine, outs, budget


def test_layered_loading_gives_the_same_outputs_within_the_budget(loaded):
    whole, expected, budget = _swap_every_frame(loaded, "whole")
    layered, got, _ = _swap_every_frame(loaded, "layered")
    assert got == expected
    models = layered.summary().models
    for name in ("color", "shape", "spare"):
        m = models[name]
        assert m.load == "layered" and m.load_note is None and "load_note" not in m.to_dict()
        assert m.swaps == m.runs == 3 and m.loaded_bytes == 3 * m.bytes
        assert m.load_seconds > 0 and m.load_wait_seconds >= 0
    assert layered.scheduler.peak_resident_bytes <= budget
    resident = layered.scheduler._resident
    assert sum(t.numel() * t.element_size() for t in resident.values()) == layered.scheduler.resident_bytes


def test_a_layer_plan_loads_in_running_order_and_covers_modules_that_never_run():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Attention(), torch.nn.LayerNorm(8)).eval()
    from gemel_studio.runtime.layered import LayerPlan

    keys = list(model.state_dict())
    plan = LayerPlan(model, (4, 8), keys)
    assert sorted(plan.order) == sorted(keys)
    assert plan.order[:2] == ["0.weight", "0.bias"] and plan.order[-2:] == ["2.weight", "2.bias"]
    # out_proj's forward never runs (MultiheadAttention reads its weight): its owner waits for it.
    assert ("out_proj.weight", "1.attn.out_proj.weight") in plan.waits["1.attn"]


def test_a_layer_plan_that_misses_a_tensor_falls_back_to_a_whole_load(loaded):
    budget = max(ModelScheduler.for_bundle(loaded, [n], "time-sharing", 10**12).stats[n].bytes
                 for n in ("color", "size"))
    engine = Engine(loaded, [(SyntheticSource(), ["color", "size"])], "time-sharing", budget, "cpu", load="layered")
    engine.layer_plans["color"].waits = {}  # nobody waits: a meta placeholder reaches a convolution
    frame = torch.rand(3, 16, 16)
    engine.process_frame(frame)
    models = engine.summary().models
    assert models["color"].load == "whole" and "layer-by-layer run failed" in models["color"].load_note
    assert models["size"].load == "layered" and engine.stats[0].processed == 1
    with load_bundle(engine.bundle.path) as again:
        ref = Engine(again, [(SyntheticSource(), ["color"])], "unlimited", None, "cpu")
        ref.process_frame(frame)
    assert engine.latest[0]["outputs"]["color"] == ref.latest[0]["outputs"]["color"]
    with pytest.raises(GemelError, match="needs the torch backend"):
        Engine(loaded, [(SyntheticSource(), ["color"])], "unlimited", None, "cpu", "onnxruntime", load="layered")


def test_gemel_run_loads_layer_by_layer_on_request(bundle, capsys):  # noqa: F811
    rc = main(["run", str(bundle[1]), "--stream", "synthetic:10=size,color", "--policy", "time-sharing",
               "--memory-budget", "50MiB", "--duration", "1.5", "--json", "--device", "cpu", "--load", "layered"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and {m["load"] for m in summary["models"].values()} == {"layered"}
    assert summary["memory"]["runtime_peak_resident_bytes"] <= 50 * 2**20
    ran = [m for m in summary["models"].values() if m["swaps"]]
    assert ran and all(m["load_wait_seconds"] <= m["load_seconds"] + 0.05 for m in ran)


def test_a_model_that_fails_on_a_frame_drops_that_frame_and_the_run_goes_on(loaded, monkeypatch):
    engine = Engine(loaded, [(SyntheticSource(fps=20, size=(16, 16), frames=8), ["size"]),
                             (SyntheticSource(fps=20, size=(16, 16), frames=8), ["color"])],
                    "unlimited", None, "cpu", deadline_s=30.0)  # no frame late, however busy the machine
    real = engine._run_model

    def flaky(m, *args):
        if m == "color":
            raise RuntimeError("kernel exploded\nsecond line")
        return real(m, *args)

    monkeypatch.setattr(engine, "_run_model", flaky)
    summary = engine.run()
    _check_counts(summary)
    size, color = summary.streams
    assert summary.stopped == "sources ended" and size.processed >= 1
    assert color.dropped_error == color.frames_in == 8 and color.processed == 0
    assert summary.last_error == "RuntimeError: kernel exploded"


def test_evicted_weights_are_freed_before_the_next_model_loads(loaded):
    """What is alive never exceeds what the scheduler counts: a model's resident tensors are
    let go before the next model of the same frame loads."""
    import weakref

    names = ["color", "shape"]
    budget = max(ModelScheduler.for_bundle(loaded, [n], "time-sharing", 10**12).stats[n].bytes for n in names)
    engine = Engine(loaded, [(SyntheticSource(), names)], "time-sharing", budget, "cpu")
    sched = engine.scheduler
    dropped, alive_at_load = [], []
    drop, load = sched._drop, sched._load

    def tracking_drop(unit):
        dropped.append(weakref.ref(sched._resident[unit]))
        drop(unit)

    def tracking_load(name, units=None):
        alive_at_load.append(sum(r() is not None for r in dropped))
        load(name, units)

    sched._drop, sched._load = tracking_drop, tracking_load
    for _ in range(2):
        engine.process_frame(torch.rand(3, 16, 16))
    assert len(dropped) > 100 and alive_at_load and max(alive_at_load) == 0


def test_gemel_run_without_a_budget_runs_within_what_the_device_holds(bundle, capsys):  # noqa: F811
    import psutil

    rc = main(["run", str(bundle[1]), "--stream", "synthetic:10=size", "--duration", "1", "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert rc == 0 and summary["policy"] == "merged"
    line = next(x for x in captured.err.splitlines() if x.startswith("memory budget:"))
    assert "available memory" in line and "--memory-budget" in line
    # The budget is what was available when it started (within what the test itself moved).
    assert abs(summary["budget_bytes"] - psutil.virtual_memory().available) < 0.5 * psutil.virtual_memory().total
    _check_counts_dicts(summary["streams"])


def _check_counts_dicts(streams):
    for s in streams:
        assert s["frames_in"] == s["processed"] + s["dropped"], s


def test_gemel_run_writes_one_result_line_per_processed_frame(bundle, tmp_path, capsys):  # noqa: F811
    results = tmp_path / "out" / "results.jsonl"
    # Videos that end and a long deadline: frames are processed however busy this machine is.
    both = _write_video(tmp_path / "both.avi", frames=10, fps=10)
    spare = _write_video(tmp_path / "spare.avi", frames=5, fps=5)
    rc = main(["run", str(bundle[1]), "--stream", f"{both}=size,color", "--stream", f"{spare}=spare",
               "--memory-budget", "200MiB", "--json", "--device", "cpu",
               "--deadline", "20000", "--results", str(results)])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["stopped"] == "sources ended"
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    processed = {s["name"]: s["processed"] for s in summary["streams"]}
    assert sum(processed.values()) == len(lines) > 0
    seen = set()
    for rec in lines:
        key = (rec["stream"], rec["frame"])
        assert key not in seen  # exactly one line per frame
        seen.add(key)
        assert isinstance(rec["timestamp"], float) and rec["latency_ms"] >= 0
        want = {"size", "color"} if rec["stream"] == str(both) else {"spare"}
        assert set(rec["models"]) == want
        for out in rec["models"].values():
            assert out["task"] == "classification" and len(out["labels"]) == len(out["scores"]) >= 1
            assert out["scores"] == sorted(out["scores"], reverse=True)
    for name, n in processed.items():
        assert sum(r["stream"] == name for r in lines) == n
    # Appended: a second run adds its lines after the first run's.
    main(["run", str(bundle[1]), "--stream", "synthetic:10=size", "--memory-budget", "200MiB", "--duration", "1",
          "--json", "--device", "cpu", "--deadline", "20000", "--results", str(results)])
    second = json.loads(capsys.readouterr().out)
    assert len(results.read_text().splitlines()) == len(lines) + second["streams"][0]["processed"]


def test_a_latency_window_holds_the_last_frames_in_memory_allocated_once():
    from gemel_studio.runtime.telemetry import LatencyWindow

    window = LatencyWindow(4)
    buffer = window._buf
    assert len(window) == 0 and window.values().size == 0
    for seconds in range(10):
        window.append(float(seconds))
    assert len(window) == 4 and sorted(window) == [6.0, 7.0, 8.0, 9.0]
    assert window._buf is buffer  # no growth: the same array after any number of frames


def test_a_latency_window_takes_its_resident_memory_at_the_start_not_as_it_fills():
    """The window's pages are written when it is made: filling it adds nothing resident (an
    `np.empty` window grew resident memory by its whole size, 8 bytes a frame, as it filled).
    Measured in a new interpreter, whose heap holds no freed memory that is resident already
    (in this process, after other tests, a large array can reuse such memory)."""
    import subprocess
    import sys

    code = """
import json, psutil
from gemel_studio.runtime.telemetry import LatencyWindow
process, size = psutil.Process(), 8_000_000  # 64 MB: far above what the interpreter moves meanwhile
before = process.memory_info().rss
window = LatencyWindow(size)
made = process.memory_info().rss
for start in range(0, size, 100_000):
    window._buf[start:start + 100_000] = 0.001  # as append() writes, a slice at a time (fast)
window._count = size
print(json.dumps({"size": size, "made": made - before, "filled": process.memory_info().rss - made,
                  "held": len(window)}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    size = figures["size"]
    assert figures["made"] >= 0.8 * 8 * size  # resident at once
    assert figures["filled"] < 0.1 * 8 * size  # filling it adds (almost) nothing
    assert figures["held"] == size
