"""The incremental merge search: which groups to keep, verified by joint retraining.

Two strategies over the same candidates, retraining and bookkeeping:

- `gemel` (the reference): candidates are groups shared by the same set of models (one
  candidate per set, GEMEL's second observation), heaviest first. Each is tied on top of
  what is already kept and the affected models are retrained jointly; success is banked,
  failure retries the heavier half of the candidate if that half still saves more than the
  next candidate, else moves on. It stops when candidates or the time budget run out.
- `bisect`: try every candidate at once first (the all-shareable merge); on failure split
  the block into two halves by savings and recurse, heavier half first. When most merges
  succeed, as GEMEL observed, this needs far fewer retraining rounds for the same savings.
- `predict`: uses the merge risk `gemel propose` measured (plan.groups[].risk: each group's
  accuracy drop when tied alone, with no retraining). First block: the groups whose measured
  drops, added up per model, stay within half of each model's margin (unmerged accuracy minus
  target), fewest points lost per byte first: predicted to merge with zero retraining, which
  the check before training confirms. Then the other low-risk groups (largest drop at most
  LOW_RISK; a group too small for a drop of its own counts the drop of all such groups tied
  together, so a harmless tail joins this block and a harmful one waits), then the rest; a
  failed block is split by risk, the safer half first, so risky groups end up alone and last.
  The output layers of models with different tasks (a 3-class head of one question tied to the
  3-class head of another) come after everything else, in a block of their own: tied with the
  rest they make the whole repair harder, whatever their own drop. Without risk figures it is
  bisection with the risk-ordered split.

Retraining always starts from the last banked weights; a failed round is thrown away.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..errors import GemelError
from ..progress import Progress
from ..devices import resolve_device
from .datasets import ModelData
from .initialise import after_tying, initialise_groups
from .plan import GroupState, MergePlan, PlannedGroup
from .retrain import EpochRecord, RetrainResult, joint_retrain
from .tying import apply_plan

__all__ = ["Candidate", "STRATEGIES", "SearchResult", "Step", "Strategy", "candidates", "predicted_blocks",
           "search"]

Strategy = Literal["gemel", "bisect", "predict"]
STRATEGIES: tuple[Strategy, ...] = ("gemel", "bisect", "predict")
LOW_RISK = 0.05  # predict: a group whose largest zero-retraining drop is at most this is low-risk
SAFE_SHARE = 0.5  # predict: the first block may spend this share of each model's margin, drops added up


def group_risk(g: PlannedGroup) -> float:
    """How risky a group is to merge, from its measured risk (plan.groups[].risk): the largest
    accuracy drop when tied alone, else when tied together with the other small groups (a group
    too small for its own), else 1 - CKA; 0.5 (unknown) without a measurement."""
    r = g.risk
    if r is None:
        return 0.5
    if r.drop:
        return max(0.0, max(r.drop.values()))
    if r.joint_drop:
        return max(0.0, max(r.joint_drop.values()))
    if r.cka is not None:
        return max(0.0, 1.0 - r.cka)
    return 0.5


@dataclass
class Candidate:
    groups: list[PlannedGroup]

    @property
    def savings_bytes(self) -> int:
        return sum(g.savings_bytes for g in self.groups)

    @property
    def models(self) -> frozenset[str]:
        return frozenset(m.model for g in self.groups for m in g.members)

    def halves(self, by_risk: bool = False) -> tuple["Candidate", "Candidate"]:
        """Split by savings: the heavier groups first, about half the bytes in each (by_risk:
        the safer groups first)."""
        ordered = sorted(self.groups, key=(lambda g: (group_risk(g), -g.savings_bytes)) if by_risk
                         else (lambda g: -g.savings_bytes))
        total, running, cut = self.savings_bytes, 0, 0
        for cut, g in enumerate(ordered, start=1):
            running += g.savings_bytes
            if running * 2 >= total:
                break
        cut = min(max(cut, 1), len(ordered) - 1)
        return Candidate(ordered[:cut]), Candidate(ordered[cut:])


@dataclass
class Step:
    round: int
    groups: list[str]
    models: list[str]
    savings_bytes: int
    outcome: str  # 'kept' or 'failed'
    next_action: str
    accuracy: dict[str, float]
    retrain_seconds: float
    saved_bytes_after: int
    elapsed_seconds: float
    epochs: int = 0  # epochs trained this round (0: banked or dropped on the check before training)
    initial_accuracy: dict[str, float] = field(default_factory=dict)  # tied and initialised, before training
    init: str = "first"  # how the candidate's shared tensors started
    trained_epochs: float = 0.0  # epochs trained, a round stopped at a check inside an epoch counting its share


@dataclass
class SearchResult:
    strategy: str
    plan: MergePlan
    steps: list[Step] = field(default_factory=list)
    retrain_seconds: float = 0.0
    stopped: str = "candidates exhausted"
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # banked weights per model

    @property
    def saved_bytes(self) -> int:
        return sum(g.savings_bytes for g in self.plan.groups if g.state is GroupState.kept)


def candidates(plan: MergePlan) -> list[Candidate]:
    """The plan's accepted groups (or, if none is accepted, every group not rejected),
    gathered by the set of models that share them, heaviest candidate first."""
    chosen = [g for g in plan.groups if g.state is GroupState.accepted] or \
             [g for g in plan.groups if g.state is not GroupState.rejected]
    by_models: dict[frozenset[str], list[PlannedGroup]] = {}
    for g in chosen:
        by_models.setdefault(frozenset(m.model for m in g.members), []).append(g)
    out = [Candidate(gs) for gs in by_models.values()]
    out.sort(key=lambda c: -c.savings_bytes)
    return out


def predicted_blocks(groups: list[PlannedGroup], margins: Mapping[str, float] | None,
                     init: str | None = None, defer: Collection[str] = ()) -> list[Candidate]:
    """predict's blocks, in the order tried (see the module's docstring). `margins`: each model's
    unmerged accuracy minus its target; without them there is no first block. `init`: the plan's
    init method; a drop measured with another init says nothing of this one's, so such a group
    is left out of the first block. `defer`: ids of groups tried only after all the others, in a
    block of their own whatever their risk (the output layers of models with different tasks:
    `pipeline.task_heads`)."""
    held = [g for g in groups if g.id in defer]
    groups = [g for g in groups if g.id not in defer]
    def cost(g: PlannedGroup) -> float:  # points lost per byte, the largest over the members
        return max(0.0, g.risk.max_drop) / max(1, g.savings_bytes)

    first: list[PlannedGroup] = []
    if margins:
        spent = {n: 0.0 for n in margins}
        measured = [g for g in groups if g.risk is not None and g.risk.drop
                    and (init is None or g.risk.init in (None, init))]
        for g in sorted(measured, key=lambda g: (cost(g), -g.savings_bytes)):
            drops = {n: max(0.0, d) for n, d in g.risk.drop.items()}
            if all(n in margins and spent[n] + d <= SAFE_SHARE * max(0.0, margins[n]) for n, d in drops.items()):
                first.append(g)
                for n, d in drops.items():
                    spent[n] += d
    chosen = {g.id for g in first}
    rest = [g for g in groups if g.id not in chosen]
    low = [g for g in rest if group_risk(g) <= LOW_RISK]
    high = sorted((g for g in rest if group_risk(g) > LOW_RISK), key=lambda g: (group_risk(g), -g.savings_bytes))
    held.sort(key=lambda g: (group_risk(g), -g.savings_bytes))
    return [Candidate(part) for part in (first, low, high, held) if part]


def _affected(models: frozenset[str], groups: list[PlannedGroup]) -> list[str]:
    """Models connected to `models` through shared groups: all must be retrained together."""
    found = set(models)
    changed = True
    while changed:
        changed = False
        for g in groups:
            names = {m.model for m in g.members}
            if names & found and not names <= found:
                found |= names
                changed = True
    return sorted(found)


Builder = Callable[[], dict[str, torch.nn.Module]]


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def search(build_models: Builder, base_state: Mapping[str, Mapping[str, torch.Tensor]], plan: MergePlan,
           data: Mapping[str, ModelData], targets: Mapping[str, float], strategy: Strategy = "gemel", *,
           progress: Progress | None = None, time_budget_s: float | None = None,
           on_step: Callable[[Step], None] | None = None, seed: int = 0,
           state_path: Path | None = None, on_epoch: Callable[[EpochRecord], None] | None = None,
           init_base: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
           unmerged: Mapping[str, float] | None = None, defer: Collection[str] = ()) -> SearchResult:
    """Run the merge search. `build_models()` returns fresh, untied models; `base_state` holds
    the unmerged weights. Returns the plan with kept/backed-off states and the banked weights.

    With `state_path`, the search is saved after every round (and the round in progress at
    every epoch, or at the exact step on a cancel); calling again with the same path resumes.

    Each candidate's shared tensors start as `plan.init` says (merging/initialise.py; `init_base`
    holds each model's pretrained state for `ties`), batch-norm statistics are recomputed after
    tying, and with `plan.retraining.check_before_training` a candidate whose models all meet
    their targets before the first step is banked with zero retraining. `unmerged` (each model's
    unmerged accuracy) gives `predict` the margins its first block is sized by; `defer` (group
    ids) the groups it tries last, in a block of their own.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}'; expected one of {', '.join(STRATEGIES)}")
    progress = progress or Progress()
    plan = plan.model_copy(deep=True)
    by_id = {g.id: g for g in plan.groups}
    for g in plan.groups:
        if g.state in (GroupState.kept, GroupState.backed_off):
            g.state = GroupState.accepted  # a rerun searches afresh
    queue = candidates(plan)
    for c in queue:
        for g in c.groups:
            g.state = GroupState.accepted
    if strategy == "bisect" and len(queue) > 1:
        queue = [Candidate([g for c in queue for g in c.groups])]
    elif strategy == "predict":
        margins = {n: unmerged[n] - targets[n] for n in targets if n in unmerged} if unmerged else None
        queue = predicted_blocks([g for c in queue for g in c.groups], margins, plan.init.method, defer)
    kept: list[PlannedGroup] = []
    state = {n: dict(s) for n, s in base_state.items()}
    result = SearchResult(strategy=strategy, plan=plan, state=state)
    round_no = 0
    round_ckpt = state_path.with_name(state_path.name + ".round") if state_path else None
    if state_path is not None and state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved.get("strategy") != strategy or set(saved.get("group_states", {})) != set(by_id):
            raise GemelError(f"{state_path}: saved search belongs to another plan or strategy; "
                             "delete it or choose another output folder")
        for gid, st in saved["group_states"].items():
            by_id[gid].state = GroupState(st)
        kept = [by_id[i] for i in saved["kept"]]
        queue = [Candidate([by_id[i] for i in ids]) for ids in saved["queue"]]
        state = saved["state"]
        round_no = saved["round"]
        result.steps = [Step(**s) for s in saved["steps"]]
        result.retrain_seconds = saved["retrain_seconds"]
    started = time.monotonic() - (result.steps[-1].elapsed_seconds if result.steps else 0.0)
    deadline = time.monotonic() + time_budget_s if time_budget_s else None

    def persist() -> None:
        if state_path is not None:
            _save(state_path, {"strategy": strategy, "group_states": {g.id: g.state.value for g in plan.groups},
                               "kept": [g.id for g in kept], "queue": [[g.id for g in c.groups] for c in queue],
                               "state": state, "round": round_no, "steps": [vars(s) for s in result.steps],
                               "retrain_seconds": result.retrain_seconds})

    floor, skipped = plan.retraining.min_savings_bytes, 0
    while queue:
        if deadline is not None and time.monotonic() > deadline:
            result.stopped = "time budget"
            break
        if queue[0].savings_bytes < floor:  # untried, so undecided: the groups stay 'accepted'
            skipped += len(queue.pop(0).groups)
            persist()
            continue
        progress.check()
        cand = queue[0]
        trial = kept + cand.groups
        models = build_models()
        for name, m in models.items():
            m.load_state_dict(state[name])
        device = resolve_device(plan.retraining.device)
        for m in models.values():
            m.to(device)
        # Only the candidate's groups start afresh: kept groups hold their retrained values.
        initialise_groups(models, cand.groups, plan.init, data, init_base, device=device)
        trial_plan = plan.model_copy(update={"groups": [g.model_copy(update={"state": GroupState.accepted})
                                                        for g in trial]})
        apply_plan(models, trial_plan)
        after_tying(models, sorted(cand.models), plan.init, data, device=device)
        names = _affected(cand.models, trial)
        retrain: RetrainResult = joint_retrain({n: models[n] for n in names}, {n: data[n] for n in names},
                                               {n: targets[n] for n in names}, plan.retraining,
                                               progress=progress, deadline=deadline, seed=seed + round_no + 1,
                                               checkpoint=round_ckpt, on_epoch=on_epoch,
                                               check_first=plan.retraining.check_before_training)
        if retrain.stopped == "time budget" and not retrain.all_passed:
            result.stopped = "time budget"  # undecided: the candidate stays in the queue
            break
        queue.pop(0)
        round_no += 1
        result.retrain_seconds += retrain.seconds
        if retrain.all_passed:
            kept = trial
            for g in cand.groups:
                g.state = GroupState.kept
            for n in names:
                state[n] = {k: v.detach().to("cpu").clone() for k, v in models[n].state_dict().items()}
            action = "banked with zero retraining" if not retrain.history else "banked"
        else:
            action = _back_off(cand, queue, strategy)
        result.steps.append(Step(round=round_no, groups=[g.id for g in cand.groups], models=names,
                                 savings_bytes=cand.savings_bytes, outcome="kept" if retrain.all_passed else "failed",
                                 next_action=action, accuracy=dict(retrain.accuracy), retrain_seconds=retrain.seconds,
                                 saved_bytes_after=sum(g.savings_bytes for g in kept),
                                 elapsed_seconds=time.monotonic() - started, epochs=len(retrain.history),
                                 initial_accuracy=dict(retrain.initial_accuracy), init=plan.init.method,
                                 trained_epochs=round(sum(r.fraction for r in retrain.history), 3)))
        persist()
        if round_ckpt is not None and round_ckpt.exists():
            round_ckpt.unlink()
        if on_step:
            on_step(result.steps[-1])
    if skipped and result.stopped == "candidates exhausted":
        result.stopped = f"candidates exhausted ({skipped} groups below the minimum savings left untried)"
    # Groups still 'accepted' now sit in candidates left untried (time budget, minimum savings).
    result.state = state
    return result


def _back_off(cand: Candidate, queue: list[Candidate], strategy: Strategy) -> str:
    if len(cand.groups) == 1:
        cand.groups[0].state = GroupState.backed_off
        return "dropped (single group failed)"
    heavy, light = cand.halves(by_risk=strategy == "predict")
    if strategy in ("bisect", "predict"):
        queue[:0] = [heavy, light]
        return f"split into {len(heavy.groups)} + {len(light.groups)} groups" + \
            (" (safer first)" if strategy == "predict" else "")
    nxt = queue[0].savings_bytes if queue else 0
    if heavy.savings_bytes > nxt:
        queue.insert(0, heavy)
        for g in light.groups:
            g.state = GroupState.backed_off
        return f"halved: retry the heavier {len(heavy.groups)} groups"
    for g in cand.groups:
        g.state = GroupState.backed_off
    return "dropped (half saves less than the next candidate)"

