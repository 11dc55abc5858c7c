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
