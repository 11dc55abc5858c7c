"""The `gemel` command: the same functions the studio calls, from a terminal.

Errors a user can cause print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from . import __version__
from .errors import Cancelled, GemelError, user_message

from .samples import DEFAULT_WORKLOAD  # noqa: F401  (the studio's default workload; found in a wheel too)
from .system import versions
from .units import human_bytes


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


def cmd_analyze(args) -> int:
    from .analysis import analyze_workload
    from .analysis.text import format_analysis
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


def cmd_propose(args) -> int:
    from .analysis import analyze_workload
    from .merging.plan import InitSettings, PretrainedBase, check_plan_path, propose_plan, save_plan
    from .workload import load_workload

    check_plan_path(args.output)  # before the analysis, not after it
    workload = load_workload(args.workload)
    analysis = analyze_workload(workload, alignment=args.alignment)
    plan = propose_plan(workload, analysis)
    base = PretrainedBase.parse(args.base) if args.base else None
    method = args.init
    if method == "auto":  # ties against the common base where there is one (default_init), else mean
        method = "ties" if base is not None or plan.init.method == "ties" else "mean"
    if base is None and method == "ties":
        base = PretrainedBase.common(workload)
        if base is None:
            raise GemelError("--init ties needs the models' common pretrained weights: name them with "
                             "--base ARCHITECTURE:WEIGHTS (the workload's models do not name one set)")
    plan.init = InitSettings(method=method, base=base if method == "ties" else None)
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


# --- gemel finetune / merge ---------------------------------------------------------------


def _merge_options(command: str):
    """The merging code's options module, or one line saying what to install."""
    try:
        from .merging import options
    except ImportError as exc:
        raise GemelError(f"gemel {command} needs the merging code ({exc.name} is missing): "
                         "pip install 'gemel-studio[merge]'") from None
    options.require_merge_extra(command)
    return options


def cmd_finetune(args) -> int:
    _merge_options("finetune")
    from .merging.options import FINETUNE_SETTINGS, MergeOptions, RetrainSettings
    from .merging.pipeline import finetune_workload
    from .merging.report import format_finetune
    from .options import from_args
    from .progress import terminal_progress
    from .workload import load_workload

    settings = from_args(RetrainSettings, args, base=FINETUNE_SETTINGS)
    limit = from_args(MergeOptions, args).limit
    workload = load_workload(args.workload)
    summary = finetune_workload(workload, args.out, settings, limit=limit,
                                progress=None if args.json else terminal_progress())
    print(json.dumps(summary) if args.json else f"{format_finetune(summary)}\nwrote {args.out / 'workload.yaml'}")
    return 0


def cmd_merge(args) -> int:
    _merge_options("merge")
    from .merging import distributed
    from .merging.options import MergeOptions, RetrainSettings
    from .merging.pipeline import merge_workload
    from .merging.plan import check_plan_workload, load_plan
    from .merging.report import format_report, round_printer
    from .options import from_args
    from .progress import Progress, cancel_on_signals, terminal_progress
    from .workload import load_workload

    workload = load_workload(args.workload)
    plan = load_plan(args.plan)
    check_plan_workload(plan, workload, origin=str(args.plan))  # before any work
    options = from_args(MergeOptions, args, retraining=from_args(RetrainSettings, args, base=plan.retraining))
    if args.nproc != 1 and not distributed.launched():  # N copies of this command, one per rank
        return distributed.launch(args.nproc, args.argv, device=options.retraining.device, out=args.out)
    # A rank's error goes to the launcher, which prints one line for the run (rank_errors).
    with (distributed.rank_errors(), distributed.process_group(options.retraining.device),
          distributed.rank_folder(args.out) as out):
        main_rank = distributed.is_main()  # only rank 0 prints and writes the folder named
        progress = Progress() if args.json or not main_rank else terminal_progress()
        try:
            # A cancel checkpoints the exact step; the last epoch's checkpoint stays on a second Ctrl-C.
            with cancel_on_signals(progress, "stopping at the next step"):
                report = merge_workload(workload, plan, out, options, progress=progress,
                                        on_step=round_printer(args.json) if main_rank else None)
        except Cancelled:
            if main_rank:
                print(f"stopped: the search is saved in {args.out}; run the same command again to resume",
                      file=sys.stderr)
            return 130
        except RuntimeError as exc:
            if distributed.lost_peer(exc):  # another rank died: say so in one line, the launcher names it
                raise distributed.LostPeer(f"rank {distributed.rank()} lost another process of the retraining "
                                           f"({str(exc).splitlines()[0][:120]})") from None
            raise
    if not main_rank:
        return 0
    if args.json:
        print(json.dumps({"event": "done", **{k: v for k, v in report.to_dict().items() if k != "steps"}}))
        return 0
    print(format_report(report))
    print(f"wrote {args.out}/merged.safetensors, plan.yaml, report.json")
    return 0


def _training_flags(p, command: str) -> None:
    """`gemel merge` / `finetune` flags, built from MergeOptions and RetrainSettings (torch-free)."""
    from .options import add_arguments

    try:
        from .merging.options import FINETUNE_SETTINGS, MergeOptions, RetrainSettings
    except ImportError:  # an edge box without the merging code: the command says what to install
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return

    if command == "merge":  # --strategy, --limit, --min-savings; the retraining flags default to the plan's
        p.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="retrain on N processes of this machine with torch.distributed (one per GPU with "
                            "NCCL, gloo on CPUs); each reads its shard of the data, the global batch is kept")
        add_arguments(p, MergeOptions)
        add_arguments(p, RetrainSettings, defaults=dict.fromkeys(RetrainSettings.model_fields))
    else:
        add_arguments(p, MergeOptions, exclude=("strategy", "min_savings_mib"))
        add_arguments(p, RetrainSettings, exclude=("time_budget_s",), defaults=FINETUNE_SETTINGS.model_dump())
    p.add_argument("--json", action="store_true", help="machine-readable progress, one JSON object a line")


# --- gemel export --------------------------------------------------------------------------


def cmd_export(args) -> int:
    from .export import export_bundle
    from .progress import terminal_progress

    result = export_bundle(args.merged_dir, args.output, archive=args.archive,
                           progress=None if args.json else terminal_progress())
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


def cmd_run(args) -> int:
    """`gemel run`: exit 0 when the run ends (duration, sources ended, Ctrl-C or SIGTERM, each
    named in the summary's `stopped`), 2 on a user error, 130 on a second Ctrl-C."""
    from .options import from_args
    from .progress import Progress, cancel_on_signals
    from .runtime import load_bundle
    from .runtime.engine import Engine
    from .runtime.options import RunOptions, parse_bytes
    from .runtime.sources import StreamSpec
    from .runtime.summary_text import format_run

    if args.duration is not None and not args.duration > 0:
        raise GemelError(f"--duration {args.duration}: must be a positive number of seconds")
    options = from_args(RunOptions, args)
    if args.metrics_host != "127.0.0.1" and args.metrics_port is None:
        raise GemelError(f"--metrics-host {args.metrics_host} without --metrics-port: add --metrics-port N "
                         "(0 picks a free port) to serve metrics")
    rotate = (parse_bytes(args.results_max_bytes, "--results-max-bytes") if args.results_max_bytes is not None
              else 100 * 2**20)
    options, where = options.with_device_budget()
    chosen = where and f"memory budget: {human_bytes(options.memory_budget)} ({where}; --memory-budget sets another)"
    streams = [StreamSpec.parse(text).stream(loop=args.loop) for text in args.stream]
    with contextlib.ExitStack() as stack:
        sinks = []
        if args.results is not None:
            from .runtime.sinks import JsonlSink

            sinks.append(stack.enter_context(JsonlSink(args.results, max_bytes=rotate)))
        bundle = stack.enter_context(load_bundle(args.bundle))
        engine = Engine(bundle, streams, options, sinks=sinks)
        if chosen:
            print(chosen, file=sys.stderr, flush=True)
        progress = Progress()
        engine.profile_batches()  # before Ctrl-C is handed to the run: it takes a moment
        if args.metrics_port is not None:
            from .runtime.metrics import MetricsServer

            server = stack.enter_context(MetricsServer(engine.snapshot, args.metrics_port, args.metrics_host,
                                                       instance=args.instance, bundle=bundle))
            print(f"metrics: {server.url}/metrics (Prometheus), {server.url}/metrics.json (JSON)",
                  file=sys.stderr, flush=True)
        with cancel_on_signals(progress, "stopping the streams", terminate=True) as why:  # the summary is still printed
            until = f"for {args.duration:g} s" if args.duration else "until the sources end"
            batches = ", ".join(f"{m} {b}" for m, b in engine.max_batch.items())
            print(f"running {len(streams)} stream(s) {until}; largest batch per model: {batches}; "
                  "Ctrl-C stops and prints the summary", file=sys.stderr, flush=True)
            summary = engine.run(args.duration, progress)
    if summary.stopped == "cancelled":
        summary.stopped = why[0] if why else "interrupted"  # a signal is what cancels from a terminal
    # With results on standard output, the summary goes to standard error.
    print(json.dumps(summary.to_dict()) if args.json else format_run(summary),
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
    p.add_argument("--init", choices=["auto", "mean", "first", "fisher", "ties"], default="auto",
                   help="how a shared tensor starts: members' mean, first member's (GEMEL), Fisher-weighted "
                        "mean, or TIES against the common pretrained base; auto (default): ties where the "
                        "models name one set of pretrained weights (or --base names it), else mean")
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
    _training_flags(p, "finetune")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="apply a plan, retrain jointly, write merged weights, plan and report",
                       description="Apply a plan, retrain jointly, write merged weights, plan and report. The "
                                   "retraining flags replace the plan's retraining settings for this merge.")
    p.add_argument("workload", type=Path)
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    _training_flags(p, "merge")
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
    # --backend, --device, --load, --memory-budget, --policy, --deadline, --eviction, --no-batching
    # (torch-free: the command starts without importing torch)
    from .options import add_arguments
    from .runtime.options import RunOptions

    add_arguments(p, RunOptions)
    p.add_argument("--duration", type=float, metavar="S", help="seconds to run (default: until the sources end "
                   "or Ctrl-C)")
    p.add_argument("--loop", action="store_true", help="start video files over at their end")
    p.add_argument("--metrics-port", type=int, metavar="N", help="serve live metrics on this port (0: any free "
                   "port): Prometheus text at /metrics, a JSON snapshot at /metrics.json")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDRESS",
                   help="the address the metrics port binds (default 127.0.0.1, this machine only; "
                        "0.0.0.0 exposes it to the network)")
    p.add_argument("--instance", metavar="NAME", help="this box's name on every metric series (the `instance` "
                   "label a fleet's Prometheus keeps; default: the hostname)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
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
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (GemelError, OSError) as exc:  # OSError: a file the user named cannot be read or written
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 2 (the user's input) unless the error says otherwise
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
