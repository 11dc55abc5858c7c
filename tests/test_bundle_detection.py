"""Detectors in bundles: `gemel export` writes their ONNX graphs with every stored tensor read
from weights.safetensors, checks onnxruntime against torch detection by detection, and the
runtime's onnxruntime backend runs them and answers as torchvision does."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from gemel_studio.errors import GemelError
from gemel_studio.export import export_bundle
from gemel_studio.export.detection_match import compare_detections, judge_detections
from gemel_studio.export.onnx_graph import export_onnx
from gemel_studio.runtime import load_bundle
from gemel_studio.runtime.bundle import safetensors_layout
from gemel_studio.runtime.engine import Engine
from gemel_studio.runtime.sources import SyntheticSource
from gemel_studio.workload import load_workload

from .conftest import described_outputs, tv

DETECTORS = ("front", "back")
ARCH = "ssdlite320_mobilenet_v3_large"


def re_search(pattern: str, text: str):
    import re

    match = re.search(pattern, text)
    assert match, text
    return match.groups()


def _calibrate(model: torch.nn.Module) -> None:
    """Batch-norm statistics measured on random images, as training would leave them: fresh
    statistics (mean 0, variance 1) let an untrained SSDlite's activations vanish, so every
    score ties and there is nothing to compare."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # a plain average over the batches seen
    model.train()
    with torch.no_grad():
        images, _ = model.transform(list(torch.rand(4, 3, 64, 64)))
        model.head(list(model.backbone(images.tensors).values()))
    model.eval()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A merged folder as `gemel merge` writes it, without retraining: two SSDlite detectors
    (64x64 input, 3 classes) sharing the backbone layers the plan groups between the two of
    them (their heads their own), and a mobilenet classifier that shares nothing."""
    import yaml

    from gemel_studio.analysis import analyze_workload
    from gemel_studio.merging import GroupState, apply_plan, propose_plan
    from gemel_studio.merging.pipeline import write_merged_folder
    from gemel_studio.models.zoo import construct

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("merge-det")
    entries = [tv(n, ARCH, task="detection", num_classes=3,
                  dataset={"kind": "synthetic", "task": "detect", "samples": 8, "seed": i})
               for i, n in enumerate(DETECTORS)]
    entries.append(tv("spare", "mobilenet_v3_small", num_classes=2))
    src = root / "workload.yaml"
    src.write_text(yaml.safe_dump({"version": 1, "name": "bundle-detection-test", "input_size": [3, 64, 64],
                                   "models": entries}, sort_keys=False))
    workload = load_workload(src)
    plan = propose_plan(workload, analyze_workload(workload))
    for g in plan.groups:
        backbone = ({m.model for m in g.members} == set(DETECTORS)
                    and all(m.layer.startswith("backbone.") for m in g.members))
        g.state = GroupState.kept if backbone else GroupState.rejected
    assert sum(g.state is GroupState.kept for g in plan.groups) > 50
    models = {n: construct(ARCH, 3, "cpu")[0] for n in DETECTORS}
    apply_plan(models, plan)
    for m in models.values():
        _calibrate(m)
    out = root / "merged"
    write_merged_folder(out, workload, models, plan, {"workload": workload.name, "models": {}})
    return out, models


@pytest.fixture(scope="module")
def bundle(merged, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle-det") / "b"
    start = time.perf_counter()
    result = export_bundle(merged[0], out)
    return result, out, time.perf_counter() - start


def test_detectors_get_graphs_that_copy_no_stored_tensor_and_pass_the_checks(bundle):
    import onnx

    result, out, seconds = bundle
    assert result.ok, [c for c in result.checks if not c.passed]
    assert seconds < 60  # two SSDlite graphs and a mobilenet, exported and checked
    checks = {c.name: c for c in result.checks}
    for name in DETECTORS:
        assert checks[f"{name}: onnx checker"].passed
        detail = checks[f"{name}: onnxruntime vs torch"].detail
        torch_n, ort_n, matched = (int(v) for v in
                                   re_search(r"(\d+) torch / (\d+) onnxruntime detections, (\d+) matched", detail))
        assert torch_n == ort_n == matched >= 50, detail  # every detection matched: the check compared something
        onnx.checker.check_model(str(out / f"{name}.onnx"))
    assert not [n for n in result.notes if "ONNX" in n]
    rows = {r.name: r for r in result.models}
    for name in DETECTORS:
        row = rows[name]
        assert row.onnx == f"{name}.onnx"
        assert row.copied_tensor_bytes == 0 and row.constant_bytes == 0 and row.external_initializers > 300
        assert row.onnx_bytes < 2 * 2**20  # the graph without its 9 MB of weights
        assert 0 <= row.max_abs_diff <= 1e-3 * 64 and row.output_scale == 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 1
    front = next(m for m in manifest["models"] if m["name"] == "front")
    assert front["onnx_outputs"] == ["boxes", "scores", "labels"] and front["onnx_output"] == "boxes"
    assert front["labels"][0] == "background" and front["task"] == "detection"
    spare = next(m for m in manifest["models"] if m["name"] == "spare")
    assert spare["onnx_outputs"] is None and spare["onnx_output"] == "output"


def test_detector_initializers_point_into_the_weights_file_and_share_the_backbone(bundle):
    import onnx

    _, out, _ = bundle
    start, header = safetensors_layout(out / "weights.safetensors")
    models = {m["name"]: m for m in json.loads((out / "manifest.json").read_text())["models"]}
    offsets = {}
    for name in DETECTORS:
        proto = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        tmap = models[name]["tensors"]
        seen = 0
        for init in proto.graph.initializer:
            ext = {e.key: e.value for e in init.external_data}
            assert init.data_location == onnx.TensorProto.EXTERNAL and ext["location"] == "weights.safetensors"
            begin, end = header[tmap[init.name]]["data_offsets"]
            assert (int(ext["offset"]), int(ext["length"])) == (start + begin, end - begin)
            offsets.setdefault(name, {})[init.name] = int(ext["offset"])
            seen += 1
        # Every tensor the graph computes with is a stored one (batch norms' counters are unused).
        assert seen == len([k for k in tmap if not k.endswith("num_batches_tracked")])
    shared = [k for k in offsets["front"] if k.startswith("backbone.") and offsets["front"][k] == offsets["back"][k]]
    own = [k for k in offsets["front"] if k.startswith("head.") and offsets["front"][k] != offsets["back"][k]]
    assert len(shared) > 150 and len(own) > 50  # one backbone on disk for both graphs; heads apart


def _frames(n: int = 3):
    return [f for _, f in SyntheticSource(fps=30, size=(64, 64), seed=5, frames=n, realtime=False).frames()]


def test_the_onnxruntime_backend_runs_detectors_as_torch_does(bundle):
    _, out, _ = bundle
    names = [*DETECTORS, "spare"]
    frames = _frames()
    results, raw = {}, {}
    with load_bundle(out) as b:
        for backend in ("torch", "onnxruntime"):
            engine, results[backend] = described_outputs(b, names, frames, backend)
            if backend == "onnxruntime":
                engine.scheduler.acquire("front")  # resident (its session was made on the first frame)
                x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
                raw["onnxruntime"] = engine._ort.run("front", x)
                with torch.no_grad():
                    raw["torch"] = b.models["front"](x)
                assert engine._ort.sessions_made["front"] == 1
    for t, o in zip(results["torch"], results["onnxruntime"]):
        for m in DETECTORS:
            assert t[m]["task"] == o[m]["task"] == "detection"
            assert len(t[m]["labels"]) == 10  # at most 10, best first, scoring 0.3 or more
            # The same boxes (as fractions of a side), labels and scores, in any order among ties.
            _, _, ok, detail = judge_detections(_described(t[m]), _described(o[m]), 1.0, thresh=0.3, cap=10)
            assert ok, detail
        assert t["spare"]["label"] == o["spare"]["label"]
    # The backend answers as torchvision does: a list with one dict of tensors per image.
    got, want = raw["onnxruntime"], raw["torch"]
    assert isinstance(got, list) and len(got) == 1 and set(got[0]) == {"boxes", "scores", "labels"}
    assert all(isinstance(v, torch.Tensor) for v in got[0].values())
    _, _, ok, detail = judge_detections({k: v.numpy() for k, v in want[0].items()},
                                        {k: v.numpy() for k, v in got[0].items()}, 64.0)
    assert ok and "300 torch / 300 onnxruntime detections, 300 matched" in detail, detail


def _described(out: dict) -> dict:
    """describe_output's detection answer as judge_detections' arrays (labels by their names)."""
    return {"boxes": np.array(out["boxes"], dtype=np.float32).reshape(-1, 4),
            "scores": np.array(out["scores"], dtype=np.float32),
            "labels": np.array([["background", "circle", "square", "triangle"].index(n) for n in out["labels"]])}


def test_shared_weight_sessions_run_detectors(bundle):
    _, out, _ = bundle
    x = torch.rand(1, 3, 64, 64)
    with load_bundle(out) as b:
        session = b.session("back", share_weights=True)
        boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"input": x.numpy()})
        with torch.no_grad():
            want = b.models["back"](x)[0]
    assert boxes.shape == tuple(want["boxes"].shape) and labels.dtype == np.int64
    _, _, ok, detail = judge_detections({k: v.numpy() for k, v in want.items()},
                                        {"boxes": boxes, "scores": scores, "labels": labels}, 64.0)
    assert ok, detail


def test_a_manifest_from_before_detector_graphs_still_loads(bundle, tmp_path):
    """Version-1 manifests written before `onnx_outputs` existed: detectors without a graph."""
    _, out, _ = bundle
    dest = tmp_path / "old"
    shutil.copytree(out, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for m in manifest["models"]:
        del m["onnx_outputs"]
        if m["task"] == "detection":
            (dest / m["onnx"]).unlink()
            del manifest["files"][m["onnx"]]
            m["onnx"], m["onnx_output"] = None, "output"
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with load_bundle(dest) as b:
        assert b.manifest.model("front").onnx_outputs is None
        with pytest.raises(GemelError, match=r"model\(s\) front have no ONNX graph.*export again.*--backend torch"):
            Engine(b, [(SyntheticSource(), ["front", "spare"])], "unlimited", None, "cpu", "onnxruntime")
        engine = Engine(b, [(SyntheticSource(), ["front"])], "unlimited", None, "cpu", "torch")
        engine.process_frame(_frames(1)[0])
        assert engine.latest[0]["outputs"]["front"]["task"] == "detection"


def test_a_detector_the_exporter_cannot_trace_is_bundled_for_torch_with_a_note(merged, tmp_path, monkeypatch):
    import gemel_studio.export.bundle as export

    real = export.export_onnx

    def failing(model, spec, weights):
        if spec.task == "detection":
            raise RuntimeError("Unsupported: ONNX export of operator foo\n(details)")
        return real(model, spec, weights)

    monkeypatch.setattr(export, "export_onnx", failing)
    result = export_bundle(merged[0], tmp_path / "b")
    assert result.ok, [c for c in result.checks if not c.passed]
    assert f"front: no ONNX graph ({ARCH}: the TorchScript exporter failed: Unsupported: ONNX export of operator foo); " \
           "torch backend only" in result.notes
    assert {r.name: r.onnx for r in result.models} == {"front": None, "back": None, "spare": "spare.onnx"}
    assert not (tmp_path / "b" / "front.onnx").exists()
    with load_bundle(tmp_path / "b") as b:
        assert b.manifest.model("front").onnx is None and b.manifest.model("front").onnx_outputs is None
        with pytest.raises(GemelError, match=r"model\(s\) front, back have no ONNX graph"):
            Engine(b, [(SyntheticSource(), [])], "unlimited", None, "cpu", "onnxruntime")


def test_a_detector_with_no_detections_is_checked_with_its_threshold_lowered(bundle, tmp_path):
    """Untrained detectors often score nothing above their threshold: the check then traces a
    graph with the threshold at 0, so it still compares detections."""
    _, out, _ = bundle
    with load_bundle(out) as b:
        model, spec = b.models["front"], b.manifest.model("front")
        model.score_thresh = 0.999  # nothing scores this high
        shutil.copyfile(out / "weights.safetensors", tmp_path / "weights.safetensors")
        graph, external, copied, _ = export_onnx(model, spec, tmp_path / "weights.safetensors")
        (tmp_path / "front.onnx").write_bytes(graph)
        assert copied == 0 and external > 300
        _, _, ok, detail = compare_detections(model, tmp_path / "front.onnx", spec, torch.Generator().manual_seed(0))
        assert model.score_thresh == 0.999  # restored
    assert ok and detail.startswith("no detections above the score threshold 0.999"), detail
    torch_n, matched = (int(v) for v in re_search(r"(\d+) torch / \d+ onnxruntime detections, (\d+) matched", detail))
    assert torch_n == matched > 50, detail


def test_a_detector_whose_scores_all_tie_is_checked_with_measured_batch_norm_statistics(bundle, tmp_path):
    """Untrained SSDlite: fresh batch-norm statistics let its activations fade, every score ties
    and NMS keeps different boxes in torch and onnxruntime. The check then runs both on the same
    weights with batch-norm statistics measured on random images."""
    import copy

    _, out, _ = bundle
    with load_bundle(out) as b:
        model, spec = copy.deepcopy(b.models["front"]), b.manifest.model("front")
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()  # as constructed
    shutil.copyfile(out / "weights.safetensors", tmp_path / "weights.safetensors")
    graph, _, copied, _ = export_onnx(model, spec, tmp_path / "weights.safetensors")
    assert copied > 0  # the statistics are not the stored ones: the graph holds its own
    (tmp_path / "front.onnx").write_bytes(graph)
    _, _, ok, detail = compare_detections(model, tmp_path / "front.onnx", spec, torch.Generator().manual_seed(0))
    first, _, second = detail.partition("; with batch-norm statistics measured on random images instead")
    assert "inconclusive: scores tie from the top" in first and second, detail
    torch_n, matched = (int(v) for v in re_search(r"(\d+) torch / \d+ onnxruntime detections, (\d+) matched", second))
    assert ok and torch_n == matched > 50, detail
    assert all(m.running_var.eq(1).all() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _dets(boxes, scores, labels):
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "scores": np.array(scores, dtype=np.float32),
            "labels": np.array(labels, dtype=np.int64)}


def test_judging_detections_tolerates_ties_and_catches_real_differences():
    a, b, c, d = [0, 0, 10, 10], [2, 2, 12, 12], [30, 30, 40, 40], [50, 0, 60, 10]
    ref = _dets([a, c], [0.9, 0.5], [1, 1])
    # The same detections in another order, within tolerance: pass.
    diff, _, ok, detail = judge_detections(ref, _dets([c, [0, 0, 10, 10.001]], [0.50001, 0.9], [1, 1]), 64.0)
    assert ok and diff == pytest.approx(0.001, abs=1e-5) and "2 torch / 2 onnxruntime detections, 2 matched" in detail
    # Another label, or a score off by more than the tolerance: fail, and the detail says which.
    _, _, ok, detail = judge_detections(ref, _dets([a, c], [0.9, 0.5], [2, 1]), 64.0)
    assert not ok and "no tie explains, e.g. torch's label 1 score 0.9" in detail
    assert not judge_detections(ref, _dets([a, c], [0.9, 0.502], [1, 1]), 64.0)[2]
    # Every box off by a pixel (scores right): fail (the moved boxes look like ties: inconclusive).
    moved = _dets([[1, 0, 11, 10], [31, 30, 41, 40]], [0.9, 0.5], [1, 1])
    assert not judge_detections(ref, moved, 64.0)[2]
    # Two candidates tie at 0.9 and each side's NMS kept the other one; the detection above
    # the tie and those below agree: pass.
    ties = _dets([d, a, c], [0.95, 0.9, 0.5], [1, 1, 1])
    assert judge_detections(ties, _dets([d, b, c], [0.95, 0.9, 0.5], [1, 1, 1]), 64.0)[2]
    # ... but the detection above the tie must match.
    _, _, ok, detail = judge_detections(ties, _dets([[20, 20, 28, 28], b, c], [0.96, 0.9, 0.5], [1, 1, 1]), 64.0)
    assert not ok and "no tie explains" in detail
    # Every score tying (an untrained model): inconclusive, not passed.
    _, _, ok, detail = judge_detections(_dets([a, c], [0.25, 0.25], [1, 1]), _dets([b, c], [0.25, 0.25], [1, 1]), 64.0)
    assert not ok and "inconclusive" in detail
    # ... though where every detection matches, ties or not, the outputs agree: pass.
    assert judge_detections(_dets([a, c], [0.25, 0.25], [1, 1]), _dets([c, a], [0.25, 0.25], [1, 1]), 64.0)[2]
    # No detections on either side: inconclusive too.
    assert not judge_detections(_dets([], [], []), _dets([], [], []), 64.0)[2]
    # The other side full (cap 2): a detection below its lowest score was cut there.
    ref3 = _dets([a, c, d], [0.9, 0.5, 0.3], [1, 1, 2])
    assert judge_detections(ref3, _dets([a, c], [0.9, 0.5], [1, 1]), 64.0, cap=2)[2]
    assert not judge_detections(ref3, _dets([a, c], [0.9, 0.5], [1, 1]), 64.0, cap=3)[2]
    # A detection at the score threshold may fall either side of it.
    assert judge_detections(ref3, _dets([a, c], [0.9, 0.5], [1, 1]), 64.0, thresh=0.3005)[2]
