"""Merge plans: the versioned YAML recipe of which layer groups share one copy of weights.

A plan names its workload (and a hash of the workload's content), the share groups in the
order proposed, each with its members and a state, and the retraining settings. Loading a
plan checks it against the workload's analysis: unknown models or layers, members that are
not interchangeable, or a layer in two groups are refused with a message naming the group.
"""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..analysis import WorkloadAnalysis
from ..errors import GemelError
from ..workload import CheckpointSource, TorchvisionSource, Workload, workload_to_dict
from .options import RetrainSettings  # noqa: F401  (a plan's `retraining:`; stated with the merge's options)

PLAN_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # version 1: no init (first member's weights, statistics kept), no risk


class PlanError(GemelError):
    """A merge plan that cannot be read or does not fit its workload."""


class GroupState(str, Enum):
    proposed = "proposed"
    accepted = "accepted"
    rejected = "rejected"
    kept = "kept"  # accepted, retrained, every model met its target
    backed_off = "backed_off"  # accepted, but retraining missed a target: not merged

    @property
    def merged(self) -> bool:
        return self in (GroupState.accepted, GroupState.kept)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GroupRisk(_Strict):
    """How likely a group is to merge, measured without retraining (merging/risk.py)."""
    cka: float | None = None  # lowest linear CKA between two members' activations at the layer (1 = same)
    drop: dict[str, float] = Field(default_factory=dict)  # accuracy each member loses, the group alone tied
    init: str | None = None  # the init method the drop was measured with
    # For a group too small for its own drop (under the floor): each member's accuracy lost when
    # it is tied together with every other such group (`joint_groups` in all), measured once for
    # them all: what the whole tail costs, not this group's drop alone (usually less).
    joint_drop: dict[str, float] = Field(default_factory=dict)
    joint_groups: int = Field(0, ge=0)

    @property
    def max_drop(self) -> float | None:
        return max(self.drop.values()) if self.drop else None

    @property
    def max_joint_drop(self) -> float | None:
        return max(self.joint_drop.values()) if self.joint_drop else None


class PlannedMember(_Strict):
    model: str
    layer: str


class PlannedGroup(_Strict):
    id: str
    signature: str
    members: list[PlannedMember] = Field(min_length=2)
    bytes_per_copy: int = Field(ge=0)
    state: GroupState = GroupState.proposed
    risk: GroupRisk | None = None  # measured by `gemel propose` without retraining (optional)

    @property
    def savings_bytes(self) -> int:
        return self.bytes_per_copy * (len(self.members) - 1)


class PretrainedBase(_Strict):
    """The common pretrained weights the models were fine-tuned from (for `ties`)."""
    architecture: str
    weights: str  # a torchvision weight name (found in the torch hub cache) or a file

    @classmethod
    def parse(cls, text: str, what: str = "--base") -> "PretrainedBase":
        """'ARCHITECTURE:WEIGHTS', e.g. 'mobilenet_v2:IMAGENET1K_V1'."""
        arch, sep, weights = text.partition(":")
        if not sep or not arch or not weights:
            raise PlanError(f"{what} {text}: expected ARCHITECTURE:WEIGHTS, e.g. mobilenet_v2:IMAGENET1K_V1")
        return cls(architecture=arch, weights=weights)

    @classmethod
    def common(cls, workload: Workload) -> "PretrainedBase | None":
        """The torchvision weights every torchvision model of the workload names (or a checkpoint
        says it was fine-tuned from, as `gemel finetune` writes), if one set."""
        named = {(s.source.architecture, s.source.weights) for s in workload.models
                 if isinstance(s.source, TorchvisionSource) and s.source.weights}
        named |= {(s.source.architecture, s.source.finetuned_from) for s in workload.models
                  if isinstance(s.source, CheckpointSource) and s.source.finetuned_from}
        if len(named) == 1:
            arch, weights = named.pop()
            return cls(architecture=arch, weights=weights)
        return None


class InitSettings(_Strict):
    """How a shared tensor starts (merging/initialise.py)."""
    method: Literal["first", "mean", "fisher", "ties"] = "mean"
    recompute_bn: bool = True  # re-estimate each model's batch-norm statistics after tying
    bn_batches: int = Field(20, gt=0)
    fisher_batches: int = Field(4, gt=0)
    base: PretrainedBase | None = None  # for ties
    ties_density: float = Field(0.2, gt=0, le=1)  # fraction of each task vector TIES keeps


class PlanWorkload(_Strict):
    name: str
    sha256: str


class MergePlan(_Strict):
    version: int = PLAN_VERSION
    workload: PlanWorkload
    alignment: str = "structure"
    share_buffers: bool = False  # batch-norm running statistics stay per model unless true
    init: InitSettings = Field(default_factory=InitSettings)
    groups: list[PlannedGroup] = Field(default_factory=list)
    retraining: RetrainSettings = Field(default_factory=RetrainSettings)

    def merged_groups(self) -> list[PlannedGroup]:
        return [g for g in self.groups if g.state.merged]

    @property
    def merged_savings_bytes(self) -> int:
        return sum(g.savings_bytes for g in self.merged_groups())


def workload_hash(workload: Workload) -> str:
    """Of the workload's content, not its file: comments and key order do not change it."""
    data = workload_to_dict(workload)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def default_init(workload: Workload) -> InitSettings:
    """The init a new plan gets: TIES against the models' common pretrained weights when they name
    one set (measured fastest to repair on the Fashion-MNIST workload), else the members' mean."""
    base = PretrainedBase.common(workload)
    return InitSettings(method="ties", base=base) if base is not None else InitSettings(method="mean")


def propose_plan(workload: Workload, analysis: WorkloadAnalysis) -> MergePlan:
    """Every share group as a proposal, heaviest savings first (GEMEL's first observation), with
    the default init (default_init)."""
    groups = [PlannedGroup(id=f"g{i + 1:03d}", signature=g.signature,
                           members=[PlannedMember(model=m.model, layer=m.layer) for m in g.members],
                           bytes_per_copy=g.bytes_per_copy)
              for i, g in enumerate(analysis.groups)]
    return MergePlan(workload=PlanWorkload(name=workload.name, sha256=workload_hash(workload)),
                     alignment=analysis.alignment, groups=groups, init=default_init(workload))


def check_plan_workload(plan: MergePlan, workload: Workload, origin: str = "plan") -> None:
    """Refuse a plan proposed for another workload, or for another version of this one, in one
    line that names the workload the plan was made for and the command that makes a new plan."""
    current = workload_hash(workload)
    if plan.workload.sha256 == current:
        return
    made = f"'{plan.workload.name}' (sha256 {plan.workload.sha256[:12]})"
    what = (f"made for another version of workload {made}; this one's is {current[:12]}, so its models, datasets "
            f"or targets changed" if plan.workload.name == workload.name
            else f"made for workload {made}, not for '{workload.name}'")
    where = str(workload.path) if workload.path is not None else "WORKLOAD.yaml"
    target = origin if origin.endswith((".yaml", ".yml")) else "PLAN.yaml"
    raise PlanError(f"{origin}: {what}; propose a plan for this workload: gemel propose {where} -o {target}")


def validate_plan(plan: MergePlan, workload: Workload, analysis: WorkloadAnalysis, origin: str = "plan") -> None:
    if plan.version not in SUPPORTED_VERSIONS:
        raise PlanError(f"{origin}: plan version {plan.version} is not supported (expected one of "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    check_plan_workload(plan, workload, origin)
    inventories = {m.name: m for m in analysis.models}
    used: dict[tuple[str, str], str] = {}
    for group in plan.groups:
        models = [m.model for m in group.members]
        if len(set(models)) != len(models):
            raise PlanError(f"{origin}: group {group.id} has two layers of one model; a group holds one per model")
        for member in group.members:
            inv = inventories.get(member.model)
            if inv is None:
                raise PlanError(f"{origin}: group {group.id} names model '{member.model}', which the workload "
                                f"does not have")
            try:
                layer = inv.layer(member.layer)
            except KeyError:
                raise PlanError(f"{origin}: group {group.id}: model '{member.model}' has no layer "
                                f"'{member.layer}'") from None
            if layer.signature != group.signature:
                raise PlanError(f"{origin}: group {group.id}: {member.model}:{member.layer} is {layer.signature}, "
                                f"not interchangeable with the group's {group.signature}")
            key = (member.model, member.layer)
            if key in used:
                raise PlanError(f"{origin}: {member.model}:{member.layer} is in groups {used[key]} and {group.id}; "
                                "a layer can be in one group only")
            used[key] = group.id
        if group.bytes_per_copy != inventories[group.members[0].model].layer(group.members[0].layer).param_bytes:
            raise PlanError(f"{origin}: group {group.id}: bytes_per_copy does not match the layer's parameters")


def check_plan_path(path: Path) -> None:
    """Before a plan is made: `path` must name a file in a folder that exists."""
    if path.is_dir():
        raise PlanError(f"{path}: is a folder; name the plan file to write, e.g. {path / 'plan.yaml'}")
    if not path.parent.is_dir():
        raise PlanError(f"{path}: the folder {path.parent} does not exist; create it or write the plan elsewhere")


def save_plan(plan: MergePlan, path: Path | str) -> None:
    path = Path(path)
    text = yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def load_plan(path: Path | str, workload: Workload | None = None, analysis: WorkloadAnalysis | None = None) -> MergePlan:
    """Read a plan; with a workload and its analysis, also check that it fits them."""
    path = Path(path)
    if not path.exists():
        raise PlanError(f"{path}: no such plan file (check the path)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and data.get("version") == 1 and "init" not in data:
        # A version-1 plan meant GEMEL's tying: the first member's weights, statistics kept as they were.
        data = {**data, "version": PLAN_VERSION, "init": {"method": "first", "recompute_bn": False}}
    try:
        plan = MergePlan.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = "unknown key (remove it or check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        raise PlanError(f"{path}: field '{field}': {msg}") from None
    if workload is not None and analysis is not None:
        validate_plan(plan, workload, analysis, origin=str(path))
    return plan
