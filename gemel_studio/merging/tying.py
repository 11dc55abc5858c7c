"""Weight tying: every member of a merged group uses one parameter storage.

Tying replaces each member's own parameters with the first member's Parameter objects, so
an optimizer step sees one tensor and gradients from every model that uses it add up in
its `.grad`. Buffers (batch-norm running statistics) stay per model unless the plan says
otherwise. Measured bytes count unique storages, never the sum over models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .plan import MergePlan, PlanError


def _submodule(model: torch.nn.Module, name: str, model_name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise PlanError(f"model '{model_name}' has no layer '{name}'") from None


def apply_plan(models: Mapping[str, torch.nn.Module], plan: MergePlan) -> int:
    """Tie the parameters of every merged group (accepted or kept) across `models`, in place.

    Returns the number of layers that now use another layer's parameters.
    """
    tied = 0
    for group in plan.merged_groups():
        owner_name = group.members[0].model
        owner = _submodule(models[owner_name], group.members[0].layer, owner_name)
        for member in group.members[1:]:
            layer = _submodule(models[member.model], member.layer, member.model)
            for pname, param in owner.named_parameters(recurse=False):
                mine = getattr(layer, pname, None)
                if not isinstance(mine, torch.nn.Parameter) or mine.shape != param.shape or mine.dtype != param.dtype:
                    raise PlanError(f"group {group.id}: {member.model}:{member.layer}.{pname} does not match "
                                    f"{owner_name}:{group.members[0].layer}.{pname}")
                setattr(layer, pname, param)
            if plan.share_buffers:
                for bname, buf in owner.named_buffers(recurse=False):
                    setattr(layer, bname, buf)
            tied += 1
    return tied


def _storage_key(t: torch.Tensor) -> tuple:
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.untyped_storage().data_ptr())


def unique_param_bytes(models: Iterable[torch.nn.Module], include_buffers: bool = False) -> int:
    """Bytes of the distinct storages behind the models' parameters (shared ones once)."""
    seen: dict[tuple, int] = {}
    for model in models:
        tensors = list(model.parameters()) + (list(model.buffers()) if include_buffers else [])
        for t in tensors:
            seen.setdefault(_storage_key(t), t.untyped_storage().nbytes() if t.device.type != "meta"
                            else t.numel() * t.element_size())
    return sum(seen.values())
