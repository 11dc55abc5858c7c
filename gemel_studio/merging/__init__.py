"""Merging: merge plans (the operator-edited recipe), the merge's options, weight tying, the
search and joint retraining (Qt-free).

The names below are imported on first use: `merging.options` (the flags' models) loads
without torch, so the command line builds its parser without importing the merging code.
"""

from importlib import import_module

_WHERE = {"GroupState": "plan", "MergePlan": "plan", "PlanError": "plan", "PlannedGroup": "plan",
          "load_plan": "plan", "propose_plan": "plan", "save_plan": "plan", "validate_plan": "plan",
          "apply_plan": "tying", "unique_param_bytes": "tying"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
