"""How a plan is merged, stated once: `RetrainSettings` (what a plan file keeps: optimizer,
learning rate, epochs, batch size, device, time budget, minimum savings) and `MergeOptions`
(the search's strategy, a sample limit and the minimum savings in MiB, over the retraining
settings). The `gemel merge` / `gemel finetune` flags are built from these fields
(gemel_studio.options), the studio's Retraining form takes its choices, ranges and defaults
from them and validates through them, and `merge_workload` runs with a `MergeOptions`.

Torch-free: the command line builds its flags without importing the merging code.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from ..errors import GemelError

MIB = 1024 * 1024

Strategy = Literal["bisect", "gemel", "predict"]  # bisect first: the default
STRATEGY_NAMES: tuple[str, ...] = get_args(Strategy)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _hidden(**kwargs):
    """A setting a plan file keeps but no flag sets."""
    return Field(json_schema_extra={"cli": False}, **kwargs)


class RetrainSettings(_Strict):
    """The retraining settings a plan keeps (its `retraining:` section)."""
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd (with momentum) or adam")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate")
    momentum: float = _hidden(default=0.9, ge=0)
    weight_decay: float = _hidden(default=5e-4, ge=0)
    epochs: int = Field(10, gt=0, le=10_000, description="most epochs per round (a merge round stops early "
                                                         "once every model meets its target)")
    batch_size: int = Field(32, gt=0, le=65_536, description="samples per training step")
    device: str = Field("auto", description="auto (default: CUDA when present), cpu, cuda, cuda:N")
    time_budget_s: float | None = Field(None, gt=0, le=10_000_000, description="seconds; stop the search when "
                                        "they run out", json_schema_extra={"flag": "--time-budget", "metavar": "S"})
    # Candidates (or halves of a failed one) that would save fewer bytes are not tried: the
    # tail of tiny layers costs as many retraining rounds as the heavy ones and saves little.
    min_savings_bytes: int = _hidden(default=0, ge=0)
    # Evaluate a tied candidate before its first training step; bank it if every model meets
    # its target already (zero retraining).
    check_before_training: bool = _hidden(default=True)
    # Evaluate on the held-out split this many times per epoch (the last at the epoch's end) and
    # stop the round at the first check where every model meets its target; GEMEL's reference
    # validates more often than once an epoch too. The loss weights follow each check.
    checks_per_epoch: int = _hidden(default=4, ge=1, le=1000)


# What `gemel finetune` (and the studio's Fine-tune tab) trains each model alone with.
FINETUNE_SETTINGS = RetrainSettings(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=10)


class MergeOptions(_Strict):
    """One merge's options: the search and, over the plan's, its retraining settings.
    A bad value raises GemelError naming its flag (through gemel_studio.options)."""
    strategy: Strategy = Field("bisect", description="bisect: all candidates first, split on failure (default); "
                               "gemel: the reference loop; predict: by the plan's merge risk, first the groups "
                               "predicted to need no retraining, then the low-risk ones, split safer-first")
    limit: int | None = Field(None, gt=0, description="use at most this many samples per dataset (quick runs)")
    min_savings_mib: float | None = Field(None, ge=0, description="do not try candidates (or halves of failed "
                                          "ones) that save less than this many MiB",
                                          json_schema_extra={"flag": "--min-savings", "metavar": "MIB"})
    retraining: RetrainSettings = _hidden(default_factory=RetrainSettings)

    @property
    def settings(self) -> RetrainSettings:
        """The retraining settings the search runs with (the minimum savings given here in MiB
        replaces the retraining's, in bytes)."""
        if self.min_savings_mib is None:
            return self.retraining
        return self.retraining.model_copy(update={"min_savings_bytes": int(self.min_savings_mib * MIB)})


def require_merge_extra(command: str) -> None:
    """Retraining needs the [merge] extra (detection mAP): say so in one line, before any work
    (and before the merging code is imported, which would fail on it)."""
    import importlib.util

    for module in ("torchmetrics", "pycocotools"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise GemelError(f"gemel {command} needs the [merge] extra ({module} is missing): "
                             "pip install 'gemel-studio[merge]'")


__all__ = ["FINETUNE_SETTINGS", "MIB", "MergeOptions", "RetrainSettings", "STRATEGY_NAMES", "Strategy", "require_merge_extra"]
