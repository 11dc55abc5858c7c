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
  CUDA), and rank 0's running statistics are given to all after each epoch.
- NCCL on GPUs, gloo on CPUs. A rank that fails makes the launcher stop the others, and the
  run ends with that rank's error; a rank that hangs is bounded by the process group timeout.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
import os
from pathlib import Path
import shutil
import sys
import tempfile
from typing import Iterator, Mapping

import torch
from torch import nn

from ..errors import GemelError

# A rank waiting on a collective for longer than this gives up with an error instead of hanging.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("GEMEL_DIST_TIMEOUT_S", "300"))


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
    everywhere), deleted at the end. Only rank 0 writes the user's folder."""
    if not active():
        yield out
        return
    dist = _dist()
    scratch = None
    if not is_main():
        scratch = Path(tempfile.mkdtemp(prefix=f"gemel-rank{rank()}-"))
        if out.exists():
            shutil.copytree(out, scratch / out.name)
    dist.barrier()  # rank 0 starts writing only once every copy is made
    try:
        yield out if scratch is None else scratch / out.name
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


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
    if not active():
        return False
    dist = _dist()
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(w in text for w in ("gloo", "NCCL", "Connection reset", "timed out"))


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


def launch(nproc: int, argv: list[str], device: str = "auto") -> int:
    """Run `gemel <argv>` (less its --nproc) on `nproc` processes of this machine through torch's
    elastic launcher (torchrun's), and return 0 when every rank finished. A failed rank stops
    the others; its error is raised as one line."""
    if nproc < 1:
        raise GemelError(f"--nproc {nproc}: must be at least 1")
    if torch.cuda.is_available() and device != "cpu" and nproc > torch.cuda.device_count():
        raise GemelError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); use at most "
                         "that many, or --device cpu")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", run_id=f"gemel-{os.getpid()}", max_restarts=0,
                          monitor_interval=0.2)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, sys.executable)("-m", "gemel_studio.cli", *without_nproc(argv))
    except ChildFailedError as exc:
        if not exc.failures:
            raise GemelError(f"the retraining processes failed: {exc}") from None
        _, failure = exc.get_first_failure()  # the rank that failed first; the others were stopped after
        message = failure.message if isinstance(failure.message, str) else str(failure.message)
        lines = [ln for ln in str(message).splitlines() if ln.strip() and "errors.html" not in ln]
        detail = lines[-1] if lines else f"exit code {failure.exitcode}"
        raise GemelError(f"rank {failure.local_rank} of {nproc} failed ({detail}); the others were stopped. "
                         "Its checkpoint, if any, is kept: run the same command again to resume") from None
    return 0


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
