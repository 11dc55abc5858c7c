"""Shareable groups: layers across models that can hold one copy of their weights.

A group has members with one signature, at most one layer per model. Two alignments:

- `order` (GEMEL's reference): the k-th occurrence of a signature in one model pairs with
  the k-th occurrence in every other, wherever it sits in the graph.
- `structure`: models are aligned one by one against the groups so far, like a multiple
  sequence alignment over execution order: a dynamic programme keeps the matching monotone
  (no crossing pairs) and, among equal-signature candidates, prefers layers whose qualified
  names correspond. A layer is thus not paired with an unrelated twin further down.
- `combined`: `structure`'s groups first; then every layer it left unpaired, in execution
  order, joins the next structure group of its signature that lacks its model, and the rest
  are grouped by GEMEL's order rule among themselves. Per signature, order's bound is the
  most any grouping can save (all layers less the most any one model has), and this reaches
  it unless structure opened more groups of a signature than one model has layers of it; for
  such a signature `order`'s groups are taken, so the bound is never below GEMEL's on any
  workload.

Only parameters are shared; each model keeps its own buffers (batch-norm statistics), so a
group's savings are its parameter bytes times (members - 1).

Cost, for a workload of M models with L shareable layers each and C groups so far: `order`
is one pass over the layers, O(M·L). `structure` runs its dynamic programme, O(C·L), only
for a model whose (signature, name) sequence it has not yet aligned against the current
columns; a fleet of many copies of a few architectures thus costs O(D²·C·L + M·(C + L))
for D distinct sequences, not M·C·L. The result is the same as aligning every model (the
programme depends only on the columns' signatures and names, which change only when a
model opens a new column).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from difflib import SequenceMatcher
from functools import lru_cache
from typing import Literal

from .records import LayerRecord, ModelInventory

Alignment = Literal["order", "structure", "combined"]
ALIGNMENTS: tuple[Alignment, ...] = ("structure", "order", "combined")


@dataclass(frozen=True)
class GroupMember:
    model: str
    layer: str


@dataclass
class ShareGroup:
    signature: str
    kind: str
    members: list[GroupMember]
    bytes_per_copy: int  # parameter bytes of one member

    @property
    def savings_bytes(self) -> int:
        return self.bytes_per_copy * (len(self.members) - 1)

    @property
    def models(self) -> list[str]:
        return [m.model for m in self.members]

    def layer_of(self, model: str) -> str | None:
        """The member layer of `model`, or None; O(1) after the first call (views ask this for
        every cell of a models-by-groups matrix). The index is rebuilt if `members` was
        replaced or grew."""
        cached = self.__dict__.get("_by_model")
        if cached is None or cached[0] is not self.members or cached[1] != len(self.members):
            index: dict[str, str] = {}
            for m in self.members:
                index.setdefault(m.model, m.layer)
            cached = (self.members, len(self.members), index)
            self.__dict__["_by_model"] = cached
        return cached[2].get(model)

    def to_dict(self) -> dict:
        return {"signature": self.signature, "kind": self.kind,
                "members": [{"model": m.model, "layer": m.layer} for m in self.members],
                "bytes_per_copy": self.bytes_per_copy, "savings_bytes": self.savings_bytes}


def _shareable(inv: ModelInventory) -> list[LayerRecord]:
    return [layer for layer in inv.layers if layer.shareable]


def _order_columns(sequences) -> list[list[tuple[str, LayerRecord]]]:
    """GEMEL's rule over (model name, layers in execution order) pairs."""
    columns: dict[tuple[str, int], list[tuple[str, LayerRecord]]] = {}
    for name, layers in sequences:
        count: dict[str, int] = {}
        for layer in layers:
            k = count.get(layer.signature, 0)
            count[layer.signature] = k + 1
            columns.setdefault((layer.signature, k), []).append((name, layer))
    return list(columns.values())


def _order_groups(inventories: list[ModelInventory]) -> list[list[tuple[str, LayerRecord]]]:
    return _order_columns((inv.name, _shareable(inv)) for inv in inventories)


def _combined_groups(inventories: list[ModelInventory]) -> list[list[tuple[str, LayerRecord]]]:
    """Structure's groups first; then each layer it left unpaired, in execution order, joins
    the next structure group of its signature that lacks its model (GEMEL's order rule over
    those groups), and what is still unpaired is grouped by the order rule among itself."""
    columns = _structure_groups(inventories)
    groups = [list(c) for c in columns if len(c) >= 2]
    present = [{m for m, _ in g} for g in groups]
    unpaired = {(c[0][0], c[0][1].name) for c in columns if len(c) == 1}
    by_sig: dict[str, list[int]] = {}
    for gi, g in enumerate(groups):
        by_sig.setdefault(g[0][1].signature, []).append(gi)
    rest = []
    for inv in inventories:
        cursor: dict[str, int] = {}
        remain = []
        for layer in _shareable(inv):
            if (inv.name, layer.name) not in unpaired:
                continue
            cands, pos = by_sig.get(layer.signature, ()), cursor.get(layer.signature, 0)
            while pos < len(cands) and inv.name in present[cands[pos]]:
                pos += 1
            if pos < len(cands):
                groups[cands[pos]].append((inv.name, layer))
                present[cands[pos]].add(inv.name)
                pos += 1
            else:
                remain.append(layer)
            cursor[layer.signature] = pos
        rest.append((inv.name, remain))
    return groups + _order_columns(rest)


def _per_signature_best(combined, order):
    """Per signature, the combined groups unless order's save more for that signature."""
    def by_sig(raw):
        out: dict[str, list] = {}
        for members in raw:
            out.setdefault(members[0][1].signature, []).append(members)
        return out

    mine, theirs = by_sig(combined), by_sig(order)
    return [members for sig, cols in mine.items()
            for members in (theirs[sig] if _savings(theirs.get(sig, [])) > _savings(cols) else cols)]


def _savings(raw: list[list[tuple[str, LayerRecord]]]) -> int:
    return sum(members[0][1].param_bytes * (len(members) - 1) for members in raw if len(members) >= 2)


@dataclass
class _Column:
    signature: str
    tokens: list[str]
    members: list[tuple[str, LayerRecord]] = field(default_factory=list)


def _tokens(name: str) -> list[str]:
    return name.split(".")


@lru_cache(maxsize=1 << 16)
def _similarity(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    if a == b:
        return 1.0
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def _name_similarity(a: list[str], b: list[str]) -> float:
    return _similarity(tuple(a), tuple(b))


def _align(columns: list[_Column], layers: list[LayerRecord]) -> dict[int, int]:
    """Monotone alignment of `layers` onto `columns`: returns layer index -> column index.

    Score of a pair: 0 unless the signatures match, else 1 + name similarity (in [0, 1]), so
    the number of matched layers comes first and corresponding names break ties.
    """
    n, m = len(columns), len(layers)
    by_sig: dict[str, list[int]] = {}
    for j, layer in enumerate(layers):
        by_sig.setdefault(layer.signature, []).append(j)
    # Sparse scores: only equal-signature pairs can match.
    score: list[dict[int, float]] = []
    for col in columns:
        row = {}
        for j in by_sig.get(col.signature, ()):
            row[j] = 1.0 + _name_similarity(col.tokens, _tokens(layers[j].name))
        score.append(row)
    prev = [0.0] * (m + 1)
    back: list[bytearray] = []  # 0 = skip column, 1 = skip layer, 2 = match
    for i in range(1, n + 1):
        cur = [0.0] * (m + 1)
        moves = bytearray(m + 1)
        row = score[i - 1]
        for j in range(1, m + 1):
            best, move = prev[j], 0
            if cur[j - 1] > best:
                best, move = cur[j - 1], 1
            s = row.get(j - 1)
            if s is not None and prev[j - 1] + s > best:
                best, move = prev[j - 1] + s, 2
            cur[j] = best
            moves[j] = move
        moves[0] = 0
        back.append(moves)
        prev = cur
    pairs: dict[int, int] = {}
    i, j = n, m
    while i > 0 and j > 0:
        move = back[i - 1][j]
        if move == 2:
            pairs[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif move == 1:
            j -= 1
        else:
            i -= 1
    return pairs


def _structure_groups(inventories: list[ModelInventory]) -> list[list[tuple[str, LayerRecord]]]:
    columns: list[_Column] = []
    # _align reads only the columns' (signature, tokens) and the layers' (signature, name).
    # Columns change that way only when a model opens a new one, so while they do not, a
    # model with a sequence already aligned gets the same pairs without a new alignment.
    aligned: dict[tuple[tuple[str, str], ...], dict[int, int]] = {}
    for inv in inventories:
        layers = _shareable(inv)
        key = tuple((layer.signature, layer.name) for layer in layers)
        pairs = aligned.get(key)
        if pairs is None:
            pairs = _align(columns, layers)
            aligned[key] = pairs
        if len(pairs) == len(layers):  # every layer joins a column: the columns stay as they are
            for j, layer in enumerate(layers):
                columns[pairs[j]].members.append((inv.name, layer))
            continue
        aligned.clear()  # new columns: earlier alignments no longer hold
        merged: list[_Column] = []
        col_index = 0
        for j, layer in enumerate(layers):
            if j in pairs:
                target = pairs[j]
                merged.extend(columns[col_index:target])
                col = columns[target]
                col.members.append((inv.name, layer))
                merged.append(col)
                col_index = target + 1
            else:
                merged.append(_Column(layer.signature, _tokens(layer.name), [(inv.name, layer)]))
        merged.extend(columns[col_index:])
        columns = merged
    return [c.members for c in columns]


def find_share_groups(inventories: list[ModelInventory], alignment: Alignment = "structure") -> list[ShareGroup]:
    """Groups of two or more interchangeable layers, heaviest savings first."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment '{alignment}'; expected one of {', '.join(ALIGNMENTS)}")
    if alignment == "order":
        raw = _order_groups(inventories)
    elif alignment == "combined":
        raw = _per_signature_best(_combined_groups(inventories), _order_groups(inventories))
    else:
        raw = _structure_groups(inventories)
    groups = []
    for members in raw:
        if len(members) < 2:
            continue
        first = members[0][1]
        groups.append(ShareGroup(signature=first.signature, kind=first.kind,
                                 members=[GroupMember(model, layer.name) for model, layer in members],
                                 bytes_per_copy=first.param_bytes))
    groups.sort(key=lambda g: (-g.savings_bytes, -len(g.members), g.signature))
    return groups
