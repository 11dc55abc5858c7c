"""How a shared tensor starts: one value from all its members' copies, before tying.

Tying makes every member of a group read one `Parameter`. Which value that parameter starts
from decides how much retraining has to repair (GEMEL's reference takes the first member's
weights and repairs every other model). Methods, chosen per plan (`plan.init.method`):

- `first`: the first member's weights (GEMEL's reference).
- `mean`: the element-wise mean of the members' weights.
- `fisher`: each member's copy weighted element-wise by its diagonal Fisher information,
  estimated from a few batches of that model's own data (Matena and Raffel, NeurIPS 2022):
  sum_i F_i * w_i / sum_i F_i.
- `ties`: a task-vector merge relative to a common pretrained base (Yadav et al., NeurIPS
  2023): each member's change from the base is trimmed to its largest `density` fraction by
  magnitude, a sign is elected per element (the sign of the trimmed changes' sum), and the
  trimmed changes that agree with it are averaged and added to the base. Members without a
  base tensor of the same shape fall back to `mean` for that tensor.

Averaging moves a layer's output statistics, so after tying each affected model's batch-norm
running statistics are recomputed on a few batches of its own data (no gradient): averaged
weights with stale statistics lose most of their accuracy (REPAIR, Jordan et al. 2022).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset

from .datasets import ModelData
from .plan import InitSettings, PlannedGroup, PlanError

METHODS = ("first", "mean", "fisher", "ties")


# --- combining the members' copies of one tensor ----------------------------------------------------


def combine_mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)


def combine_fisher(tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """sum_i F_i w_i / sum_i F_i, element-wise; elements where every Fisher is ~0 take the mean."""
    w = torch.stack([t.float() for t in tensors])
    f = torch.stack([x.float().clamp_min(0) for x in fishers])
    total = f.sum(0)
    merged = (f * w).sum(0) / total.clamp_min(eps)
    return torch.where(total > eps, merged, w.mean(0)).to(tensors[0].dtype)


def combine_ties(tensors: Sequence[torch.Tensor], base: torch.Tensor, density: float = 0.2) -> torch.Tensor:
    """TIES-merging of `tensors` relative to `base`: trim, elect sign, disjoint mean."""
    deltas = torch.stack([t.float() - base.float() for t in tensors])
    n = deltas[0].numel()
    k = max(1, int(round(density * n)))
    trimmed = torch.zeros_like(deltas)
    for i, d in enumerate(deltas):
        flat = d.flatten()
        if k >= n:
            trimmed[i] = d
            continue
        keep = flat.abs().topk(k).indices
        out = torch.zeros_like(flat)
        out[keep] = flat[keep]
        trimmed[i] = out.view_as(d)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    merged = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0) / count.clamp_min(1)
    return (base.float() + merged).to(tensors[0].dtype)


# --- Fisher and batch-norm statistics from a model's own data -------------------------------------


def _batches(data: Dataset, task: str, batch_size: int, count: int):
    from .retrain import loader

    for i, batch in enumerate(loader(data, task, batch_size, shuffle=False)):
        if i >= count:
            break
        yield batch


def diagonal_fisher(model: torch.nn.Module, data: ModelData, params: Mapping[str, torch.nn.Parameter],
                    batches: int = 4, batch_size: int = 16, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Diagonal (empirical) Fisher of `params` (name -> parameter of `model`): the mean over a
    few batches of the squared gradient of the model's loss on its own data. Classifiers are
    read in eval mode (batch-norm statistics fixed); detectors need train mode for their losses."""
    from .retrain import task_loss

    device = torch.device(device)
    was_training = model.training
    model.train(data.task == "detection")
    fisher = {k: torch.zeros_like(p, dtype=torch.float32, device="cpu") for k, p in params.items()}
    seen = 0
    try:
        for batch in _batches(data.train, data.task, batch_size, batches):
            model.zero_grad(set_to_none=True)
            task_loss(model, batch, data.task, device).backward()
            for k, p in params.items():
                if p.grad is not None:
                    fisher[k] += p.grad.detach().float().cpu() ** 2
            seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {k: v / max(seen, 1) for k, v in fisher.items()}


_BN = (torch.nn.modules.batchnorm._BatchNorm,)
BN_BATCH_SIZE = 32  # the batches batch-norm statistics are re-estimated from


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, data: ModelData, batches: int = 20, batch_size: int = BN_BATCH_SIZE,
                        device: torch.device | str = "cpu") -> int:
    """Reset and re-estimate every batch-norm layer's running statistics from a few batches of
    the model's own training data (a cumulative average, no gradient, dropout off). Returns the
    number of batch-norm layers updated."""
    bns = batchnorms(model)
    if not bns:
        return 0
    device = torch.device(device)
    with re_estimating(model, bns):
        for x, _ in _batches(data.train, data.task, batch_size, batches):
            if data.task == "detection":
                model([i.to(device) for i in x])  # eval-mode detector: no targets needed
            else:
                model(x.to(device))
    return len(bns)


def batchnorms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's batch-norm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


@contextlib.contextmanager
def re_estimating(model: torch.nn.Module, bns: Sequence[torch.nn.Module]):
    """`model` in eval mode (dropout off) with `bns` reset and accumulating a cumulative average
    of the statistics of the batches run meanwhile; momenta and modes given back after."""
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches run
        m.train()
    try:
        yield
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)


# --- initialising a plan's groups -----------------------------------------------------------------


def _layer(models: Mapping[str, torch.nn.Module], model: str, layer: str) -> torch.nn.Module:
    try:
        return models[model].get_submodule(layer)
    except AttributeError:
        raise PlanError(f"model '{model}' has no layer '{layer}'") from None


def initialise_groups(models: Mapping[str, torch.nn.Module], groups: Sequence[PlannedGroup], settings: InitSettings,
                      data: Mapping[str, ModelData] | None = None,
                      base: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                      device: torch.device | str = "cpu") -> list[str]:
    """Write the chosen start value into every member's copy of each group's parameters (in
    place, before tying). `data` is needed for `fisher`; `base` (model -> its pretrained
    state_dict) for `ties`. Returns notes (fallbacks taken)."""
    method = settings.method
    if method not in METHODS:
        raise PlanError(f"init method '{method}' is unknown; use one of {', '.join(METHODS)}")
    notes: list[str] = []
    if method == "first" or not groups:
        return notes
    fishers: dict[tuple[str, str, str], torch.Tensor] = {}
    if method == "fisher":
        if data is None:
            raise PlanError("init method 'fisher' needs each model's data")
        wanted: dict[str, dict[str, torch.nn.Parameter]] = {}
        for g in groups:
            for m in g.members:
                for pname, p in _layer(models, m.model, m.layer).named_parameters(recurse=False):
                    wanted.setdefault(m.model, {})[f"{m.layer}.{pname}"] = p
        for name, params in wanted.items():
            for key, f in diagonal_fisher(models[name], data[name], params, batches=settings.fisher_batches,
                                          device=device).items():
                layer, _, pname = key.rpartition(".")
                fishers[(name, layer, pname)] = f
    if method == "ties" and not base:
        notes.append("ties: no pretrained base stated (plan init.base); used mean")
    for g in groups:
        layers = [_layer(models, m.model, m.layer) for m in g.members]
        for pname, _ in layers[0].named_parameters(recurse=False):
            copies = [getattr(layer, pname).detach() for layer in layers]
            if method == "mean" or (method == "ties" and not base):
                value = combine_mean(copies)
            elif method == "fisher":
                value = combine_fisher(copies, [fishers[(m.model, m.layer, pname)] for m in g.members])
            else:
                bases = [(base or {}).get(m.model, {}).get(f"{m.layer}.{pname}") for m in g.members]
                b = bases[0]
                if b is None or any(x is None or x.shape != b.shape or not torch.equal(x, b) for x in bases) \
                        or b.shape != copies[0].shape:
                    notes.append(f"ties: group {g.id} {pname} has no common base tensor; used mean")
                    value = combine_mean(copies)
                else:
                    value = combine_ties(copies, b.to(copies[0].device), settings.ties_density)
            with torch.no_grad():
                for layer in layers:
                    getattr(layer, pname).copy_(value)
    return notes


def after_tying(models: Mapping[str, torch.nn.Module], names: Sequence[str], settings: InitSettings,
                data: Mapping[str, ModelData] | None, device: torch.device | str = "cpu") -> None:
    """The part of the init that follows tying: recompute the named models' batch-norm statistics."""
    if not settings.recompute_bn or data is None:
        return
    for n in names:
        if n in data:
            models[n].to(device)
            recompute_batchnorm(models[n], data[n], batches=settings.bn_batches, device=device)


def load_base(workload, names: Sequence[str], settings: InitSettings) -> dict[str, dict[str, torch.Tensor]] | None:
    """Each named model's state_dict in the stated pretrained base (the torchvision weights in
    the torch hub cache), for models of the base's architecture; None without a base."""
    if settings.base is None:
        return None
    from ..models.build import _hub_file
    from ..models.checkpoints import read_state_dict

    w = settings.base.weights
    path = workload.resolve(w) if ("/" in w or w.endswith((".pt", ".pth", ".safetensors"))) else \
        _hub_file(settings.base.architecture, w)
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    out = {}
    for n in names:
        source = workload.model(n).source
        if getattr(source, "architecture", None) == settings.base.architecture:
            out[n] = state
    return out


__all__ = ["BN_BATCH_SIZE", "METHODS", "after_tying", "batchnorms", "combine_fisher", "combine_mean", "combine_ties",
           "diagonal_fisher", "initialise_groups", "load_base", "re_estimating", "recompute_batchnorm"]
