"""What a workload costs and what its models could share (Qt-free).

`analyze_workload` builds each model (on the meta device where possible), takes its
per-layer inventory and finds the shareable groups across models.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import build_model
from ..progress import Progress
from ..workload import Workload
from .groups import ALIGNMENTS, Alignment, GroupMember, ShareGroup, find_share_groups
from .inventory import LayerRecord, ModelInventory, TensorInfo, inventory_from_built

__all__ = ["ALIGNMENTS", "Alignment", "GroupMember", "LayerRecord", "ModelInventory", "ShareGroup",
           "TensorInfo", "WorkloadAnalysis", "analyze_workload", "find_share_groups", "inventory_from_built"]


@dataclass
class WorkloadAnalysis:
    workload: str
    alignment: str
    models: list[ModelInventory]
    groups: list[ShareGroup]

    @property
    def total_param_bytes(self) -> int:
        return sum(m.param_bytes for m in self.models)

    @property
    def max_savings_bytes(self) -> int:
        """The all-shareable bound: every group merged."""
        return sum(g.savings_bytes for g in self.groups)

    @property
    def max_savings_fraction(self) -> float:
        total = self.total_param_bytes
        return self.max_savings_bytes / total if total else 0.0

    def cumulative_savings(self) -> list[int]:
        """Bytes saved after merging the first k groups (in their order), k = 1..len(groups)."""
        out, running = [], 0
        for g in self.groups:
            running += g.savings_bytes
            out.append(running)
        return out

    def model(self, name: str) -> ModelInventory:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "workload": self.workload,
            "alignment": self.alignment,
            "models": [{
                "name": m.name, "architecture": m.architecture, "task": m.task, "source": m.source_kind,
                "input_size": list(m.input_size), "batch_size": m.batch_size, "built_on": m.built_on,
                "param_count": m.param_count, "param_bytes": m.param_bytes, "buffer_bytes": m.buffer_bytes,
                "activation_bytes": m.activation_bytes, "notes": m.notes,
                "layers": [{"name": layer.name, "kind": layer.kind, "signature": layer.signature,
                            "param_bytes": layer.param_bytes, "buffer_bytes": layer.buffer_bytes,
                            "activation_bytes": layer.activation_bytes, "trainable": layer.trainable}
                           for layer in m.layers],
            } for m in self.models],
            "groups": [g.to_dict() for g in self.groups],
            "total_param_bytes": self.total_param_bytes,
            "max_savings_bytes": self.max_savings_bytes,
            "max_savings_fraction": round(self.max_savings_fraction, 6),
        }


def analyze_workload(workload: Workload, alignment: Alignment = "structure",
                     progress: Progress | None = None, device: str = "meta") -> WorkloadAnalysis:
    """Inventory every model and find the share groups. Raises GemelError on bad input and
    Cancelled (between models) when `progress` was cancelled.

    device='meta' (the default) builds structure only and costs no weight memory;
    device='cpu' builds real models with their weights and runs a real forward pass (slower,
    the same figures; kept for comparison, see benchmarks/analyze.py)."""
    if device not in ("meta", "cpu"):
        raise ValueError(f"analysis device must be 'meta' or 'cpu', not {device!r}")
    progress = progress or Progress()
    progress.start(len(workload.models) + 1, "analysing")
    inventories = []
    for spec in workload.models:
        progress.check()
        built = build_model(workload, spec, materialize=device == "cpu")
        inventories.append(inventory_from_built(built, workload))
        progress.step(f"analysed {spec.name}")
    groups = find_share_groups(inventories, alignment)
    progress.step("share groups found")
    return WorkloadAnalysis(workload=workload.name, alignment=alignment, models=inventories, groups=groups)
