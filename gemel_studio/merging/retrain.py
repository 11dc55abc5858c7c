"""Joint retraining of models that share weights (GEMEL's retraining step).

One optimizer over the unique parameters of every model being retrained, so a shared
weight receives the summed gradients of its users in one step. Each step draws one batch
per model; the loss is a weighted sum that pushes the models furthest below their targets
(GEMEL's weights: min((target / accuracy)^0.75, 10)). Mixed precision (bfloat16 autocast)
on CUDA. The held-out split is evaluated `checks_per_epoch` times an epoch and the round
stops at the first check where every model meets its target (a partial epoch is recorded
with its steps). After every epoch the state is checkpointed atomically; a cancel checkpoints the
exact step, and a rerun resumes from there with nothing lost. A GPU out-of-memory error
halves the batch size and retries the epoch, and says so.

Under torch.distributed (`gemel merge --nproc N`, or torchrun) the same loop runs on every rank
over DistributedDataParallel: each rank reads its shard of every model's data and the ranks
together read the global batch; see distributed.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ..devices import mixed_precision, resolve_device
from ..errors import Cancelled, GemelError
from ..progress import Progress
from . import distributed
from .datasets import ModelData, detection_collate
from .plan import RetrainSettings

CHECKPOINT_VERSION = 1


def loss_weight(target: float, accuracy: float) -> float:
    """GEMEL's weighting: models below target weigh more, at most 10 times."""
    return min((target / max(accuracy, 1e-6)) ** 0.75, 10.0)


def metric_name(task: str) -> str:
    """What 'accuracy' means for a model of this task in reports and targets."""
    return "mAP@0.5" if task == "detection" else "accuracy"


def loader(data: Dataset, task: str, batch_size: int, **kwargs) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, collate_fn=detection_collate if task == "detection" else None,
                      **kwargs)


def _to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def task_loss(model: torch.nn.Module, batch, task: str, device: torch.device) -> torch.Tensor:
    """Cross-entropy for a classifier; for a torchvision detector, the sum of its own losses."""
    x, y = batch
    if task == "detection":
        return sum(model([i.to(device) for i in x], _to(y, device)).values())
    return torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))


@torch.no_grad()
def mean_average_precision(model: torch.nn.Module, data: Dataset, device: torch.device, batch_size: int = 16) -> float:
    """COCO-style mAP at IoU 0.5 (torchmetrics) of a torchvision detector on `data`."""
    from torchmetrics.detection import MeanAveragePrecision

    was_training = model.training
    model.eval()
    metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy", iou_thresholds=[0.5])
    metric.warn_on_many_detections = False  # an untrained detector proposes hundreds of boxes
    for images, targets in loader(data, "detection", batch_size):
        with mixed_precision(device):
            out = model([i.to(device) for i in images])
        metric.update([{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in o.items()} for o in out],
                      targets)
    model.train(was_training)
    return max(0.0, float(metric.compute()["map_50"]))  # -1 when nothing was scored


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Dataset, device: torch.device, batch_size: int = 256,
             task: str = "classification") -> float:
    """Top-1 accuracy on `data` for a classifier, mAP@0.5 for a detector."""
    if task == "detection":
        return mean_average_precision(model, data, device)
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        with mixed_precision(device):
            out = model(x.to(device))
        correct += (out.argmax(1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / total if total else 0.0


@dataclass
class EpochRecord:
    epoch: int
    seconds: float
    loss: dict[str, float]
    accuracy: dict[str, float]
    steps: int | None = None  # steps trained when the epoch stopped early (targets met at a check); None: all
    total_steps: int | None = None  # steps in a whole epoch

    @property
    def fraction(self) -> float:
        """The share of an epoch this record trained (1.0 for a whole one)."""
        return self.steps / self.total_steps if self.steps is not None and self.total_steps else 1.0


@dataclass
class RetrainResult:
    initial_accuracy: dict[str, float]
    accuracy: dict[str, float]
    targets: dict[str, float]
    history: list[EpochRecord]
    seconds: float
    batch_size: int
    stopped: str  # 'targets met', 'epochs done', 'cannot reach target', 'time budget'
    events: list[str] = field(default_factory=list)

    @property
    def passed(self) -> dict[str, bool]:
        return {n: self.accuracy[n] >= self.targets[n] for n in self.targets}

    @property
    def all_passed(self) -> bool:
        return all(self.passed.values())


def unique_parameters(models: Mapping[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    """Each parameter once, in a stable order (tied ones appear at their first user)."""
    return list({id(p): p for m in models.values() for p in m.parameters() if p.requires_grad}.values())


def _make_optimizer(params, settings: RetrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    raise GemelError(f"optimizer '{settings.optimizer}' is unknown; use sgd or adam")


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint whole


def _load_checkpoint(path: Path, names: list[str], seed: int) -> dict | None:
    """The checkpoint at `path`, or None when there is none or it is an earlier round's."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated: refuse, keep the file for inspection
        raise GemelError(f"{path}: checkpoint is corrupt ({str(exc).splitlines()[0][:120]}); "
                         "delete it to start this retraining afresh") from None
    if state.get("seed", seed) != seed:
        # The search seeds every round apart: this is an earlier round's, left by a kill after the
        # search banked that round and before it deleted this file. That round is done.
        return None
    if state.get("version") != CHECKPOINT_VERSION or sorted(state.get("models", {})) != sorted(names):
        raise GemelError(f"{path}: checkpoint belongs to another retraining (other models or version); "
                         "delete it or choose another output folder")
    return state


def joint_retrain(models: Mapping[str, torch.nn.Module], data: Mapping[str, ModelData], targets: Mapping[str, float],
                  settings: RetrainSettings, *, progress: Progress | None = None, checkpoint: Path | None = None,
                  on_epoch: Callable[[EpochRecord], None] | None = None, deadline: float | None = None,
                  seed: int = 0, early_stop: bool = True, check_first: bool = False) -> RetrainResult:
    """Retrain `models` (already tied as the plan says) jointly until every model meets its
    target, the epochs run out, a model cannot reach its target, or `deadline` passes.
    With early_stop=False every epoch runs (plain fine-tuning of unmerged models). With
    check_first, models that all meet their targets before the first step are not trained at
    all (stopped: 'targets met before training')."""
    progress = progress or Progress()
    device = distributed.rank_device(resolve_device(settings.device))
    names = list(models)
    for m in models.values():
        m.to(device)
    params = unique_parameters(models)
    optimizer = _make_optimizer(params, settings)
    batch_size = settings.batch_size
    history: list[EpochRecord] = []
    events: list[str] = []
    start_epoch, start_step = 0, 0
    started = time.monotonic()
    initial = {n: evaluate(models[n], data[n].val, device, task=data[n].task) for n in names}

    state = _load_checkpoint(checkpoint, names, seed) if checkpoint else None
    if state is None and checkpoint is not None and checkpoint.exists():
        events.append(f"ignored {checkpoint.name}: an earlier round's (another seed)")
    if state is not None:
        for n in names:
            models[n].load_state_dict(state["models"][n])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_step = state["epoch"], state["step"]
        batch_size = state["batch_size"]
        initial = state["initial_accuracy"]
        history = [EpochRecord(**h) for h in state["history"]]
        events.append(f"resumed from {checkpoint.name} at epoch {start_epoch + 1}, step {start_step}")

    def snapshot(epoch: int, step: int) -> dict:
        return {"version": CHECKPOINT_VERSION, "seed": seed, "world_size": distributed.world_size(),
                "epoch": epoch, "step": step, "batch_size": batch_size,
                "models": {n: models[n].state_dict() for n in names}, "optimizer": optimizer.state_dict(),
                "initial_accuracy": initial, "history": [vars(h) for h in history],
                "accuracy": dict(accuracy)}  # the last check's (the loss weights follow it)

    def met(acc: Mapping[str, float]) -> bool:
        return all(acc[n] >= targets[n] for n in names)

    accuracy = dict(history[-1].accuracy) if history else dict(initial)
    if state is not None and state.get("accuracy"):  # a cancel between checks: the weights of the last check
        accuracy = dict(state["accuracy"])
    stopped = "epochs done"
    if check_first and state is None and met(initial):
        return RetrainResult(initial_accuracy=initial, accuracy=dict(initial), targets=dict(targets), history=[],
                             seconds=time.monotonic() - started, batch_size=batch_size,
                             stopped="targets met before training", events=events)
    if state is not None and early_stop and _cannot_reach(history, targets, settings.epochs):
        # Saved after the epoch that gave up, before the caller took the result: stop as that run did.
        return RetrainResult(initial_accuracy=initial, accuracy=accuracy, targets=dict(targets), history=history,
                             seconds=time.monotonic() - started, batch_size=batch_size,
                             stopped="cannot reach target", events=events)
    joint = distributed.JointModel(models, lambda n, model, batch: task_loss(model, batch, data[n].task, device))
    # DDP across ranks (rank 0's weights to all), the joint model itself alone. A detector's step may
    # leave some parameters without a gradient.
    runner = distributed.wrap(joint, device, find_unused=any(data[n].task == "detection" for n in names))
    epoch = start_epoch
    while epoch < settings.epochs:
        if early_stop and met(accuracy) and epoch > 0:
            stopped = "targets met"
            break
        if deadline is not None and time.monotonic() > deadline:
            stopped = "time budget"
            break
        weights = {n: loss_weight(targets[n], accuracy[n]) for n in names}
        loaders = {n: _epoch_loader(data[n], batch_size, seed * 1000 + epoch) for n in names}
        steps = max(len(loader) for loader in loaders.values())
        iters = {n: iter(loaders[n]) for n in names}
        first_step = start_step if epoch == start_epoch else 0
        # Checks inside the epoch (its end is always one): evenly spaced steps after which to evaluate.
        checks = min(settings.checks_per_epoch, steps) if early_stop else 1
        check_after = {steps * k // checks for k in range(1, checks)}
        stopped_at: int | None = None
        progress.start(steps, f"epoch {epoch + 1}/{settings.epochs}")
        losses = {n: 0.0 for n in names}
        t0 = time.monotonic()
        for m in models.values():
            m.train()
        try:
            for step in range(steps):
                batches = {}
                for n in names:
                    try:
                        batches[n] = next(iters[n])
                    except StopIteration:  # a smaller dataset starts over
                        iters[n] = iter(loaders[n])
                        batches[n] = next(iters[n])
                if step < first_step:
                    progress.done = step + 1
                    continue
                if distributed.any_rank(progress.cancelled):  # every rank stops at the same step
                    progress.cancel()
                progress.check()  # before the update: a cancel never leaves a step half-counted
                optimizer.zero_grad(set_to_none=True)
                with mixed_precision(device):
                    total, parts = runner(batches, weights)
                for n in names:
                    losses[n] += parts[n].item()
                total.backward()
                total = total.detach()
                optimizer.step()
                progress.step(f"epoch {epoch + 1}/{settings.epochs} loss {total.item():.3f}", check=False)
                if step + 1 in check_after:
                    try:
                        accuracy = _evaluate_all(joint, models, data, device)
                    except torch.OutOfMemoryError:
                        # Not the training's: halving its batch would not help. Skip this check
                        # (the epoch's end checks again); under several ranks every rank must agree.
                        if distributed.active():
                            raise GemelError("out of GPU memory while checking the held-out split in the middle "
                                             "of an epoch; set retraining.checks_per_epoch: 1 in the plan") from None
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        events.append(f"out of GPU memory at a check in epoch {epoch + 1}: check skipped")
                    else:
                        if met(accuracy):
                            stopped_at = step + 1
                            break
                        weights = {n: loss_weight(targets[n], accuracy[n]) for n in names}
                    for m in models.values():
                        m.train()
        except Cancelled:
            if checkpoint:
                _save_checkpoint(checkpoint, snapshot(epoch, step))
            raise
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise GemelError("out of GPU memory even at batch size 1; free the GPU, retrain fewer models "
                                 "at once, or use --device cpu") from None
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch_size //= 2
            events.append(f"out of GPU memory in epoch {epoch + 1}: batch size halved to {batch_size}, epoch retried")
            progress.message = events[-1]
            start_epoch, start_step = epoch, 0
            continue
        if stopped_at is None:
            accuracy = _evaluate_all(joint, models, data, device)
        losses = distributed.mean_over_ranks(losses)
        trained = (stopped_at or steps) - first_step
        record = EpochRecord(epoch=epoch + 1, seconds=time.monotonic() - t0,
                             loss={n: losses[n] / max(1, trained) for n in names}, accuracy=accuracy,
                             steps=stopped_at, total_steps=steps)
        history.append(record)
        if on_epoch:
            on_epoch(record)
        epoch += 1
        if checkpoint:
            _save_checkpoint(checkpoint, snapshot(epoch, 0))
        if stopped_at is not None:
            stopped = "targets met"
            break
        if early_stop and _cannot_reach(history, targets, settings.epochs):
            stopped = "cannot reach target"
            break
    else:
        if met(accuracy):
            stopped = "targets met"
    return RetrainResult(initial_accuracy=initial, accuracy=accuracy, targets=dict(targets), history=history,
                         seconds=time.monotonic() - started, batch_size=batch_size, stopped=stopped, events=events)


def _evaluate_all(joint, models: Mapping[str, torch.nn.Module], data: Mapping[str, ModelData],
                  device: torch.device) -> dict[str, float]:
    """Every model's held-out accuracy, as rank 0 measures it (batch-norm statistics synced first)."""
    distributed.sync_buffers(joint)
    return distributed.from_main({n: evaluate(m, data[n].val, device, task=data[n].task) for n, m in models.items()})


def _epoch_loader(data: ModelData, batch_size: int, seed: int) -> DataLoader:
    """One epoch's loader, shuffled with `seed`: this rank's part of each batch (the whole batch
    for a single process), so that step k reads the same samples on any number of ranks."""
    part = distributed.shard(len(data.train), batch_size, seed, drop_last=len(data.train) > batch_size)
    return DataLoader(data.train, batch_sampler=part,
                      collate_fn=detection_collate if data.task == "detection" else None)


def _cannot_reach(history: list[EpochRecord], targets: Mapping[str, float], epochs: int) -> bool:
    """GEMEL's give-up rule: a straight line through the last two accuracies of a model below
    target does not reach it by the last epoch."""
    if len(history) < 2:
        return False
    last, before = history[-1], history[-2]
    remaining = epochs - last.epoch
    for name, target in targets.items():
        acc = last.accuracy[name]
        if acc >= target:
            continue
        slope = acc - before.accuracy[name]
        if acc + max(slope, 0.0) * remaining < target - 1e-9:
            return True
    return False


def clone_state(models: Mapping[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in models.items()}


__all__ = ["EpochRecord", "RetrainResult", "clone_state", "evaluate", "joint_retrain", "loss_weight", "metric_name",
           "resolve_device", "unique_parameters"]
