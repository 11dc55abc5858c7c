"""Detectors in retraining and merging: synthetic scenes with boxes, mAP from torchmetrics,
and a merge of two torchvision detectors end to end."""

from __future__ import annotations

import json

import pytest
import torch

from gemel_studio.analysis import analyze_workload
from gemel_studio.merging import propose_plan
from gemel_studio.merging.datasets import DatasetError, DetectionScenes, load_model_data
from gemel_studio.merging.pipeline import merge_workload
from gemel_studio.merging.retrain import mean_average_precision
from gemel_studio.workload import load_workload

from .conftest import tv


def test_detection_scenes_have_a_box_around_every_shape():
    ds = DetectionScenes(samples=20, seed=3, size=(3, 48, 48))
    assert len(ds) == 20
    for image, target in ds:
        boxes, labels = target["boxes"], target["labels"]
        assert image.shape == (3, 48, 48) and 1 <= len(boxes) == len(labels) <= 3
        assert set(labels.tolist()) <= {1, 2, 3}
        assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
        assert boxes.min() >= 0 and boxes.max() <= 48
        for x0, y0, x1, y1 in boxes.round().int().tolist():
            # Shapes are drawn in saturated colours (a channel >= 0.8) on a dark background (<= 0.25).
            assert image[:, y0:y1 + 1, x0:x1 + 1].amax() >= 0.8


class Oracle(torch.nn.Module):
    """A 'detector' that answers each image with given boxes (looked up by the image's sum)."""

    def __init__(self, ds, shift: float = 0.0):
        super().__init__()
        self.answers = {round(float(x.sum()), 3): t for x, t in ds}
        self.shift = shift

    def forward(self, images):
        out = []
        for x in images:
            t = self.answers[round(float(x.sum()), 3)]
            out.append({"boxes": t["boxes"] + self.shift, "labels": t["labels"],
                        "scores": torch.ones(len(t["labels"]))})
        return out


def test_map_is_one_for_exact_boxes_and_zero_for_boxes_far_off():
    ds = DetectionScenes(samples=12, seed=5, size=(3, 64, 64))
    cpu = torch.device("cpu")
    assert mean_average_precision(Oracle(ds), ds, cpu) == pytest.approx(1.0)
    assert mean_average_precision(Oracle(ds, shift=40.0), ds, cpu) == pytest.approx(0.0)


def test_a_synthetic_task_that_does_not_fit_the_model_is_named(write_workload):
    w = load_workload(write_workload([tv("d", "ssdlite320_mobilenet_v3_large", task="detection", num_classes=4,
                                         dataset={"kind": "synthetic", "task": "shape", "samples": 8})]))
    with pytest.raises(DatasetError, match="task 'shape' does not fit a detection model; use task 'detect'"):
        load_model_data(w, w.model("d"))


def test_two_detectors_merge_and_report_map(tmp_path, write_workload):
    entries = [tv(n, "ssdlite320_mobilenet_v3_large", task="detection", num_classes=4,
                  target={"relative": 0.5}, dataset={"kind": "synthetic", "task": "detect", "samples": 10, "seed": i})
               for i, n in enumerate(("front", "back"))]
    w = load_workload(write_workload(entries, input_size=[3, 64, 64]))
    analysis = analyze_workload(w)
    plan = propose_plan(w, analysis)
    plan.retraining = plan.retraining.model_copy(update={"epochs": 1, "batch_size": 8, "optimizer": "adam",
                                                         "device": "cpu"})
    report = merge_workload(w, plan, tmp_path / "merged", strategy="bisect")
    assert set(report["models"]) == {"front", "back"}
    for row in report["models"].values():
        assert row["metric"] == "mAP@0.5" and 0.0 <= row["merged_accuracy"] <= 1.0
        assert row["target"] == pytest.approx(0.5 * row["unmerged_accuracy"])
    assert report["rounds"] >= 1
    assert report["bytes_after"] == report["predicted_bytes_after"]
    assert json.loads((tmp_path / "merged" / "report.json").read_text())["models"] == report["models"]
