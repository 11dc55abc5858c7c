"""Retraining on several processes with torch.distributed (DistributedDataParallel).

`gemel merge --nproc N` starts N copies of itself through torch's elastic launcher (the same
one `torchrun` is); `torchrun --nproc-per-node N -m gemel_studio.cli merge ...` does the same
by hand. Every rank runs the whole search, so every decision (which candidate next, when to
stop, what to keep) is taken identically on every rank from identical models:

- The models of one retraining round are one module (`JointModel`) wrapped in DDP. A shared
  tensor is one parameter however many models use it, so DDP reduces its gradient once:
  summed over the models (by autograd) and averaged over the ranks (by DDP), exactly as one
  process would with the same global batch.
- Each rank reads its part of every global batch one process would read (`GlobalBatchShard`):
  the same samples at the same step, split among the ranks.
- Evaluation reads the whole held-out split on every rank: the models are identical, so the
  accuracies are too, and no rank can decide differently.
- Only rank 0 writes the output folder (checkpoints, plans, weights, reports); the others work
  on a private copy of it (`rank_folder`). Since step k reads the same samples whatever the
  number of ranks, a checkpoint resumes on any number of ranks.
- Batch-norm statistics come from each rank's part of a batch (no SyncBatchNorm: it needs
  CUDA), and rank 0's running statistics are given to all at every held-out check.
- NCCL on GPUs, gloo on CPUs. A rank that fails makes the launcher stop the others, and the
  run ends with one line naming that rank and what it died of; every rank's traceback and
  output and the launcher's log go to `nproc-error.log` in the output folder (all on the
  terminal with GEMEL_DIST_VERBOSE=1). A rank that hangs is bounded by the process group timeout.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timedelta
import json
import logging
import os
from pathlib import Path
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from typing import Iterator, Mapping
import warnings

import torch
from torch import nn

from ..errors import GemelError, ProcessFailed, user_message

# A rank waiting on a collective for longer than this gives up with an error instead of hanging.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("GEMEL_DIST_TIMEOUT_S", "300"))
# `gemel merge --nproc` prints one line when a rank fails, the details in FAILURE_LOG in the output
# folder; with GEMEL_DIST_VERBOSE=1 every rank and the launcher also print theirs as they come.
VERBOSE_ENV = "GEMEL_DIST_VERBOSE"
FAILURE_LOG = "nproc-error.log"
_QUIET_RANK_ENV = "GEMEL_QUIET_RANK"  # set by `launch` for its ranks: an error goes to the launcher only
_SCRATCH_ENV = "GEMEL_RANK_SCRATCH"  # set by `launch`: the folder its ranks make their private copies in
_LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")


class LostPeer(GemelError):
    """A rank's collective failed because another rank of its group died (not the cause)."""


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside a process group of more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """The rank that writes files and prints: rank 0, or the only process."""
    return rank() == 0


def launched() -> bool:
    """True when this process was started by torchrun or `--nproc` (the launcher sets these)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@contextmanager
def process_group(device: str = "auto") -> Iterator[None]:
    """Join the process group the launcher set up (nothing to do for a single process), and
    leave it at the end. NCCL when the ranks retrain on CUDA, gloo otherwise."""
    dist = _dist()
    if not launched() or dist.is_initialized():
        yield
        return
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def rank_folder(out: Path) -> Iterator[Path]:
    """The output folder this rank reads and writes: the user's on rank 0; on every other rank
    a private copy of it made before rank 0 changes anything (so a resume reads the same state
    everywhere), deleted at the end. Only rank 0 writes the user's folder.

    Under `launch` the copy is made in the launcher's own temporary folder, which the launcher
    deletes however the rank ended (a rank killed with SIGKILL runs no clean-up of its own);
    started by torchrun by hand, it is in the system's temporary folder, and a SIGTERM (what
    torchrun sends the other ranks when one fails) ends the rank through this clean-up."""
    if not active():
        yield out
        return
    dist = _dist()
    scratch = None
    before = None
    if not is_main():
        scratch = Path(tempfile.mkdtemp(prefix=f"gemel-rank{rank()}-", dir=os.environ.get(_SCRATCH_ENV) or None))
        if threading.current_thread() is threading.main_thread():
            before = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if scratch is not None and out.exists():
            shutil.copytree(out, scratch / out.name)
        dist.barrier()  # rank 0 starts writing only once every copy is made
        yield out if scratch is None else scratch / out.name
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through rank_folder's clean-up, as the default would not


def rank_device(device: torch.device) -> torch.device:
    """Each rank on its own GPU (its local rank); CPUs are shared."""
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class JointModel(nn.Module):
    """The models of one retraining round as one module: its forward is the weighted sum of
    every model's loss on its own batch. Parameters shared between models appear once."""

    def __init__(self, models: Mapping[str, nn.Module], loss_fn):
        super().__init__()
        self.models = nn.ModuleDict(dict(models))
        self._loss_fn = loss_fn

    def forward(self, batches: Mapping[str, object], weights: Mapping[str, float]):
        losses = {n: self._loss_fn(n, self.models[n], batches[n]) for n in self.models}
        total = sum(weights[n] * loss for n, loss in losses.items())
        return total, {n: loss.detach() for n, loss in losses.items()}


def wrap(joint: JointModel, device: torch.device, find_unused: bool = False) -> nn.Module:
    """DDP over the joint model inside a process group of several ranks; the module itself
    otherwise. Buffers (batch-norm statistics) are broadcast from rank 0 at every step.
    `find_unused`: a step may leave some parameters without a gradient (detectors)."""
    if not active():
        return joint
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(joint, device_ids=ids, find_unused_parameters=find_unused)


class GlobalBatchShard:
    """A batch sampler: this rank's part of each batch that one process would draw, shuffled with
    `seed`, in batches of `batch_size`. Step k reads the same samples whatever the number of
    ranks, split among them, so a checkpoint's step resumes on any number of ranks and the
    ranks' averaged gradient is the one process's (up to batch-norm statistics, which each rank
    takes from its own part)."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool, rank: int, world: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()  # RandomSampler's
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        if drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        self.parts = [b[rank * len(b) // world:(rank + 1) * len(b) // world] for b in batches]
        if any(not p for p in self.parts):
            raise GemelError(f"a batch of {min(map(len, batches))} sample(s) cannot be split among {world} "
                             "processes; use a larger --batch-size or fewer --nproc")

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


def shard(n: int, batch_size: int, seed: int, drop_last: bool) -> GlobalBatchShard:
    """This rank's GlobalBatchShard (all of each batch for a single process)."""
    return GlobalBatchShard(n, batch_size, seed, drop_last, rank(), world_size())


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (each rank's loss is on its own shard)."""
    if not active():
        return dict(values)
    names = sorted(values)
    t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    _dist().all_reduce(t)
    return {n: float(v) / world_size() for n, v in zip(names, t.tolist())}


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a cancel or an error seen by one rank)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return bool(t.item())


def lost_peer(exc: BaseException) -> bool:
    """True for the error a rank gets when another rank of its group died mid-collective."""
    return active() and _peer_error(exc)


def _peer_error(exc: BaseException) -> bool:
    if isinstance(exc, LostPeer) or isinstance(exc, getattr(_dist(), "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(w in text for w in ("gloo", "NCCL", "Connection reset", "timed out"))


def _one_line(exc: BaseException) -> str:
    """An error as `gemel` prints it, on one line (another error: its type and first line)."""
    text = user_message(exc)
    if text is None:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        text = f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__
    return " ".join(text.split())


@contextmanager
def rank_errors() -> Iterator[None]:
    """Around a rank's work (`gemel merge` started by the launcher): an error is written to the
    launcher's error file for this rank (message, traceback), which `launch` reads to name what
    the rank died of. In a rank `launch` started (and not GEMEL_DIST_VERBOSE), the rank then
    exits quietly, with gemel's exit code (2 for an error of the user's, 1 for another), and the
    launcher prints the run's one line; otherwise (torchrun by hand) the error goes on as before."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (launched() and error_file):
        yield
        return
    from ..errors import Cancelled

    try:
        yield
    except Cancelled:
        raise
    except Exception as exc:
        code = 2 if isinstance(exc, (GemelError, OSError)) else 1
        suppressed, exc.__suppress_context__ = exc.__suppress_context__, False
        details = "".join(traceback.format_exception(exc))  # with the error a one-line message replaced
        exc.__suppress_context__ = suppressed
        record = {"message": _one_line(exc), "timestamp": int(time.time()),
                  "gemel": {"rank": int(os.environ.get("RANK", "0")), "exit_code": code, "lost_peer": _peer_error(exc),
                            "user_error": code == 2, "traceback": details}}
        try:
            Path(error_file).write_text(json.dumps(record))
        except OSError:
            pass
        if os.environ.get(_QUIET_RANK_ENV) != "1":
            raise
        raise SystemExit(code) from None


def without_nproc(argv: list[str]) -> list[str]:
    """The command line each rank runs: `argv` without --nproc (the launcher sets the ranks)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(nproc: int, argv: list[str], device: str = "auto", out: Path | None = None) -> int:
    """Run `gemel <argv>` (less its --nproc) on `nproc` processes of this machine through torch's
    elastic launcher (torchrun's), and return 0 when every rank finished. A failed rank stops
    the others; its error is raised as one line, which names the rank, what it died of and the
    log file (in `out`, the output folder) that holds every rank's output and the launcher's log.

    Rank 0 prints on this terminal (progress, the report); the other ranks' output goes to files,
    the launcher's log lines too, and a failed rank exits quietly (`rank_errors`): the user sees
    one line, not one traceback per rank. GEMEL_DIST_VERBOSE=1 prints them all as they come."""
    if nproc < 1:
        raise GemelError(f"--nproc {nproc}: must be at least 1")
    if torch.cuda.is_available() and device != "cpu" and nproc > torch.cuda.device_count():
        raise GemelError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); use at most "
                         "that many, or --device cpu")
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    verbose = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    logs = Path(tempfile.mkdtemp(prefix="gemel-ranks-"))  # each rank's stdout, stderr and error file
    # Rank 0 keeps the terminal (its progress bar, the report); the others, which print nothing
    # but their errors, write to files.
    redirects = Std.NONE if verbose else {r: Std.ALL for r in range(1, nproc)}
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", run_id=f"gemel-{os.getpid()}", max_restarts=0,
                          monitor_interval=0.2, logs_specs=DefaultLogsSpecs(log_dir=str(logs), redirects=redirects))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    launcher_log: list[str] = []
    kept: Path | None = None  # the failure log, when it could only be written in `logs`
    quiet_before = os.environ.get(_QUIET_RANK_ENV)
    if not verbose:
        os.environ[_QUIET_RANK_ENV] = "1"
    scratch_before = os.environ.get(_SCRATCH_ENV)
    os.environ[_SCRATCH_ENV] = str(logs)  # the ranks' private copies: deleted with `logs` below
    try:
        with _launcher_log(launcher_log, quiet=not verbose):
            elastic_launch(config, sys.executable)("-m", "gemel_studio.cli", *without_nproc(argv))
    except ChildFailedError as exc:
        if not exc.failures:
            raise GemelError(f"the retraining processes failed: {exc}") from None
        error, log = _failed(exc.failures, nproc, argv, logs, launcher_log, out)
        kept = log if log is not None and log.parent == logs else None
        raise error from None
    except SignalException as exc:  # the launcher was signalled (Ctrl-C): it stopped the ranks
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None  # `gemel` says "interrupted", as one process does
        raise ProcessFailed(f"stopped by {signal.Signals(exc.sigval).name}: the ranks were stopped; the last "
                            "epoch's checkpoint, if any, is kept: run the same command again to resume",
                            128 + int(exc.sigval)) from None
    finally:
        for name, value in ((_QUIET_RANK_ENV, quiet_before), (_SCRATCH_ENV, scratch_before)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if kept is None:
            shutil.rmtree(logs, ignore_errors=True)
        else:  # the failure log is kept there, the ranks' copies are not
            for copy in logs.glob("gemel-rank*-*"):
                shutil.rmtree(copy, ignore_errors=True)
    return 0


@contextmanager
def _launcher_log(lines: list[str], quiet: bool) -> Iterator[None]:
    """The elastic launcher's log records and warnings, kept in `lines` (for the failure log);
    with `quiet`, not printed."""

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                lines.append(self.format(record))
            except Exception:  # a log line must never fail the run
                pass

    keep = Keep(logging.INFO)
    keep.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in _LAUNCHER_LOGGERS]
    before = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(keep)
        if quiet:
            lg.propagate = False
    try:
        with warnings.catch_warnings(record=quiet) as caught:
            if quiet:
                warnings.simplefilter("always")
            yield
    finally:
        for lg, propagate in zip(loggers, before):
            lg.removeHandler(keep)
            lg.propagate = propagate
        lines.extend(f"warning: {warnings.formatwarning(w.message, w.category, w.filename, w.lineno).strip()}"
                     for w in caught or ())


def _cause(failures: Mapping[int, object]):
    """The failure that ended the run: the first one that is not a consequence of another, that
    is neither a rank losing a dead peer nor one the launcher stopped with SIGTERM once another
    had failed (timestamps are whole seconds: the stopped rank can tie with the cause)."""
    def consequence(f) -> bool:
        if f.exitcode == -signal.SIGTERM and len(failures) > 1:
            return True
        return bool(isinstance(f.error_file_data, dict) and f.error_file_data.get("gemel", {}).get("lost_peer"))

    ordered = sorted(failures.items(), key=lambda kv: (consequence(kv[1]), kv[1].timestamp, kv[0]))
    return ordered[0]


def _died_of(failure, logs: Path | None = None) -> tuple[str, bool]:
    """What a rank died of, in a few words, and whether it was an error of gemel's own (whose
    message says what to do). A rank that exited before it could say (no error file) is
    described by the last line of its standard error, when that went to a file in `logs`."""
    data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
    mine = data.get("gemel")
    if isinstance(mine, dict) and isinstance(failure.message, str) and failure.message:
        return failure.message, bool(mine.get("user_error")) and not mine.get("lost_peer")
    if failure.exitcode < 0:
        sig = -failure.exitcode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        why = {"SIGKILL": "sent by hand, or by the system when memory ran out", "SIGSEGV": "a crash",
               "SIGBUS": "a crash", "SIGABRT": "aborted"}.get(name)
        return f"killed by signal {sig} ({name}{', ' + why if why else ''})", False
    message = failure.message if isinstance(failure.message, str) else str(failure.message)
    lines = [ln for ln in message.splitlines() if ln.strip() and "errors.html" not in ln]
    if not lines and logs is not None:
        for path in logs.glob(f"*/attempt_*/{failure.local_rank}/stderr.log"):
            lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
    last = lines[-1][:300] if lines else ""
    return (f"exit code {failure.exitcode} ({last})" if last else f"exit code {failure.exitcode}"), False


def _failed(failures: Mapping[int, object], nproc: int, argv: list[str], logs: Path, launcher_log: list[str],
            out: Path | None) -> tuple[GemelError, Path | None]:
    """The error for a failed run, whose one line says where the failure log is, and that log
    (None when it could not be written). A rank that met an error of the user's makes a
    GemelError (exit code 2); one killed, crashed or stopped by a bug makes a ProcessFailed
    (exit code 1), so that a script can tell "fix the command" from "run it again"."""
    rank_, failure = _cause(failures)
    detail, mine = _died_of(failure, logs)
    log = _write_failure_log(failures, nproc, argv, logs, launcher_log, out)
    where = f"details in {log}" if log else "details above"
    if mine:  # gemel's own error: its message says what to do
        return GemelError(f"rank {rank_} of {nproc} failed: {detail} (the others were stopped; {where})"), log
    return ProcessFailed(f"rank {rank_} of {nproc} failed: {detail}; the others were stopped, {where}. "
                         "Its checkpoint, if any, is kept: run the same command again to resume"), log


def _write_failure_log(failures: Mapping[int, object], nproc: int, argv: list[str], logs: Path,
                       launcher_log: list[str], out: Path | None) -> Path | None:
    """Every failed rank's error and traceback, every rank's output that went to a file, and the
    launcher's log, in one file: `out`/FAILURE_LOG, or, when `out` cannot be written, the same
    name in `logs` (the ranks' folder of files, then kept)."""
    parts = [f"gemel {' '.join(argv)}", f"failed at {datetime.now().isoformat(sep=' ', timespec='seconds')}, "
             f"{len(failures)} of {nproc} rank(s) failed", ""]
    for r, f in sorted(failures.items()):
        detail, _ = _died_of(f, logs)
        data = f.error_file_data if isinstance(f.error_file_data, dict) else {}
        parts += [f"== rank {r} (local rank {f.local_rank}, pid {f.pid}): exit code {f.exitcode} ==", detail]
        mine = data.get("gemel")
        if isinstance(mine, dict) and mine.get("traceback"):
            parts += ["", str(mine["traceback"]).rstrip()]
        elif isinstance(data.get("message"), dict):  # torch's own error file (@record)
            parts += ["", json.dumps(data["message"], indent=2)]
        parts.append("")
    for r in range(nproc):
        files = sorted(logs.glob(f"*/attempt_*/{r}/std*.log"), key=lambda p: p.name)
        for path in files:
            text = path.read_text(errors="replace").rstrip()
            parts += [f"== rank {r} {path.stem} ==", text or "(empty)", ""]
        if not files:
            parts += [f"== rank {r} output: printed on the terminal ==", ""]
    parts += ["== launcher ==", *(launcher_log or ["(no log lines)"]), ""]
    text = "\n".join(parts)
    for target in ([out / FAILURE_LOG] if out is not None else []) + [logs / FAILURE_LOG]:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        except OSError:
            continue
        return target
    return None


def sync_buffers(module: nn.Module) -> None:
    """Every rank takes rank 0's buffers (batch-norm running statistics), which each rank's
    last forward pass updated from its own shard."""
    if not active():
        return
    for buf in module.buffers():
        _dist().broadcast(buf, 0)


def from_main(value):
    """Rank 0's `value` on every rank (a decision every rank must take alike)."""
    if not active():
        return value
    box = [value]
    _dist().broadcast_object_list(box, src=0)
    return box[0]
