"""Distillation: `labels: distill` in the schema, flat folders of unlabelled images, labels
from the unmerged model's own predictions, and merging and fine-tuning such models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from gemel_studio.analysis import analyze_workload
from gemel_studio.errors import WorkloadError
from gemel_studio.merging import propose_plan
from gemel_studio.merging.datasets import UNLABELLED, DatasetError, distill, load_model_data
from gemel_studio.merging.pipeline import finetune_workload, merge_workload, prepare_merge
from gemel_studio.merging.plan import GroupState, RetrainSettings
from gemel_studio.models import build_model
from gemel_studio.models.zoo import construct
from gemel_studio.workload import load_workload, workload_to_dict

from .conftest import tv

FAST = {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "device": "cpu"}
CPU = torch.device("cpu")


def _frames(folder, count: int, seed: int = 0):
    """`count` noisy PNG frames of assorted sizes and modes, as a camera folder might hold."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (20, 30) if i % 2 else (12, 12)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        (image.convert("L") if i % 3 == 0 else image).save(folder / f"frame{i:03}.png")
    return folder


# --- schema --------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", [
    {"kind": "synthetic", "task": "color"},
    {"kind": "image_folder", "path": "frames"},
    {"kind": "fashion_mnist", "classes": [0, 1]},
])
def test_every_dataset_kind_takes_labels(write_workload, dataset):
    w = load_workload(write_workload([tv("plain", "resnet18", dataset=dataset),
                                      tv("distilled", "resnet18", dataset={**dataset, "labels": "distill"})]))
    assert w.model("plain").dataset.labels == "truth"
    assert w.model("distilled").dataset.labels == "distill"
    # The default stays out of saved files; distill is written.
    saved = {m["name"]: m["dataset"] for m in workload_to_dict(w)["models"]}
    assert "labels" not in saved["plain"] and saved["distilled"]["labels"] == "distill"


def test_unknown_labels_value_names_model_and_field(write_workload):
    path = write_workload([tv("cam", "resnet18", dataset={"kind": "synthetic", "labels": "teacher"})])
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    msg = str(err.value)
    assert str(path) in msg and "model 'cam', field 'dataset.labels'" in msg and "'distill'" in msg
    assert "\n" not in msg
    path = write_workload([tv("cam", "resnet18", dataset={"kind": "synthetic", "label": "distill"})])
    with pytest.raises(WorkloadError, match=r"field 'dataset.label': unknown key"):
        load_workload(path)


# --- flat folders of unlabelled images -----------------------------------------------------


def test_flat_folder_loads_with_distill_and_is_refused_with_truth(tmp_path, write_workload):
    _frames(tmp_path / "frames", 6)
    (tmp_path / "frames" / "notes.txt").write_text("not an image")
    w = load_workload(write_workload([
        tv("cam", "resnet18", num_classes=5, dataset={"kind": "image_folder", "path": "frames", "labels": "distill"}),
        tv("labelled", "resnet18", dataset={"kind": "image_folder", "path": "frames"}),
    ], input_size=[3, 16, 16]))
    data = load_model_data(w, w.model("cam"))
    assert len(data.train) + len(data.val) == 6 and data.num_classes == 5
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and y == UNLABELLED
    # The images are read in order of their names.
    assert [p.name for p in data.train.dataset.files] == [f"frame{i:03}.png" for i in range(6)]
    with pytest.raises(DatasetError, match=r"frames: no class sub-folders; .*labels: distill"):
        load_model_data(w, w.model("labelled"))


def test_folder_without_images_is_a_clear_error(tmp_path, write_workload):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("frames go here")
    w = load_workload(write_workload([
        tv("cam", "resnet18", dataset={"kind": "image_folder", "path": "empty", "labels": "distill"}),
        tv("gone", "resnet18", dataset={"kind": "image_folder", "path": "missing", "labels": "distill"}),
    ]))
    with pytest.raises(DatasetError, match=r"empty: no images \(.*\.png.*\); put the images in this folder"):
        load_model_data(w, w.model("cam"))
    with pytest.raises(DatasetError, match=r"missing: no such folder"):
        load_model_data(w, w.model("gone"))


# --- distillation --------------------------------------------------------------------------


def test_distilled_labels_are_the_models_argmax_predictions(write_workload):
    # Four ground-truth classes for a two-class model: fine with distill (the model's classes count).
    w = load_workload(write_workload([tv("m", "resnet18", num_classes=2, dataset={
        "kind": "synthetic", "task": "count", "samples": 40, "seed": 1, "labels": "distill"})], input_size=[3, 16, 16]))
    spec = w.model("m")
    torch.manual_seed(0)
    model = build_model(w, spec, materialize=True).module
    model.train()
    data = load_model_data(w, spec)
    assert data.num_classes == 2
    out = distill(model, data, CPU)
    assert model.training  # left as it was found
    model.eval()
    for part, original in ((out.train, data.train), (out.val, data.val)):
        x, y = part.tensors
        assert torch.equal(x, torch.stack([original[i][0] for i in range(len(original))]))
        with torch.no_grad():
            assert torch.equal(y, model(x).argmax(1))
        assert set(y.tolist()) <= {0, 1}
    truth = torch.tensor([data.train[i][1] for i in range(len(data.train))])
    assert not torch.equal(out.train.tensors[1], truth)  # ground truth (four classes) is ignored


def _mixed_workload(tmp_path, write_workload):
    _frames(tmp_path / "frames", 40, seed=3)
    entries = [tv("color", "resnet18", num_classes=3,
                  dataset={"kind": "synthetic", "task": "color", "samples": 48, "seed": 0}),
               tv("cam", "resnet18", num_classes=3,
                  dataset={"kind": "image_folder", "path": "frames", "labels": "distill"})]
    w = load_workload(write_workload(entries, input_size=[3, 16, 16]))
    plan = propose_plan(w, analyze_workload(w))
    plan.retraining = plan.retraining.model_copy(update=FAST)
    return w, plan


def test_prepare_merge_measures_agreement_for_distilled_models(tmp_path, write_workload):
    w, plan = _mixed_workload(tmp_path, write_workload)
    ctx = prepare_merge(w, plan)
    assert ctx.unmerged_accuracy["cam"] == 1.0 and ctx.targets["cam"] == pytest.approx(0.95)
    assert ctx.targets["color"] == pytest.approx(0.95 * ctx.unmerged_accuracy["color"])
    assert UNLABELLED not in ctx.data["cam"].val.tensors[1].tolist()
    # The truth model keeps its ground-truth labels.
    truth = load_model_data(w, w.model("color"))
    assert [int(y) for _, y in ctx.data["color"].val] == [int(y) for _, y in truth.val]


def test_merge_with_a_distilled_model_writes_a_report(tmp_path, write_workload):
    w, plan = _mixed_workload(tmp_path, write_workload)
    # One group and one epoch: one round, then the report (the merge may miss its targets). Not a
    # time budget: on a busy machine the budget could run out before the first round.
    largest = max(plan.groups, key=lambda g: g.savings_bytes)
    plan.groups = [g.model_copy(update={"state": GroupState.accepted if g is largest else GroupState.rejected})
                   for g in plan.groups]
    report = merge_workload(w, plan, tmp_path / "merged", strategy="bisect")
    assert set(report["models"]) == {"color", "cam"}
    cam = report["models"]["cam"]
    assert cam["unmerged_accuracy"] == 1.0 and cam["target"] == pytest.approx(0.95)
    assert 0.0 <= cam["merged_accuracy"] <= 1.0 and report["rounds"] >= 1
    assert json.loads((tmp_path / "merged" / "report.json").read_text())["models"]["cam"]["target"] == cam["target"]
    assert (tmp_path / "merged" / "merged.safetensors").exists()


def test_finetune_skips_distilled_models_and_keeps_their_weights(tmp_path, write_workload):
    _frames(tmp_path / "frames", 4)
    (tmp_path / "weights").mkdir()
    module = construct("mobilenet_v3_small", 3, "cpu")[0]
    weights = tmp_path / "weights" / "cam.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    cam = {"name": "cam", "num_classes": 3,
           "source": {"kind": "checkpoint", "architecture": "mobilenet_v3_small", "path": "weights/cam.safetensors"},
           "dataset": {"kind": "image_folder", "path": "frames", "labels": "distill"}}
    color = tv("color", "resnet18", num_classes=3,
               dataset={"kind": "synthetic", "task": "color", "samples": 48, "seed": 0})
    w = load_workload(write_workload([cam, color], input_size=[3, 16, 16]))
    out = tmp_path / "out"
    summary = finetune_workload(w, out, RetrainSettings(**FAST))
    assert summary["cam"] == {"skipped": "distill: already trained; fine-tuning needs ground truth"}
    assert summary["color"]["epochs"] == 1  # models with ground truth are still fine-tuned
    again = load_workload(out / "workload.yaml")
    assert again.resolve(again.model("color").source.path) == (out / "color.safetensors").resolve()
    # The skipped model still loads the same weights and reads the same frames from the new folder.
    assert again.resolve(again.model("cam").source.path) == weights.resolve()
    assert again.resolve(again.model("cam").dataset.path) == (tmp_path / "frames").resolve()
    assert again.model("cam").dataset.labels == "distill"
    assert yaml.safe_load((out / "workload.yaml").read_text())["models"][0]["dataset"]["labels"] == "distill"
