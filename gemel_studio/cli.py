"""The `gemel` command: the same functions the studio calls, from a terminal.

Errors a user can cause print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
from contextlib import contextmanager
import json
import sys
from pathlib import Path

from . import __version__
from .errors import Cancelled, GemelError

from .samples import DEFAULT_WORKLOAD  # noqa: F401  (the studio's default workload; found in a wheel too)
from .system import versions
from .units import human_bytes, text_table


# --- gemel info ----------------------------------------------------------------------------


def cmd_info(args) -> int:
    info = versions()
    if args.architectures:
        from .models import known_architectures
        for name, task in known_architectures().items():
            print(f"{name:40} {task}")
        return 0
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("gemel_studio", "python", "torch", "torchvision", "onnx", "onnxruntime", "pyside6", "qt", "device"):
        print(f"{key:14} {info[key] or 'not installed'}")
    if info["gpus"]:
        for gpu in info["gpus"]:
            print(f"{'gpu ' + str(gpu['index']):14} {gpu['name']}, {human_bytes(gpu['memory_used'])} used "
                  f"of {human_bytes(gpu['memory_total'])}")
    else:
        print(f"{'gpu':14} no NVIDIA GPU")
    return 0


# --- gemel analyze -------------------------------------------------------------------------


def format_analysis(analysis) -> str:
    out = [f"workload {analysis.workload}: {len(analysis.models)} models, alignment: {analysis.alignment}", ""]
    rows = [[m.name, m.architecture, m.task, f"{m.param_count:,}", human_bytes(m.param_bytes),
             human_bytes(m.buffer_bytes), human_bytes(m.activation_bytes), str(len(m.layers))]
            for m in analysis.models]
    out.append(text_table(rows, ["model", "architecture", "task", "parameters", "param bytes", "buffers",
                             "peak activations", "layers"]))
    out.append("")
    top = analysis.groups[:15]
    rows = [[str(i + 1), g.kind, str(len(g.members)), human_bytes(g.bytes_per_copy), human_bytes(g.savings_bytes),
             ", ".join(f"{m.model}:{m.layer}" for m in g.members)[:70]] for i, g in enumerate(top)]
    out.append(f"{len(analysis.groups)} share groups (heaviest {len(top)} shown)")
    if rows:
        out.append(text_table(rows, ["#", "kind", "models", "per copy", "saves", "members"]))
    out.append("")
    out.append(f"total parameter bytes   {human_bytes(analysis.total_param_bytes)}")
    out.append(f"all-shareable bound     {human_bytes(analysis.max_savings_bytes)} "
               f"({analysis.max_savings_fraction:.1%} of the total)")
    for m in analysis.models:
        for note in m.notes:
            out.append(f"note: {m.name}: {note}")
    return "\n".join(out)


def cmd_analyze(args) -> int:
    from .analysis import analyze_workload
    from .progress import terminal_progress
    from .workload import load_workload

    workload = load_workload(args.workload)
    progress = terminal_progress() if not args.json else None
    analysis = analyze_workload(workload, alignment=args.alignment, progress=progress)
    if args.json:
        print(json.dumps(analysis.to_dict(), indent=None if args.compact else 2))
    else:
        print(format_analysis(analysis))
    return 0


# --- gemel propose -------------------------------------------------------------------------


def _check_output_file(path: Path) -> None:
    if path.is_dir():
        raise GemelError(f"{path}: is a folder; name the plan file to write, e.g. {path / 'plan.yaml'}")
    if not path.parent.is_dir():
        raise GemelError(f"{path}: the folder {path.parent} does not exist; create it or write the plan elsewhere")


def cmd_propose(args) -> int:
    from .analysis import analyze_workload
    from .merging import propose_plan, save_plan
    from .workload import load_workload

    from .merging.plan import InitSettings, PretrainedBase

    _check_output_file(args.output)  # before the analysis, not after it
    workload = load_workload(args.workload)
    analysis = analyze_workload(workload, alignment=args.alignment)
    plan = propose_plan(workload, analysis)
    base = None
    if args.base:
        arch, sep, weights = args.base.partition(":")
        if not sep or not arch or not weights:
            raise GemelError(f"--base {args.base}: expected ARCHITECTURE:WEIGHTS, e.g. mobilenet_v2:IMAGENET1K_V1")
        base = PretrainedBase(architecture=arch, weights=weights)
    elif args.init == "ties":
        base = _common_base(workload)
        if base is None:
            raise GemelError("--init ties needs the models' common pretrained weights: name them with "
                             "--base ARCHITECTURE:WEIGHTS (the workload's models do not name one set)")
    plan.init = InitSettings(method=args.init, base=base)
    notes: list[str] = []
    if not args.no_risk and plan.groups:
        from .merging.risk import measure_risk
        from .progress import terminal_progress

        floor = int(args.risk_min_fraction * analysis.max_savings_bytes)
        plan, notes = measure_risk(workload, plan, limit=args.limit, drop_min_savings=floor,
                                   progress=terminal_progress())
    save_plan(plan, args.output)
    measured = sum(1 for g in plan.groups if g.risk is not None)
    print(f"wrote {len(plan.groups)} proposals to {args.output} (all 'proposed'; the bound is "
          f"{human_bytes(analysis.max_savings_bytes)}, {analysis.max_savings_fraction:.1%} of the workload; "
          f"init {plan.init.method}; merge risk for {measured} group(s))")
    for note in notes:
        print(f"note: {note}")
    return 0


def _common_base(workload):
    """The torchvision weights every torchvision model of the workload names, if one set."""
    from .merging.plan import PretrainedBase
    from .workload import TorchvisionSource

    named = {(s.source.architecture, s.source.weights) for s in workload.models
             if isinstance(s.source, TorchvisionSource) and s.source.weights}
    if len(named) == 1:
        arch, weights = named.pop()
        return PretrainedBase(architecture=arch, weights=weights)
    return None


# --- gemel finetune / merge ---------------------------------------------------------------


def _settings_from_args(args, base):
    updates = {k: v for k, v in {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                                 "device": args.device, "optimizer": args.optimizer,
                                 "min_savings_bytes": (int(args.min_savings * 2**20)
                                                       if getattr(args, "min_savings", None) is not None else None),
                                 }.items() if v is not None}
    return base.model_copy(update=updates)


def _printer(args):
    def on_step(step) -> None:
        if args.json:
            print(json.dumps({"event": "round", **vars(step)}), flush=True)
        else:
            acc = ", ".join(f"{k} {v:.3f}" for k, v in step.accuracy.items())
            print(f"round {step.round}: {len(step.groups)} group(s), {human_bytes(step.savings_bytes)} -> "
                  f"{step.outcome} ({step.next_action}); {acc}; saved so far {human_bytes(step.saved_bytes_after)}",
                  flush=True)
    return on_step


def _require_merge_extra(command: str) -> None:
    """Retraining needs the [merge] extra (detection mAP); say so in one line, before any work."""
    import importlib.util

    for module in ("torchmetrics", "pycocotools"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise GemelError(f"gemel {command} needs the [merge] extra ({module} is missing): "
                             "pip install 'gemel-studio[merge]'")


def cmd_finetune(args) -> int:
    _require_merge_extra("finetune")
    from .merging.pipeline import finetune_workload
    from .merging.plan import RetrainSettings
    from .progress import terminal_progress
    from .workload import load_workload

    workload = load_workload(args.workload)
    settings = _settings_from_args(args, RetrainSettings(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=10))
    summary = finetune_workload(workload, args.out, settings, limit=args.limit,
                                progress=None if args.json else terminal_progress())
    if args.json:
        print(json.dumps(summary))
    else:
        for name, row in summary.items():
            print(f"{name}: " + (f"{row['metric']} {row['accuracy']:.3f} (from {row['initial_accuracy']:.3f}) "
                                 f"in {row['seconds']:.0f} s" if "accuracy" in row else row["skipped"]))
        print(f"wrote {args.out / 'workload.yaml'}")
    return 0


@contextmanager
def _ctrl_c_cancels(progress, message: str):
    """While inside, the first Ctrl-C cancels `progress` (the work stops at its next step and
    says so with `message`); a second one stops at once. The previous handler comes back after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return

    def handler(signum, frame):
        if progress.cancelled:
            raise KeyboardInterrupt
        progress.cancel()
        print(f"\n{message} (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_merge(args) -> int:
    _require_merge_extra("merge")
    from .merging import load_plan
    from .merging.pipeline import merge_workload
    from .progress import Progress, terminal_progress
    from .workload import load_workload

    workload = load_workload(args.workload)
    plan = load_plan(args.plan)
    plan = plan.model_copy(update={"retraining": _settings_from_args(args, plan.retraining)})
    progress = Progress() if args.json else terminal_progress()
    try:
        # A cancel checkpoints the exact step; the last epoch's checkpoint stays on a second Ctrl-C.
        with _ctrl_c_cancels(progress, "stopping at the next step"):
            report = merge_workload(workload, plan, args.out, strategy=args.strategy,
                                    time_budget_s=args.time_budget, limit=args.limit, progress=progress,
                                    on_step=_printer(args))
    except Cancelled:
        print(f"stopped: the search is saved in {args.out}; run the same command again to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"event": "done", **{k: v for k, v in report.items() if k != "steps"}}))
        return 0
    for name, row in report["models"].items():
        unseen = (f"  | unseen split: unmerged {row['unmerged_test_accuracy']:.3f}  merged "
                  f"{row['merged_test_accuracy']:.3f}" if row.get("merged_test_accuracy") is not None else "")
        print(f"{name:16} {row['metric']:9} unmerged {row['unmerged_accuracy']:.3f}  merged "
              f"{row['merged_accuracy']:.3f}  target {row['target']:.3f}  {'pass' if row['passed'] else 'FAIL'}"
              f"{unseen}")
    print(f"parameter bytes {human_bytes(report['bytes_before'])} -> {human_bytes(report['bytes_after'])} "
          f"(saved {human_bytes(report['saved_bytes'])}, {report['fraction_of_bound']:.1%} of the all-shareable "
          f"bound) in {report['rounds']} round(s), {report['retrain_seconds']:.0f} s of retraining")
    print(f"wrote {args.out}/merged.safetensors, plan.yaml, report.json")
    return 0


def _training_args(p) -> None:
    p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--limit", type=int, help="use at most this many samples per dataset (quick runs)")
    p.add_argument("--json", action="store_true", help="machine-readable progress, one JSON object a line")


# --- gemel export --------------------------------------------------------------------------


def cmd_export(args) -> int:
    from .export import export_bundle

    result = export_bundle(args.merged_dir, args.output, archive=args.archive)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0 if result.ok else 1
    for check in result.checks:
        print(f"{'pass' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"weights {human_bytes(result.weights_data_bytes)} on disk (each shared tensor once; "
          f"{human_bytes(result.sum_model_bytes)} stored apart); bundle {human_bytes(result.bundle_bytes)}")
    print(f"wrote {result.bundle}" if result.ok else f"wrote {result.bundle}, but checks failed")
    return 0 if result.ok else 1


# --- gemel run -----------------------------------------------------------------------------


def _parse_stream(spec: str, loop: bool) -> tuple:
    from .runtime.sources import parse_source

    source, eq, models = spec.partition("=")
    if not source:
        raise GemelError(f"--stream '{spec}': name a source: synthetic[:FPS], a video path or camera:N")
    names = [m.strip() for m in models.split(",") if m.strip()]
    if eq and not names:
        raise GemelError(f"--stream '{spec}': no model names after '='; write SOURCE=MODEL[,MODEL...]")
    return parse_source(source, loop=loop), names


def format_run(summary: dict) -> str:
    out = [f"{summary['bundle']}: policy {summary['policy']} (eviction {summary.get('eviction', 'belady')}"
           f"{', no batching' if summary.get('batching') is False else ''}), "
           f"budget {human_bytes(summary['budget_bytes'])}, "
           f"device {summary['device']}, backend {summary['backend']}; ran {summary['elapsed_s']:.1f} s, "
           f"stopped: {summary['stopped']}", ""]

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    rows = [[s["name"], ",".join(s["models"]), f"{s['fps']:g}", str(s["frames_in"]), str(s["processed"]),
             str(s["dropped"]), ms(s["latency_p50_ms"]), ms(s["latency_p99_ms"]), f"{s['throughput_fps']:.1f}",
             s["end_reason"] or "-"] for s in summary["streams"]]
    out.append(text_table(rows, ["stream", "models", "fps", "in", "processed", "dropped", "p50 ms", "p99 ms",
                             "frames/s", "ended"]))
    out.append("")
    rows = [[n, human_bytes(m["bytes"]), str(m["runs"]), str(m["swaps"]), f"{m['load_seconds']:.3f}",
             f"{m['load_wait_seconds']:.3f}", human_bytes(m["loaded_bytes"]), ms(m["mean_infer_ms"]),
             str(m["refused"]), m["load"],
             f"{m['mean_batch_size']:.1f}/{m['max_batch']}" if m.get("mean_batch_size") else "-"]
            for n, m in summary["models"].items()]
    out.append(text_table(rows, ["model", "bytes", "runs", "swaps", "load s", "waited s", "loaded", "infer ms",
                             "refused", "load", "batch mean/max"]))
    out.extend(f"note: {n} {m['load_note']}" for n, m in summary["models"].items() if "load_note" in m)
    out.append("")
    mem = summary["memory"]
    out.append(f"runtime resident weights {human_bytes(mem['runtime_resident_bytes'])} "
               f"(peak {human_bytes(mem['runtime_peak_resident_bytes'])}; all models "
               f"{human_bytes(mem['all_models_bytes'])}); process RSS {human_bytes(mem['process_rss_bytes'])}")
    if "torch_allocated_bytes" in mem:
        out.append(f"torch allocated {human_bytes(mem['torch_allocated_bytes'])}, reserved "
                   f"{human_bytes(mem['torch_reserved_bytes'])}; device used "
                   f"{human_bytes(mem.get('device_used_bytes'))} of {human_bytes(mem.get('device_total_bytes'))}")
    if summary.get("last_error"):
        dropped = sum(s.get("dropped_error", 0) for s in summary["streams"])
        out.append(f"{dropped} frame(s) dropped because a model failed; the last error: {summary['last_error']}")
    if mem.get("static_set") is not None:
        out.append(f"space-sharing keeps {', '.join(mem['static_set']) or 'no model'} resident")
    return "\n".join(out)


def cmd_run(args) -> int:
    from .devices import resolve_device
    from .runtime import load_bundle
    from .runtime.engine import Engine
    from .runtime.scheduler import device_capacity, parse_bytes
    from .progress import Progress

    if args.duration is not None and not args.duration > 0:
        raise GemelError(f"--duration {args.duration}: must be a positive number of seconds")
    if args.deadline is not None and not args.deadline > 0:
        raise GemelError(f"--deadline {args.deadline:g}: must be a positive number of milliseconds")
    budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
    if args.metrics_host != "127.0.0.1" and args.metrics_port is None:
        raise GemelError(f"--metrics-host {args.metrics_host} without --metrics-port: add --metrics-port N "
                         "(0 picks a free port) to serve metrics")
    rotate = parse_bytes(args.results_max_bytes) if args.results_max_bytes is not None else 100 * 2**20
    if budget is None and args.policy != "unlimited":
        # onnxruntime runs on the CPU here: "auto" means the CPU for it (as the engine decides).
        where = resolve_device("cpu" if args.backend == "onnxruntime" and args.device == "auto" else args.device)
        budget, chosen = device_capacity(where)
        chosen = f"memory budget: {human_bytes(budget)} ({chosen}; --memory-budget sets another)"
    else:
        chosen = None
    streams = [_parse_stream(spec, args.loop) for spec in args.stream]
    with contextlib.ExitStack() as stack:
        sinks = []
        if args.results is not None:
            from .runtime.sinks import JsonlSink

            sinks.append(stack.enter_context(JsonlSink(args.results, max_bytes=rotate)))
        bundle = stack.enter_context(load_bundle(args.bundle))
        engine = Engine(bundle, streams, args.policy, budget, args.device, args.backend, args.load,
                        deadline_s=args.deadline / 1000.0 if args.deadline is not None else None,
                        eviction=args.eviction, batching=not args.no_batching, sinks=sinks)
        if chosen:
            print(chosen, file=sys.stderr, flush=True)
        progress = Progress()
        engine.profile_batches()  # before Ctrl-C is handed to the run: it takes a moment
        until = f"for {args.duration:g} s" if args.duration else "until the sources end"
        batches = ", ".join(f"{m} {b}" for m, b in engine.max_batch.items())
        print(f"running {len(streams)} stream(s) {until}; largest batch per model: {batches}; "
              "Ctrl-C stops and prints the summary", file=sys.stderr, flush=True)
        if args.metrics_port is not None:
            from .runtime.metrics import MetricsServer

            server = stack.enter_context(MetricsServer(engine.snapshot, args.metrics_port, args.metrics_host))
            print(f"metrics: {server.url}/metrics (Prometheus), {server.url}/metrics.json (JSON)",
                  file=sys.stderr, flush=True)
        with _ctrl_c_cancels(progress, "stopping the streams"):  # the summary is still printed
            summary = engine.run(args.duration, progress).to_dict()
    if summary["stopped"] == "cancelled":
        summary["stopped"] = "interrupted"  # Ctrl-C is what cancels from a terminal
    # With results on standard output, the summary goes to standard error.
    print(json.dumps(summary) if args.json else format_run(summary),
          file=sys.stderr if args.results == "-" else sys.stdout)
    return 0


# --- gemel samples -------------------------------------------------------------------------


def cmd_samples(args) -> int:
    from .samples import copy_samples, sample_description, sample_names, sample_path

    if args.samples_action == "copy":
        for path in copy_samples(args.names, args.to, overwrite=args.force):
            print(f"wrote {path}")
        return 0
    names = sample_names()
    width = max(map(len, names), default=0)
    for name in names:
        default = " (the studio's default)" if name == "quickstart" else ""
        print(f"{name:{width}}  {sample_description(name)}{default}")
    where = sample_path(names[0]).parent if names else "the package"
    print(f"\n{len(names)} samples in {where}; copy them out with: gemel samples copy [NAME ...] [--to DIR]")
    return 0


# --- gemel studio --------------------------------------------------------------------------


def cmd_studio(args) -> int:
    try:
        from .ui.app import run_studio
    except ImportError as exc:
        raise GemelError(f"the studio needs the GUI extras ({exc.name or 'PySide6 or pyqtgraph'} is missing): "
                         "pip install 'gemel-studio[studio]'") from None
    return run_studio(args.workload)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemel", description="GEMEL Studio: share layers across vision models "
                                     "to fit them onto one edge GPU.")
    parser.add_argument("--version", action="version", version=f"gemel-studio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, compute device and GPUs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--architectures", action="store_true", help="list the torchvision architectures by name")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("analyze", help="per-layer memory and shareable layers of a workload")
    p.add_argument("workload", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compact", action="store_true", help="with --json: on one line")
    p.add_argument("--alignment", choices=["structure", "order"], default="structure",
                   help="how layers are matched across models: by position in the structure (default) "
                        "or by order of appearance (GEMEL's reference)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("propose", help="write a merge plan: every share group, heaviest first")
    p.add_argument("workload", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="the plan file to write (YAML)")
    p.add_argument("--alignment", choices=["structure", "order", "combined"], default="structure",
                   help="combined: structure's pairs, then what it left unpaired by GEMEL's order rule")
    p.add_argument("--init", choices=["mean", "first", "fisher", "ties"], default="mean",
                   help="how a shared tensor starts: members' mean (default), first member's (GEMEL), "
                        "Fisher-weighted mean, or TIES against the common pretrained base")
    p.add_argument("--base", metavar="ARCH:WEIGHTS",
                   help="the pretrained weights the models were fine-tuned from, for --init ties")
    p.add_argument("--no-risk", action="store_true",
                   help="skip the merge risk per group (CKA and accuracy drop, measured without retraining)")
    p.add_argument("--limit", type=int, help="at most this many samples per model for the risk measurement")
    p.add_argument("--risk-min-fraction", type=float, default=0.01, metavar="F",
                   help="measure the accuracy drop only for groups saving at least this fraction of the "
                        "bound (default 0.01; every group gets its CKA)")
    p.set_defaults(func=cmd_propose)

    p = sub.add_parser("finetune", help="train each model alone (the unmerged baseline) and write a workload of them")
    p.add_argument("workload", type=Path)
    p.add_argument("--out", type=Path, required=True)
    _training_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="apply a plan, retrain jointly, write merged weights, plan and report")
    p.add_argument("workload", type=Path)
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategy", choices=["bisect", "gemel", "predict"], default="bisect",
                   help="bisect: all candidates first, split on failure (default); gemel: the reference loop; "
                        "predict: low-risk groups first by the plan's merge risk, split safer-first")
    p.add_argument("--time-budget", type=float, help="seconds; stop the search when they run out")
    p.add_argument("--min-savings", type=float, metavar="MIB",
                   help="do not try candidates (or halves of failed ones) that save less than this many MiB")
    _training_args(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a deployable bundle (manifest, weights once, ONNX) from a merged folder")
    p.add_argument("merged_dir", type=Path, help="the folder `gemel merge --out` wrote")
    p.add_argument("-o", "--output", type=Path, required=True, help="the bundle folder (or archive with --archive)")
    p.add_argument("--archive", action="store_true", help="write one .tar file instead of a folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="run a bundle's models on live streams under a memory budget (the edge runtime)")
    p.add_argument("bundle", type=Path, help="a bundle folder or archive written by `gemel export`")
    p.add_argument("--stream", action="append", required=True, metavar="SOURCE[=MODEL,...]",
                   help="synthetic[:FPS], a video file or camera:N, and the models its frames go through "
                        "(default: every model); repeat for more streams")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="torch (default) or onnxruntime (CPU; sessions read the resident weights in place)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--load", choices=["whole", "layered"], default="whole",
                   help="whole: a model's missing weights load before it runs (default); layered: MemA-style, "
                        "each layer's weights load while the layers before it run (torch backend)")
    p.add_argument("--memory-budget", metavar="BYTES", help="e.g. 200MiB, 1.5GiB or a number of bytes")
    p.add_argument("--policy", choices=["merged", "time-sharing", "space-sharing", "unlimited"], default="merged")
    p.add_argument("--duration", type=float, metavar="S", help="seconds to run (default: until the sources end "
                   "or Ctrl-C)")
    p.add_argument("--loop", action="store_true", help="start video files over at their end")
    p.add_argument("--metrics-port", type=int, metavar="N", help="serve live metrics on this port (0: any free "
                   "port): Prometheus text at /metrics, a JSON snapshot at /metrics.json")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDRESS",
                   help="the address the metrics port binds (default 127.0.0.1, this machine only; "
                        "0.0.0.0 exposes it to the network)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--deadline", type=float, metavar="MS", help="milliseconds each frame has from its arrival "
                   "(default: its stream's frame interval)")
    p.add_argument("--eviction", choices=["belady", "lru"], default="belady",
                   help="what to evict: belady (default: what the queued frames need furthest in the future; "
                        "most recently used otherwise) or lru (least recently used, for comparison)")
    p.add_argument("--no-batching", action="store_true", help="run every frame alone (for comparison)")
    p.add_argument("--results", metavar="FILE.jsonl", help="write one JSON line per processed frame to FILE "
                   "(appended, rotated by size) or to - (standard output; the summary then goes to standard error)")
    p.add_argument("--results-max-bytes", metavar="SIZE", help="rotate the results file past this size "
                   "(default 100MiB; FILE.1 ... FILE.5 are kept)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("samples", help="list the sample workloads that ship with the package, or copy them out",
                       description="With no arguments: list the sample workloads. `copy`: write them into a folder.")
    p.set_defaults(func=cmd_samples)
    samples = p.add_subparsers(dest="samples_action", metavar="{copy}")
    c = samples.add_parser("copy", help="write sample workloads into a folder, to analyse, edit or merge them")
    c.add_argument("names", nargs="*", metavar="NAME", help="the samples to copy (default: all of them)")
    c.add_argument("--to", type=Path, default=Path("."), metavar="DIR",
                   help="the folder to write them into (default: this one; created if missing)")
    c.add_argument("--force", action="store_true", help="overwrite files that are already there")

    p = sub.add_parser("studio", help="open the desktop studio")
    p.add_argument("workload", type=Path, nargs="?", default=None)
    p.set_defaults(func=cmd_studio)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GemelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named cannot be read or written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} (check the path and its permissions)", file=sys.stderr)
        return 2
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def studio_main() -> int:
    """`gemel-studio [WORKLOAD]`."""
    return main(["studio", *sys.argv[1:]])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
