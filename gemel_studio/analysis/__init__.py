"""What a workload costs and what its models could share (Qt-free).

`analyze_workload` builds each model (on the meta device where possible), takes its
per-layer inventory and finds the shareable groups across models. Models that are the same
model as far as the figures go (same architecture, classes, task, input and batch size,
and the same tensor shapes and dtypes in their weight file; for TorchScript and ONNX, the
same file) are built and measured once: a fleet of 1,000 cameras running four
architectures costs four builds, not 1,000. Each weight file is still checked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..models import build_model, checkpoints
from ..models.build import _weights_path
from ..progress import Progress
from ..workload import CheckpointSource, ModelSpec, TorchvisionSource, Workload
from .groups import ALIGNMENTS, Alignment, GroupMember, ShareGroup, find_share_groups
from .inventory import inventory_from_built
from .records import LayerRecord, ModelInventory, TensorInfo

__all__ = ["ALIGNMENTS", "Alignment", "GroupMember", "LayerRecord", "ModelInventory", "ShareGroup",
           "TensorInfo", "WorkloadAnalysis", "analyze_workload", "find_share_groups", "inventory_from_built"]


@dataclass
class WorkloadAnalysis:
    workload: str
    alignment: str
    models: list[ModelInventory]
    groups: list[ShareGroup]
    # How many models were built and measured; the others share the inventory of an identical
    # model (see `analyze_workload`). Not part of to_dict: the figures do not depend on it.
    built_models: int = 0

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
    materialize = device == "cpu"
    inventories = []
    seen: dict[tuple, ModelInventory] = {}  # model key -> the inventory measured for it
    headers: dict[tuple, tuple] = {}  # weight file identity -> its tensor specs, read once
    for spec in workload.models:
        progress.check()
        try:
            key = model_key(workload, spec, materialize, headers)
        except Exception:
            # Let the build report the error as it always has (its checks run in its order).
            build_model(workload, spec, materialize=materialize)
            raise
        first = seen.get(key)
        if first is None:
            built = build_model(workload, spec, materialize=materialize)
            inventory = seen[key] = inventory_from_built(built, workload)
        else:
            inventory = _inventory_for(first, spec)
        inventories.append(inventory)
        progress.step(f"analysed {spec.name}")
    groups = find_share_groups(inventories, alignment)
    progress.step("share groups found")
    return WorkloadAnalysis(workload=workload.name, alignment=alignment, models=inventories, groups=groups,
                            built_models=len(seen))


def _file_identity(path: Path) -> tuple[str, int, int]:
    """Which file this is, as far as one analysis needs to know: resolved path, size, mtime."""
    checkpoints._check_exists(path)
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def model_key(workload: Workload, spec: ModelSpec, materialize: bool = False,
              headers: dict[tuple, tuple] | None = None) -> tuple:
    """Two models with equal keys have the same inventory up to their names: what decides the
    figures is in it. Raises what the weight file checks raise (missing, unreadable header).

    - torchvision and checkpoint sources: source kind, architecture, classes, task, input and
      batch size, and for a weight file the names, shapes and dtypes of its tensors, read
      from its header (safetensors: the JSON header; .pt/.pth: torch.load with mmap, which
      reads the pickled index, not the tensor data, for the usual zip format). Whether the
      file fits the architecture then follows from the key, so each file is checked by
      reading its header. With materialize (real weights read), the file itself is in the
      key instead: each distinct file is loaded once.
    - TorchScript and ONNX: the resolved file path, its size and mtime (and task, sizes).
    `headers` caches a file's specs by its identity within one analysis.
    """
    source = spec.source
    common = (source.kind, spec.task, tuple(workload.input_size_of(spec)), workload.batch_size)
    if isinstance(source, (TorchvisionSource, CheckpointSource)):
        path, pretrained = _weights_path(workload, source)
        weights: tuple | None = None
        if path is not None:
            ident = _file_identity(path)
            if materialize:
                weights = ("file", *ident)
            else:
                if headers is None or ident not in headers:
                    specs = checkpoints.read_tensor_specs(path)
                    digest = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in specs.items()))
                    if headers is None:
                        headers = {}
                    headers[ident] = digest
                weights = ("header", headers[ident])
            weights = (pretrained, weights)
        return (*common, source.architecture, spec.num_classes, weights)
    return (*common, _file_identity(workload.resolve(source.path)))


def _inventory_for(first: ModelInventory, spec: ModelSpec) -> ModelInventory:
    """`first`'s figures under `spec`'s name. Layer records are shared: nothing mutates them."""
    return dataclasses.replace(first, name=spec.name, architecture=spec.architecture, task=spec.task,
                               source_kind=spec.source.kind, layers=list(first.layers), notes=list(first.notes))
