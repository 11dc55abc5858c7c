"""The edge runtime's scheduling policies side by side, in one run: the same live streams under
the same memory budgets with merged, time-sharing, space-sharing and unlimited, every one with
batching and its best eviction (Belady, MRU under round robin), plus time-sharing with LRU
eviction and no batching (`time-sharing/lru/unbatched`: the runtime as it was, the usual weak
baseline) for reference. Prints one JSON object.

    .venv/bin/python benchmarks/runtime.py [--bundle BUNDLE] [--streams 4 8] [--fps 30]
                                           [--duration 10] [--device cpu] [--backend torch]

Bundle: a bundle written by `gemel export` (e.g. of benchmarks/merge.py's merged quick-start),
or by default one this script builds from the quick-start workload by tying every proposed
share group without retraining (the all-shareable bound), or only the groups a merge kept
(`--workload` and `--plan` of a `gemel merge`: e.g. GEMEL's own heuristic's result). The runtime's speed and memory do
not depend on what the weights' values are, only on which tensors are shared; accuracy is
benchmarks/merge.py's business.

Streams: for each count in `--streams` (default 4 and 8), that many streams at `--fps`,
stream i running model i mod the number of models (with 8 streams and 4 models, two streams
share each model, so their frames can batch). Stream 0 decodes a real video with OpenCV when
one is given (`--video PATH`; by default OpenCV's sample recording of a street,
/usr/share/doc/opencv-doc/examples/data/vtest.avi, 768x576, installed by
benchmarks/prepare_video.py from Debian's opencv-doc, when present), replayed at `--fps` in a
loop; the others are synthetic frames of 64x64. Every frame is resized to each model's input.
Each frame's deadline is its stream's frame interval.

Budgets, from the per-model bytes (each model alone) of the bundle:
- `largest`: the smallest budget that runs the largest model;
- `50%` and `75%`: that far from `largest` to `all apart`, the bytes of every model held
  with its own copy of every tensor (what time-sharing needs for everything to fit).

For every stream count and budget, each configuration runs `--repeats` times (interleaved) for
`--duration` seconds on fresh sources and a fresh scheduler; the median run is reported:
processed-frame fraction (all streams), p99 latency (the worst stream's), swaps (loads, the
first ones included), bytes loaded, peak resident bytes and mean batch size. Each run starts
with the engine's short batch profile (not timed, its loads not counted). `checks` says
whether merged processed more frames than every other configuration at every budget and, at
the 50% budget, at least 95% of what unlimited processed.

Merged and time-sharing load their weights when the first frames arrive, inside the timed
run (counted in swaps); space-sharing and unlimited load theirs before it starts. That favours
the latter two, a little.

`--load layered` runs the same with MemA-style layer-by-layer loading (loading a layer's
weights while the previous layers run); `--compare-load` runs both and reports them side by side.
`--compare-order` adds merged and time-sharing with the fair order alone (`merged/fair`: what
the merge-aware order adds), `--compare-prefetch` merged and time-sharing with the opposite of
the default prefetch (loads overlapping the previous model's run; on by default on CUDA only):
`merged/prefetch` on a CPU, `merged/no-prefetch` on CUDA. The reference runs with neither.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from analyze import device_name  # noqa: E402

from gemel_studio.runtime import load_bundle  # noqa: E402
from gemel_studio.runtime.engine import Engine  # noqa: E402
from gemel_studio.runtime.options import RunOptions  # noqa: E402
from gemel_studio.runtime.scheduler import ModelScheduler  # noqa: E402
from gemel_studio.runtime.sources import SyntheticSource, VideoSource  # noqa: E402
from prepare_video import SOURCE as VIDEO_SOURCE, VIDEO as DEFAULT_VIDEO  # noqa: E402

POLICIES = ("merged", "time-sharing", "space-sharing", "unlimited")
REFERENCE = "time-sharing/lru/unbatched"  # the runtime before batching, Belady eviction, order and prefetch
COMPARED = ("merged", "time-sharing")  # the policies that load on demand: what order and prefetch change


def configurations(policies, compare_order: bool = False, compare_prefetch: bool = False, cuda: bool = False
                   ) -> list[tuple[str, str, str, bool, str, str]]:
    """(label, policy, eviction, batching, order, prefetch): every policy batched with Belady
    eviction, the merge-aware order and the default prefetch (on CUDA only); the comparisons
    asked for (prefetch: the opposite of the default); then the reference."""
    out = [(p, p, "belady", True, "merge-aware", "auto") for p in policies]
    for p in (p for p in COMPARED if p in policies):
        if compare_order:
            out.append((f"{p}/fair", p, "belady", True, "fair", "auto"))
        if compare_prefetch:
            out.append((f"{p}/no-prefetch", p, "belady", True, "merge-aware", "off") if cuda else
                       (f"{p}/prefetch", p, "belady", True, "merge-aware", "on"))
    if "time-sharing" in policies:
        out.append((REFERENCE, "time-sharing", "lru", False, "fair", "off"))
    return out


def build_tied_bundle(workload_path: Path, out: Path, input_size: int | None = None,
                      plan_path: Path | None = None) -> Path:
    """Export a bundle of `workload_path` with every proposed share group tied (no retraining),
    or only the groups `plan_path` kept (a plan `gemel merge` wrote), optionally at another
    square input size."""
    from gemel_studio.analysis import analyze_workload
    from gemel_studio.export import export_bundle
    from gemel_studio.merging import GroupState, apply_plan, load_plan, propose_plan
    from gemel_studio.merging.pipeline import write_merged_folder
    from gemel_studio.models.build import build_model
    from gemel_studio.workload import load_workload

    torch.manual_seed(0)
    workload = load_workload(workload_path)
    if input_size:
        channels = workload.input_size[0]
        workload = workload.model_copy(update={"input_size": [channels, input_size, input_size]})
    analysis = analyze_workload(workload)
    if plan_path is None:
        plan = propose_plan(workload, analysis)
        for group in plan.groups:
            group.state = GroupState.kept
    else:
        plan = load_plan(plan_path, workload, analysis)
        for group in plan.groups:  # only what the merge kept is tied
            if group.state != GroupState.kept:
                group.state = GroupState.rejected
    models = {spec.name: build_model(workload, spec, materialize=True).module.eval() for spec in workload.models}
    apply_plan(models, plan)
    merged = out / "merged"
    write_merged_folder(merged, workload, models, plan,
                        {"workload": workload.name, "models": {}, "note": "groups tied, not retrained"})
    result = export_bundle(merged, out / "bundle")
    if not result.ok:
        raise SystemExit(f"export failed: {[c for c in result.checks if not c.passed]}")
    return out / "bundle"


def budgets_for(bundle, names: list[str]) -> dict:
    apart = ModelScheduler.for_bundle(bundle, names, "time-sharing", 10**15)
    shared = ModelScheduler.for_bundle(bundle, names, "merged", 10**15)
    largest = max(s.bytes for s in apart.stats.values())
    all_apart = apart.total_bytes()
    return {"largest_model_bytes": largest, "all_apart_bytes": all_apart, "all_shared_bytes": shared.total_bytes(),
            "budgets": {"largest": largest, "50%": int(largest + 0.5 * (all_apart - largest)),
                        "75%": int(largest + 0.75 * (all_apart - largest))}}


def run_policy(bundle, names: list[str], args, policy: str, budget: int | None, load: str, n_streams: int,
               eviction: str = "belady", batching: bool = True, label: str | None = None,
               order: str = "merge-aware", prefetch: str = "auto") -> dict:
    def source(i: int):
        if i == 0 and args.video is not None:  # the real recording
            return VideoSource(args.video, loop=True, fps=args.fps)
        return SyntheticSource(fps=args.fps, size=(64, 64), seed=i)

    streams = [(source(i), [names[i % len(names)]]) for i in range(n_streams)]
    options = RunOptions(policy=policy, memory_budget=budget, device=args.device, backend=args.backend, load=load,
                         eviction=eviction, batching=batching, order=order, prefetch=prefetch,
                         threads=args.threads or None)
    summary = Engine(bundle, streams, options).run(args.duration)
    models, rows, mem = summary.models.values(), summary.streams, summary.memory
    batches = sum(m.batches for m in models)
    batched = sum(m.batches * (m.mean_batch_size or 0) for m in models)
    frames_in = sum(s.frames_in for s in rows)
    processed = sum(s.processed for s in rows)
    p99 = [s.latency_p99_ms for s in rows if s.latency_p99_ms is not None]
    return {"config": label or policy, "policy": policy, "eviction": eviction, "batching": batching,
            "order": order, "prefetch": summary.prefetch, "load": load, "frames_in": frames_in, "processed": processed,
            "dropped": frames_in - processed,
            "processed_fraction": round(processed / frames_in, 4) if frames_in else None,
            "per_stream_processed_fraction": [s.processed_fraction for s in rows],
            # GEMEL's objective: the worst stream's fraction (space-sharing's refused streams get 0).
            "worst_stream_processed_fraction": min((s.processed_fraction or 0.0) for s in rows),
            # Processed frames that also met the stream's own deadline (the frame interval), where
            # the engine stretched it for a stream slower than that.
            "within_deadline_fraction": round(sum(s.processed_within_deadline for s in rows)
                                              / frames_in, 4) if frames_in else None,
            "p99_latency_ms": round(max(p99), 2) if p99 else None,
            "swaps": sum(m.swaps for m in models),
            "loaded_bytes": sum(m.loaded_bytes for m in models),
            "load_seconds": round(sum(m.load_seconds for m in models), 3),
            "peak_resident_bytes": mem.runtime_peak_resident_bytes,
            "mean_batch_size": round(batched / batches, 3) if batches else None,
            "reordered_batches": summary.reordered_batches, "prefetches": summary.prefetches,
            "prefetch_misses": summary.prefetch_misses,
            "load_wait_seconds": round(sum(m.load_wait_seconds for m in models), 3),
            # The video stream's own fraction and where its source ended (None without a video).
            "video_stream_processed_fraction": rows[0].processed_fraction if args.video is not None else None,
            "video_stream_end": rows[0].end_reason if args.video is not None else None,
            "max_batch": {n: m.max_batch for n, m in summary.models.items()},
            "static_set": mem.static_set,
            "process_rss_bytes": mem.process_rss_bytes,
            **{k: v for k, v in mem.to_dict().items() if k in mem.OPTIONAL}}


def cold_starts(bundle, names: list[str], args, load: str, rounds: int) -> dict:
    """Per model, the latency of a frame that finds the model evicted (time-sharing with room
    for the largest model only, models in turn, so every run loads the whole model): median
    milliseconds from the frame's arrival to its result, and how long inference waited for
    weights."""
    largest = max(ModelScheduler.for_bundle(bundle, [n], "time-sharing", 10**15).stats[n].bytes for n in names)
    engine = Engine(bundle, [(SyntheticSource(), names)], RunOptions(policy="time-sharing", memory_budget=largest,
                                                                      device=args.device, backend=args.backend,
                                                                      load=load, threads=args.threads or None))
    frame = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            engine.stats[0].models = [n]
            start = time.perf_counter()
            engine.process_frame(frame)
            times[n].append(1000.0 * (time.perf_counter() - start))
    models = engine.summary().models
    out = {}
    for n in names:
        ms = sorted(times[n][1:] or times[n])  # the first round warms up allocators and kernels
        m = models[n]
        out[n] = {"median_ms": round(ms[len(ms) // 2], 2),
                  "load_ms_per_swap": round(1000 * m.load_seconds / m.swaps, 2),
                  "waited_ms_per_swap": round(1000 * m.load_wait_seconds / m.swaps, 2),
                  "swaps": m.swaps, "load": m.load}
    return out


def median_row(runs: list[dict]) -> dict:
    """The repeats of one policy and budget as one row: the run with the median processed
    count, plus the range of the processed fraction over the repeats."""
    ordered = sorted(runs, key=lambda r: r["processed"])
    row = dict(ordered[len(ordered) // 2])
    fractions = [r["processed_fraction"] for r in runs]
    row["repeats"] = len(runs)
    row["processed_fraction_range"] = [min(fractions), max(fractions)]
    return row


def checks_for(results: dict) -> dict:
    out = {}
    for budget, rows in results.items():
        by = {r["config"]: r for r in rows}
        m = by.get("merged")
        if m is None:
            continue
        for other, r in by.items():  # fractions: the runs' frame counts differ a little
            if other != "unlimited" and not other.startswith("merged"):
                out[f"{budget}: merged processes more than {other}"] = \
                    m["processed_fraction"] > r["processed_fraction"]
        if budget == "50%" and "unlimited" in by:
            out["50%: merged processes >= 95% of unlimited"] = \
                m["processed_fraction"] >= 0.95 * by["unlimited"]["processed_fraction"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle from `gemel export` (default: build a tied "
                        "quick-start bundle in a temporary folder)")
    parser.add_argument("--workload", type=Path, default=ROOT / "sample_workloads" / "quickstart.yaml")
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 8], help="stream counts (default 4 8)")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per policy and budget")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each policy and budget (the median "
                        "is reported, with the range)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads one inference may use, as `gemel run "
                        "--threads` (torch's intra-op threads and onnxruntime's; default 1: on a box whose cores "
                        "other work shares, two threads spin against each other and one model run takes several "
                        "times longer; 0 keeps the libraries' own defaults)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    parser.add_argument("--load", default="whole", choices=["whole", "layered"])
    parser.add_argument("--compare-load", action="store_true", help="run whole and layered loading both")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--plan", type=Path, help="with the built bundle: tie only the groups this plan kept "
                        "(the plan.yaml of a `gemel merge` of --workload)")
    parser.add_argument("--input-size", type=int, help="with the built bundle: square input size of its models "
                        "(default: the workload's)")
    parser.add_argument("--cold-rounds", type=int, default=8, help="rounds of the cold-start latency measurement "
                        "(0 skips it)")
    parser.add_argument("--video", default="auto", help="a video file stream 0 decodes with OpenCV (default: "
                        f"{DEFAULT_VIDEO} when present, see benchmarks/prepare_video.py; 'none': synthetic only)")
    parser.add_argument("--compare-order", action="store_true", help="add merged and time-sharing with the fair "
                        "order alone (what the merge-aware order adds)")
    parser.add_argument("--compare-prefetch", action="store_true", help="add merged and time-sharing without "
                        "loads overlapping the previous model's run")
    args = parser.parse_args()
    if args.video == "auto":
        args.video = DEFAULT_VIDEO if DEFAULT_VIDEO.is_file() else None
    elif args.video == "none":
        args.video = None
    else:
        args.video = Path(args.video)
        if not args.video.is_file():
            parser.error(f"--video {args.video}: no such file (benchmarks/prepare_video.py installs "
                         f"{DEFAULT_VIDEO})")
    if args.backend == "onnxruntime" and (args.load == "layered" or args.compare_load):
        parser.error("layer-by-layer loading needs the torch backend")

    if args.threads < 0:
        parser.error(f"--threads {args.threads}: must be at least 1, or 0 for the libraries' own defaults")
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # building the bundle too; each run sets it through RunOptions
    print(f"device: {device_name() if args.device == 'cpu' else args.device}", file=sys.stderr, flush=True)
    load_before = [round(x, 2) for x in os.getloadavg()]  # the box is shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="gemel-bench-runtime-") as tmp:
        started = time.perf_counter()
        path = args.bundle or build_tied_bundle(args.workload, Path(tmp), args.input_size, args.plan)
        build_s = time.perf_counter() - started
        with load_bundle(path) as bundle:
            names = [m.name for m in bundle.manifest.models][:max(args.streams)]  # the models the streams use
            sizes = budgets_for(bundle, names)
            loads = ["whole", "layered"] if args.compare_load else [args.load]
            cold = {load: cold_starts(bundle, names, args, load, args.cold_rounds) for load in loads} \
                if args.cold_rounds > 0 else None
            input_sizes = {m.name: list(m.input_size) for m in bundle.manifest.models}
            cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
            configs = configurations(args.policies, args.compare_order, args.compare_prefetch, cuda)
            results: dict[str, dict[str, dict[str, list]]] = {load: {} for load in loads}
            for n_streams in args.streams:
                key = f"{n_streams} streams"
                for load in loads:
                    results[load][key] = {}
                for label, budget in sizes["budgets"].items():
                    for load in loads:
                        runs: dict[str, list] = {c[0]: [] for c in configs}
                        for _ in range(args.repeats):  # interleaved: a slow spell hits them alike
                            for name, policy, eviction, batching, order, prefetch in configs:
                                gc.collect()  # the last run's engine is gone before this one starts
                                row = run_policy(bundle, names, args, policy,
                                                 None if policy == "unlimited" else budget, load, n_streams,
                                                 eviction, batching, name, order, prefetch)
                                row["budget_bytes"] = budget
                                runs[name].append(row)
                                print(f"{key} {label} {load} {name}: processed {row['processed_fraction']}, "
                                      f"swaps {row['swaps']}, loaded {row['loaded_bytes']}, "
                                      f"batch {row['mean_batch_size']}",
                                      file=sys.stderr, flush=True)
                        results[load][key][label] = [median_row(runs[c[0]]) for c in configs]
    device = torch.device("cuda" if args.device.startswith("cuda") or (args.device == "auto" and
                                                                          torch.cuda.is_available()) else "cpu")
    report = {
        "benchmark": "runtime", "device": device_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(), "threads": args.threads or None, "backend": args.backend,
        "load": args.load if not args.compare_load else "whole and layered",
        "bundle": str(args.bundle) if args.bundle else f"{args.workload}, "
        f"{'the groups of ' + str(args.plan) + ' kept' if args.plan else 'every proposed group'} tied (built "
        "here, not retrained)", "bundle_build_seconds": round(build_s, 1),
        "models": names, "input_sizes": input_sizes, "streams": args.streams, "fps": args.fps,
        "configurations": [{"config": c[0], "policy": c[1], "eviction": c[2], "batching": c[3], "order": c[4],
                            "prefetch": c[5]} for c in configs],
        "video": None if args.video is None else {"path": str(args.video), "stream": 0, "replayed_fps": args.fps,
                                                  "source": VIDEO_SOURCE if args.video == DEFAULT_VIDEO
                                                  else "given with --video"},
        "duration_s": args.duration, "repeats": args.repeats, **sizes,
        "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "results": results if args.compare_load else results[args.load],
    }
    if cold is not None:
        report["cold_start"] = cold
    if set(args.policies) == set(POLICIES):
        checks = {load: {key: checks_for(cells) for key, cells in results[load].items()} for load in loads}
        report["checks"] = checks if args.compare_load else checks[args.load]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
