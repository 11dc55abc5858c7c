"""Merging: merge plans (the operator-edited recipe) and weight tying (Qt-free).

Joint retraining and the incremental heuristic build on these (not built yet).
"""

from .plan import GroupState, MergePlan, PlanError, PlannedGroup, load_plan, propose_plan, save_plan, validate_plan
from .tying import apply_plan, unique_param_bytes

__all__ = ["GroupState", "MergePlan", "PlanError", "PlannedGroup", "apply_plan", "load_plan", "propose_plan",
           "save_plan", "unique_param_bytes", "validate_plan"]
