"""What a merge found: `MergeReport` (returned by `merge_workload`, kept in the merged folder's
report.json) and its text for the terminal.

report.json's format is fixed (old folders load, and `gemel export` copies it into bundles):
`to_dict()` gives exactly what was written or read, and a report read from an older folder
keeps the keys it had, no more. Unknown keys are kept as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..progress import write_line
from ..units import human_bytes


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with only the keys that were given (those an older report had)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def __eq__(self, other) -> bool:
        # A report equals the dict it was read from or written as.
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return super().__eq__(other)

    __hash__ = None  # mutable, like the dict it stands for


class ModelOutcome(_Record):
    """One model's accuracy before and after the merge, on the split that decided, and beside it
    on the split the search never saw (None: the dataset was too small for one)."""
    labels: str | None = None  # distill: the accuracy is agreement with the unmerged model
    metric: str = "accuracy"
    unmerged_accuracy: float
    merged_accuracy: float
    target: float
    passed: bool
    unmerged_test_accuracy: float | None = None
    merged_test_accuracy: float | None = None


class MergeReport(_Record):
    """A finished merge: per-model outcomes, bytes before and after, the search's rounds."""
    workload: str = ""
    strategy: str = ""
    stopped: str = ""
    device: str = ""
    models: dict[str, ModelOutcome] = Field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    predicted_bytes_after: int | None = None  # from the plan's groups; bytes_after is what was written
    saved_bytes: int = 0
    all_shareable_bytes: int = 0
    fraction_of_bound: float = 0.0
    retrain_seconds: float = 0.0
    rounds: int = 0
    wall_seconds: float | None = None
    # One row per round, the search's `Step` as a dict (what `on_step` sends and the step log shows).
    steps: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping) -> "MergeReport":
        return cls.model_validate(dict(data))

    @property
    def passed(self) -> int:
        """How many models meet their target."""
        return sum(row.passed for row in self.models.values())

    def __getitem__(self, key: str):
        """report['saved_bytes'], as when `merge_workload` returned the dict: for older callers."""
        return self.to_dict()[key]


def format_round(step) -> str:
    """One line for a round of the search (a `Step`)."""
    acc = ", ".join(f"{k} {v:.3f}" for k, v in step.accuracy.items())
    epochs = f", {step.trained_epochs:g} epoch(s) trained" if step.trained_epochs else ""
    return (f"round {step.round}: {len(step.groups)} group(s), {human_bytes(step.savings_bytes)} -> "
            f"{step.outcome} ({step.next_action}{epochs}); {acc}; saved so far {human_bytes(step.saved_bytes_after)}")


def round_printer(as_json: bool):
    """An `on_step` for the terminal: each round as one JSON object a line (`"event": "round"`),
    or as a line of text above the progress bar."""
    def on_step(step) -> None:
        if as_json:
            print(json.dumps({"event": "round", **vars(step)}), flush=True)
        else:
            write_line(format_round(step))
    return on_step


def format_report(report: MergeReport) -> str:
    """Per model: unmerged and merged accuracy against the target; then the bytes saved."""
    out = []
    for name, row in report.models.items():
        unseen = (f"  | unseen split: unmerged {row.unmerged_test_accuracy:.3f}  merged "
                  f"{row.merged_test_accuracy:.3f}" if row.merged_test_accuracy is not None else "")
        out.append(f"{name:16} {row.metric:9} unmerged {row.unmerged_accuracy:.3f}  merged "
                   f"{row.merged_accuracy:.3f}  target {row.target:.3f}  {'pass' if row.passed else 'FAIL'}{unseen}")
    out.append(f"parameter bytes {human_bytes(report.bytes_before)} -> {human_bytes(report.bytes_after)} "
               f"(saved {human_bytes(report.saved_bytes)}, {report.fraction_of_bound:.1%} of the all-shareable "
               f"bound) in {report.rounds} round(s), {report.retrain_seconds:.0f} s of retraining")
    return "\n".join(out)


def format_finetune(summary: dict) -> str:
    """A line per model of `finetune_workload`'s summary: accuracy before and after, or why skipped."""
    return "\n".join(f"{name}: " + (f"{row['metric']} {row['accuracy']:.3f} (from {row['initial_accuracy']:.3f}) "
                                    f"in {row['seconds']:.0f} s" if "accuracy" in row else row["skipped"])
                     for name, row in summary.items())


__all__ = ["MergeReport", "ModelOutcome", "format_finetune", "format_report", "format_round", "round_printer"]
