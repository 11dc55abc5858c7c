"""Share groups: coverage for identical architectures, and structure against order alignment."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch

from gemel_studio.analysis import analyze_workload, find_share_groups
from gemel_studio.analysis.inventory import inventory_of_module
from gemel_studio.analysis.onnx_inventory import onnx_layers
from gemel_studio.workload import load_workload

from .conftest import SAMPLES, tv


@pytest.mark.parametrize("alignment", ["structure", "order"])
def test_two_identical_architectures_share_every_parameterised_layer(write_workload, alignment):
    w = load_workload(write_workload([tv("a", "mobilenet_v2", num_classes=5), tv("b", "mobilenet_v2", num_classes=5)]))
    analysis = analyze_workload(w, alignment=alignment)
    a, b = analysis.models
    param_layers = [layer.name for layer in a.layers if layer.param_bytes > 0]
    assert len(analysis.groups) == len(param_layers)
    for group in analysis.groups:
        assert group.layer_of("a") == group.layer_of("b")  # each layer pairs with its twin
    assert sorted(g.layer_of("a") for g in analysis.groups) == sorted(param_layers)
    assert analysis.max_savings_bytes == a.param_bytes == b.param_bytes
    assert analysis.max_savings_fraction == pytest.approx(0.5)


def test_different_heads_are_not_shared(write_workload):
    w = load_workload(write_workload([tv("a", "resnet18", num_classes=5), tv("b", "resnet18", num_classes=7)]))
    analysis = analyze_workload(w)
    shared = {g.layer_of("a") for g in analysis.groups}
    assert "fc" not in shared and "layer4.1.conv2" in shared
    head = analysis.model("a").layer("fc").param_bytes
    assert analysis.max_savings_bytes == analysis.model("a").param_bytes - head


def _decoy_models():
    """B is A without A's first layer. A's first layer has the same signature as the last
    layer of both: order-of-appearance pairs A's first with B's last (an unrelated twin)."""
    with torch.device("meta"):
        a = torch.nn.Sequential()
        a.add_module("enc", torch.nn.Linear(8, 8))
        a.add_module("mid", torch.nn.Linear(8, 16))
        a.add_module("dec", torch.nn.Linear(16, 8))
        a.add_module("out", torch.nn.Linear(8, 8))
        b = torch.nn.Sequential()
        b.add_module("mid", torch.nn.Linear(8, 16))
        b.add_module("dec", torch.nn.Linear(16, 8))
        b.add_module("out", torch.nn.Linear(8, 8))
    shape = (1, 1, 8)  # the batch and these make (1, 1, 1, 8): Linear acts on the last axis
    return [inventory_of_module(a, "A", input_size=shape), inventory_of_module(b, "B", input_size=shape)]


def _pairs(groups):
    return sorted((g.layer_of("A"), g.layer_of("B")) for g in groups)


def test_structure_alignment_avoids_unrelated_twins_that_order_alignment_pairs():
    inventories = _decoy_models()
    assert _pairs(find_share_groups(inventories, "order")) == [("dec", "dec"), ("enc", "out"), ("mid", "mid")]
    assert _pairs(find_share_groups(inventories, "structure")) == [("dec", "dec"), ("mid", "mid"), ("out", "out")]


def test_structure_alignment_pairs_corresponding_blocks_across_depths(write_workload):
    """ResNet-18 and -34: basic blocks of equal shape pair by position, never across stages,
    and the stage-opening blocks pair with each other."""
    w = load_workload(write_workload([tv("r18", "resnet18"), tv("r34", "resnet34")]))
    groups = analyze_workload(w, alignment="structure").groups
    pairs = {g.layer_of("r18"): g.layer_of("r34") for g in groups}
    for r18, r34 in pairs.items():
        assert r18.split(".")[0] == r34.split(".")[0], (r18, r34)  # same stage (layer1..4, conv1, fc)
    assert pairs["layer2.0.conv1"] == "layer2.0.conv1"
    assert pairs["layer3.0.downsample.0"] == "layer3.0.downsample.0"
    assert pairs["fc"] == "fc"


@pytest.mark.parametrize("alignment", ["structure", "order"])
def test_groups_hold_one_layer_per_model_and_are_sorted(alignment):
    w = load_workload(SAMPLES / "quickstart.yaml")
    analysis = analyze_workload(w, alignment=alignment)
    savings = [g.savings_bytes for g in analysis.groups]
    assert savings == sorted(savings, reverse=True)
    seen: dict[str, set[str]] = {}
    for g in analysis.groups:
        models = g.models
        assert len(models) == len(set(models)) >= 2
        signatures = {analysis.model(m.model).layer(m.layer).signature for m in g.members}
        assert signatures == {g.signature}
        for m in g.members:
            assert m.layer not in seen.setdefault(m.model, set()), "a layer is in two groups"
            seen[m.model].add(m.layer)
    assert analysis.max_savings_bytes == sum(g.bytes_per_copy * (len(g.members) - 1) for g in analysis.groups)
    assert analysis.cumulative_savings()[-1] == analysis.max_savings_bytes


def test_unknown_alignment_is_refused():
    with pytest.raises(ValueError, match="unknown alignment 'fuzzy'"):
        find_share_groups([], "fuzzy")


def _attention(name: str, **kwargs):
    with torch.device("meta"):
        mha = torch.nn.MultiheadAttention(16, **kwargs)
    return inventory_of_module(mha, name, input_size=(1, 1, 1))  # its forward needs q, k, v: no activations


def test_attention_with_other_heads_is_not_shared():
    assert _attention("a", num_heads=4).layer("").signature == (
        "MultiheadAttention(e=16,heads=4,k=16,v=16,batch_first=False,bias=True,bias_kv=False,zero_attn=False,float32)")
    same = find_share_groups([_attention("a", num_heads=4), _attention("b", num_heads=4)])
    assert sorted(g.layer_of("a") for g in same) == ["", "out_proj"]
    for other in ({"num_heads": 2}, {"num_heads": 4, "batch_first": True}, {"num_heads": 4, "kdim": 8, "vdim": 8}):
        groups = find_share_groups([_attention("a", num_heads=4), _attention("b", **other)])
        assert [g.layer_of("a") for g in groups] == ["out_proj"], other  # the projection alone


def test_onnx_export_of_string_padding_has_the_torch_signature(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding="same"), torch.nn.Conv2d(8, 8, 3, padding="valid"),
                              torch.nn.Conv2d(8, 8, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(1, 3, 16, 16),), str(tmp_path / "p.onnx"), dynamo=False)
    records = onnx_layers(onnx.load(str(tmp_path / "p.onnx")), 1, (3, 16, 16))[0]
    eager = inventory_of_module(net.to("meta"), "t", input_size=(3, 16, 16)).layers
    assert [r.signature for r in records] == [r.signature for r in eager]
    assert [r.signature.split(",p=")[1].split(",d=")[0] for r in records] == ["same", "valid", "(1,1)"]


# --- the grouping of many models gives what aligning every model one by one gave -----------------
#
# `_reference_groups` is the grouping as it was before models with an identical layer sequence
# reused an alignment (a verbatim copy, kept here only to compare against).


def _reference_groups(inventories, alignment):
    from difflib import SequenceMatcher

    from gemel_studio.analysis import GroupMember, ShareGroup

    def shareable(inv):
        return [layer for layer in inv.layers if layer.shareable]

    def similarity(a, b):
        return 1.0 if a == b else SequenceMatcher(None, a, b, autojunk=False).ratio()

    def align(columns, layers):
        n, m = len(columns), len(layers)
        by_sig = {}
        for j, layer in enumerate(layers):
            by_sig.setdefault(layer.signature, []).append(j)
        score = [{j: 1.0 + similarity(tokens, layers[j].name.split("."))
                  for j in by_sig.get(sig, ())} for sig, tokens, _ in columns]
        prev, back = [0.0] * (m + 1), []
        for i in range(1, n + 1):
            cur, moves, row = [0.0] * (m + 1), bytearray(m + 1), score[i - 1]
            for j in range(1, m + 1):
                best, move = prev[j], 0
                if cur[j - 1] > best:
                    best, move = cur[j - 1], 1
                s = row.get(j - 1)
                if s is not None and prev[j - 1] + s > best:
                    best, move = prev[j - 1] + s, 2
                cur[j], moves[j] = best, move
            back.append(moves)
            prev = cur
        pairs, i, j = {}, n, m
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

    if alignment == "order":
        cols = {}
        for inv in inventories:
            count = {}
            for layer in shareable(inv):
                k = count.get(layer.signature, 0)
                count[layer.signature] = k + 1
                cols.setdefault((layer.signature, k), []).append((inv.name, layer))
        raw = list(cols.values())
    else:
        columns = []  # (signature, tokens, members)
        for inv in inventories:
            layers = shareable(inv)
            pairs = align(columns, layers)
            merged, col_index = [], 0
            for j, layer in enumerate(layers):
                if j in pairs:
                    target = pairs[j]
                    merged.extend(columns[col_index:target])
                    columns[target][2].append((inv.name, layer))
                    merged.append(columns[target])
                    col_index = target + 1
                else:
                    merged.append((layer.signature, layer.name.split("."), [(inv.name, layer)]))
            merged.extend(columns[col_index:])
            columns = merged
        raw = [c[2] for c in columns]
    groups = [ShareGroup(signature=m[0][1].signature, kind=m[0][1].kind,
                         members=[GroupMember(model, layer.name) for model, layer in m],
                         bytes_per_copy=m[0][1].param_bytes) for m in raw if len(m) >= 2]
    groups.sort(key=lambda g: (-g.savings_bytes, -len(g.members), g.signature))
    return groups


def _dicts(groups):
    return [g.to_dict() for g in groups]


_SAMPLE_GROUPS = {"quickstart": (41, 41), "low": (203, 209), "medium": (125, 121), "high": (106, 106),
                  "fashion": (105, 105)}  # (structure, order), as computed before fleets were deduplicated


@pytest.fixture(scope="module")
def sample_inventories():
    from gemel_studio.errors import ModelLoadError

    out = {}
    for name in _SAMPLE_GROUPS:
        try:
            out[name] = analyze_workload(load_workload(SAMPLES / f"{name}.yaml")).models
        except ModelLoadError:  # fashion needs torchvision's MobileNetV2 weights in the hub cache
            pass
    return out


@pytest.mark.parametrize("alignment", ["structure", "order"])
@pytest.mark.parametrize("sample", list(_SAMPLE_GROUPS))
def test_sample_groups_are_those_of_the_one_by_one_alignment(sample_inventories, sample, alignment):
    if sample not in sample_inventories:
        pytest.skip(f"{sample}.yaml cannot be analysed here (pretrained weights missing)")
    inventories = sample_inventories[sample]
    groups = find_share_groups(inventories, alignment)
    assert _dicts(groups) == _dicts(_reference_groups(inventories, alignment))
    assert len(groups) == _SAMPLE_GROUPS[sample][alignment == "order"]


def _fleet(inventories, copies: int, seed: int):
    """`copies` renamed copies of each inventory, shuffled."""
    import dataclasses
    import random

    fleet = [dataclasses.replace(inv, name=f"{inv.name}#{k}") for k in range(copies) for inv in inventories]
    random.Random(seed).shuffle(fleet)
    return fleet


@pytest.mark.parametrize("alignment", ["structure", "order"])
def test_fleets_of_copies_group_as_one_by_one_alignment_does(sample_inventories, alignment, monkeypatch):
    from gemel_studio.analysis import groups as groups_module

    aligned = []
    real_align = groups_module._align
    monkeypatch.setattr(groups_module, "_align",
                        lambda columns, layers: aligned.append(1) or real_align(columns, layers))
    mixed = sample_inventories["low"] + sample_inventories["quickstart"]  # 12 models, many architectures
    for inventories in (_fleet(mixed, 6, seed=1), _fleet(mixed, 6, seed=2), _fleet(_decoy_models(), 20, seed=3),
                        _fleet(_decoy_models()[::-1], 20, seed=4)):
        aligned.clear()
        groups = find_share_groups(inventories, alignment)
        assert _dicts(groups) == _dicts(_reference_groups(inventories, alignment))
        assert sum(len(g.members) for g in groups) <= sum(len(inv.layers) for inv in inventories)
    if alignment == "structure":  # copies reuse an alignment: the count stops growing with the copies
        aligned.clear()
        find_share_groups(_fleet(mixed, 30, seed=5), alignment)
        assert 0 < len(aligned) < 30 * len(mixed) / 4


def test_layer_of_follows_the_members():
    from gemel_studio.analysis import GroupMember, ShareGroup

    group = ShareGroup("sig", "Conv2d", [GroupMember("a", "x"), GroupMember("b", "y")], 10)
    assert (group.layer_of("a"), group.layer_of("b"), group.layer_of("c")) == ("x", "y", None)
    group.members.append(GroupMember("c", "z"))
    assert group.layer_of("c") == "z"
    group.members = [GroupMember("d", "w")]
    assert group.layer_of("a") is None and group.layer_of("d") == "w"


@pytest.mark.parametrize("sample", list(_SAMPLE_GROUPS))
def test_combined_alignment_keeps_structures_pairs_and_never_finds_less_than_order(sample_inventories, sample):
    if sample not in sample_inventories:
        pytest.skip(f"{sample}.yaml cannot be analysed here (pretrained weights missing)")
    inventories = sample_inventories[sample]

    def bound(alignment):
        return sum(g.savings_bytes for g in find_share_groups(inventories, alignment))

    assert bound("combined") >= bound("order") >= 0 and bound("combined") >= bound("structure")
    combined = find_share_groups(inventories, "combined")
    with_model = {(m.model, m.layer): g.signature + str(id(g)) for g in combined for m in g.members}
    for g in find_share_groups(inventories, "structure"):  # every structural pair is still paired
        tags = {with_model.get((m.model, m.layer)) for m in g.members}
        if len(tags) > 1:  # only where order's groups were taken for this signature
            assert bound("combined") == bound("order")
    for g in combined:
        assert len(set(g.models)) == len(g.models) >= 2


def test_combined_alignment_adds_the_pairs_structure_refuses():
    """A's first layer and B's last are twins that only a crossing pair can join: structure
    leaves both unpaired, combined keeps structure's pairs and adds that one as order would."""
    with torch.device("meta"):
        a = torch.nn.Sequential()
        a.add_module("enc", torch.nn.Linear(8, 8))
        a.add_module("mid", torch.nn.Linear(8, 16))
        a.add_module("dec", torch.nn.Linear(16, 8))
        b = torch.nn.Sequential()
        b.add_module("mid", torch.nn.Linear(8, 16))
        b.add_module("dec", torch.nn.Linear(16, 8))
        b.add_module("out", torch.nn.Linear(8, 8))
    inventories = [inventory_of_module(a, "A", input_size=(1, 1, 8)), inventory_of_module(b, "B", input_size=(1, 1, 8))]
    assert _pairs(find_share_groups(inventories, "structure")) == [("dec", "dec"), ("mid", "mid")]
    assert _pairs(find_share_groups(inventories, "combined")) == [("dec", "dec"), ("enc", "out"), ("mid", "mid")]
