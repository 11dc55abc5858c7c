"""Reading the folder `gemel merge --out` wrote into what a bundle holds: the workload, each
deployable model's manifest entry, the stored tensors and the models built over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GemelError
from ..merging.folder import WEIGHTS, read_tensor_map
from ..models import build_model
from ..runtime.bundle import BundleModel, build_models
from ..workload import CheckpointSource, ModelSpec, TorchvisionSource, Workload, load_workload
from .manifest import bundle_model, onnx_file_name

MERGED_FILES = (WEIGHTS, "plan.yaml", "report.json", "workload.yaml")


@dataclass
class MergedFolder:
    path: Path
    workload: Workload
    specs: list[BundleModel]  # the manifest's entries, one per deployed model
    stored: dict[str, torch.Tensor]  # merged.safetensors' tensors, plus the untouched models' own
    models: dict[str, torch.nn.Module]  # each deployed model, its tensors those of `stored`
    untouched: list[str] = field(default_factory=list)  # models no merged group touched
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS


def _tensor_map(merged_dir: Path) -> dict[str, dict[str, str]]:
    return read_tensor_map(merged_dir / WEIGHTS)


def _deployable(spec: ModelSpec) -> bool:
    return isinstance(spec.source, (TorchvisionSource, CheckpointSource))


def read_merged_folder(merged_dir: Path) -> MergedFolder:
    """The merged folder's contents, with a one-line error naming what is missing or wrong."""
    from safetensors.torch import load_file

    if not merged_dir.is_dir():
        raise GemelError(f"{merged_dir}: no such folder; name the folder `gemel merge --out` wrote")
    missing = [n for n in MERGED_FILES if not (merged_dir / n).is_file()]
    if missing:
        hint = ("merge with this version of gemel, which writes it" if missing == ["workload.yaml"]
                else "run `gemel merge` to completion first")
        raise GemelError(f"{merged_dir}: not a complete merged folder, missing {', '.join(missing)}; {hint}")
    workload = load_workload(merged_dir / "workload.yaml")
    tensor_map = _tensor_map(merged_dir)
    specs: list[BundleModel] = []
    taken: set[str] = set()

    def add(spec: ModelSpec, tensors: dict[str, str]) -> None:
        if not _deployable(spec):
            raise GemelError(f"model '{spec.name}': only torchvision and checkpoint models can be bundled "
                             f"(its source is {spec.source.kind}); merge it again from one of those")
        specs.append(bundle_model(workload, spec, tensors, onnx_file_name(spec.name, taken)))

    for name, tensors in tensor_map.items():
        try:
            spec = workload.model(name)
        except KeyError:
            raise GemelError(f"{merged_dir}: merged.safetensors names model '{name}', which workload.yaml "
                             "does not have; run `gemel merge` again") from None
        add(spec, tensors)

    stored = load_file(str(merged_dir / WEIGHTS))
    # Models the merge did not touch (no group of theirs was merged) still run on the edge box:
    # their own weights go into the bundle too, unshared.
    untouched, notes = [], []
    for spec in (s for s in workload.models if s.name not in tensor_map):
        if not _deployable(spec):
            notes.append(f"{spec.name}: not bundled: a {spec.source.kind} model is analysed only, not deployed")
            continue
        module = build_model(workload, spec, materialize=True).module
        own: dict[str, str] = {}
        for key, t in module.state_dict().items():
            name = f"{spec.name}.{key}"
            while name in stored:
                name = "_" + name
            stored[name] = t.detach().cpu().contiguous()
            own[key] = name
        add(spec, own)
        untouched.append(spec.name)
        notes.append(f"{spec.name}: not merged with any model; its own weights are bundled unshared")
    return MergedFolder(merged_dir, workload, specs, stored, build_models(specs, stored), untouched, notes)


__all__ = ["MERGED_FILES", "MergedFolder", "read_merged_folder"]
