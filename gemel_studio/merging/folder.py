"""A merge's output folder (`gemel merge --out DIR`, the studio's Retraining tab): which files
are its checkpoint, its report and its baseline, and whether a rerun resumes.

One place knows these names, so that the CLI, the pipeline and the studio agree on what a
folder holds and what deleting it would lose.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .report import MergeReport

STATE = "search.state"  # the search after its last finished round
ROUND = "search.state.round"  # the round in progress, at its last epoch or exact step
REPORT = "report.json"  # written last: the search finished
BASELINE = "baseline.json"  # each model's unmerged accuracy and target, measured once per merge
RUN = "studio-run.json"  # what the studio started the merge with (strategy, folder), to offer a resume
RUN_PLAN = "studio-plan.yaml"  # the plan, with its retraining settings, that the studio started with
WEIGHTS = "merged.safetensors"  # every distinct tensor once; its metadata maps model tensors to them
TENSOR_MAP = "gemel.tensor_map"  # the metadata key: {model: {state_dict key: stored key}}


def save_shared_weights(path: Path, tensors: dict, mapping: dict[str, dict[str, str]]) -> None:
    """`tensors` (each distinct tensor once) to safetensors at `path`, with the map from every
    model's tensor names to the stored keys in its metadata; written beside and renamed, so a
    crash leaves the old file or the new one. `gemel merge` and `gemel export` both write this."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata={"gemel.format": "1", TENSOR_MAP: json.dumps(mapping)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no half file behind


def read_tensor_map(path: Path) -> dict[str, dict[str, str]]:
    """The tensor map `save_shared_weights` wrote, or a one-line error naming what is wrong."""
    from safetensors import safe_open

    from ..errors import GemelError

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise GemelError(f"{path}: unreadable ({exc}); run `gemel merge` again") from None
    if TENSOR_MAP not in meta:
        raise GemelError(f"{path}: no {TENSOR_MAP} metadata; it was not written by `gemel merge`")
    try:
        return json.loads(meta[TENSOR_MAP])
    except ValueError:
        raise GemelError(f"{path}: its {TENSOR_MAP} is not valid JSON; run `gemel merge` again") from None


@dataclass(frozen=True)
class MergedFolder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    # --- what is there ----------------------------------------------------------------------

    @property
    def checkpoint_files(self) -> list[Path]:
        """The files a resume continues from, those that exist."""
        return [p for p in (self.path / STATE, self.path / ROUND) if p.exists()]

    @property
    def has_checkpoint(self) -> bool:
        return bool(self.checkpoint_files)

    @property
    def has_report(self) -> bool:
        return (self.path / REPORT).exists()

    @property
    def can_resume(self) -> bool:
        """A search stopped before its report (the search keeps its state after finishing, too)."""
        return self.has_checkpoint and not self.has_report

    def report(self) -> MergeReport | None:
        """report.json, or None when there is none (or it cannot be read as a report)."""
        data = _read_json(self.path / REPORT)
        if not isinstance(data, dict):
            return None
        try:
            return MergeReport.from_dict(data)
        except ValidationError:
            return None

    def write_report(self, report: MergeReport | dict) -> None:
        """report.json, written last (a finished merge); its format is MergeReport.to_dict()'s."""
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.path / REPORT, report.to_dict() if isinstance(report, MergeReport) else report)

    def baseline(self) -> dict | None:
        """{'models': {name: {'unmerged_accuracy': a, 'target': t}}} or None."""
        data = _read_json(self.path / BASELINE)
        return data if isinstance(data, dict) and isinstance(data.get("models"), dict) else None

    def write_baseline(self, unmerged: dict[str, float], targets: dict[str, float]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.path / BASELINE, {"models": {n: {"unmerged_accuracy": unmerged[n], "target": targets[n]}
                                                       for n in unmerged}})

    def run_settings(self) -> dict | None:
        return _read_json(self.path / RUN)

    def write_run_settings(self, settings: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_json(self.path / RUN, settings)

    def describe_loss(self) -> str:
        """What a fresh start here would delete, in words ('' when nothing)."""
        parts = []
        if self.has_report:
            parts.append(f"the finished merge's {REPORT}")
        if self.has_checkpoint:
            parts.append("the checkpoint (" + ", ".join(p.name for p in self.checkpoint_files) + ")")
        return " and ".join(parts)

    # --- deleting ---------------------------------------------------------------------------

    def delete_checkpoint(self) -> None:
        for p in (self.path / STATE, self.path / ROUND):
            p.unlink(missing_ok=True)

    def clear(self) -> None:
        """Everything a fresh merge must not resume from: checkpoint, baseline and report."""
        self.delete_checkpoint()
        for name in (BASELINE, REPORT):
            (self.path / name).unlink(missing_ok=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["BASELINE", "REPORT", "ROUND", "RUN", "RUN_PLAN", "STATE", "MergedFolder"]
