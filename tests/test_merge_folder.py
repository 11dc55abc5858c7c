"""A merge's folder (`MergedFolder`) and its baseline: random-init models are built from a
per-model seed, the unmerged accuracy is measured once per merge and a resume reuses it."""

from __future__ import annotations

import json

import pytest
import torch

from gemel_studio.errors import Cancelled
from gemel_studio.merging import pipeline
from gemel_studio.merging.folder import MergedFolder
from gemel_studio.merging.plan import propose_plan
from gemel_studio.analysis import analyze_workload
from gemel_studio.tasks import TaskStatus, plural
from gemel_studio.workload import load_workload

from .conftest import tv


@pytest.fixture
def small(write_workload):
    entries = [tv(t, "resnet18", num_classes=n, target={"relative": 0.9},
                  dataset={"kind": "synthetic", "task": t, "samples": 32, "seed": i})
               for i, (t, n) in enumerate(zip(["color", "shape"], [3, 3]))]
    return load_workload(write_workload(entries, input_size=[3, 16, 16]))


def test_folder_names_its_files_and_what_a_fresh_start_would_delete(tmp_path):
    folder = MergedFolder(tmp_path / "m")
    assert not folder.can_resume and folder.describe_loss() == "" and folder.report() is None
    folder.path.mkdir()
    (folder.path / "search.state").write_bytes(b"x")
    assert folder.can_resume and "checkpoint (search.state)" in folder.describe_loss()
    (folder.path / "report.json").write_text(json.dumps({"rounds": 1}))
    assert not folder.can_resume and folder.report() == {"rounds": 1}
    assert folder.describe_loss().startswith("the finished merge's report.json and the checkpoint")
    folder.write_baseline({"a": 0.5}, {"a": 0.45})
    assert folder.baseline() == {"models": {"a": {"unmerged_accuracy": 0.5, "target": 0.45}}}
    folder.delete_checkpoint()
    assert not folder.has_checkpoint and folder.has_report
    folder.clear()
    assert list(folder.path.iterdir()) == []


def test_report_json_keeps_its_exact_format_through_the_typed_report(tmp_path):
    """An older folder's report.json (fewer keys, in its own order) reads as a MergeReport and
    converts back to exactly the dict on disk; unknown keys are kept."""
    from gemel_studio.merging.report import MergeReport, format_report

    old = {"workload": "w", "strategy": "gemel", "stopped": "done", "device": "cpu",
           "models": {"a": {"unmerged_accuracy": 0.6, "merged_accuracy": 0.5, "target": 0.01, "passed": True}},
           "bytes_before": 10_000, "bytes_after": 7_952, "saved_bytes": 2048, "all_shareable_bytes": 4096,
           "fraction_of_bound": 0.5, "retrain_seconds": 1.0, "rounds": 1, "steps": [{"round": 1}],
           "from_the_future": [1, 2]}
    folder = MergedFolder(tmp_path / "m")
    folder.path.mkdir()
    (folder.path / "report.json").write_text(json.dumps(old))
    report = folder.report()
    assert isinstance(report, MergeReport) and report.to_dict() == old and report == old
    assert report.models["a"].passed and report.models["a"].metric == "accuracy" and report.passed == 1
    assert report["saved_bytes"] == 2048  # read as the dict it was
    assert "a                accuracy  unmerged 0.600  merged 0.500  target 0.010  pass" in format_report(report)
    folder.write_report(report)
    assert json.loads((folder.path / "report.json").read_text()) == old
    assert (folder.path / "report.json").read_text() == json.dumps(old, indent=2)
    (folder.path / "report.json").write_text(json.dumps({"models": "not a table"}))
    assert folder.report() is None


def test_random_init_models_are_the_same_every_time_and_leave_the_global_rng_alone(small):
    spec = small.models[0]
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    a = pipeline.build_seeded(small, spec).module.state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.rand(10)  # the global stream moves; the model's weights do not
    b = pipeline.build_seeded(small, spec).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = pipeline.build_seeded(small, small.models[1]).module.state_dict()
    assert not torch.equal(a["conv1.weight"], other["conv1.weight"])
    assert pipeline.model_seed("color") == pipeline.model_seed("color") != pipeline.model_seed("shape")


def test_the_baseline_is_measured_once_per_merge_and_a_resume_reuses_it(small, tmp_path, monkeypatch):
    plan = propose_plan(small, analyze_workload(small))
    out = tmp_path / "merged"

    def stop_after_a_checkpoint(build, base_state, plan, data, targets, strategy, *, state_path, **kwargs):
        state_path.write_bytes(b"checkpoint")
        raise Cancelled("paused")

    monkeypatch.setattr(pipeline, "search", stop_after_a_checkpoint)
    seen = []
    with pytest.raises(Cancelled):
        pipeline.merge_workload(small, plan, out, on_targets=seen.append)
    stored = MergedFolder(out).baseline()
    assert {n: (m["unmerged_accuracy"], m["target"]) for n, m in stored["models"].items()} == seen[0]
    # Measured again from the same seeded weights: the same figures.
    again = pipeline.prepare_merge(small, plan)
    assert again.unmerged_accuracy == {n: a for n, (a, _) in seen[0].items()}

    # A resume takes the stored baseline, not a new measurement.
    (out / "baseline.json").write_text(json.dumps({"models": {
        n: {"unmerged_accuracy": 0.123, "target": 0.111} for n in stored["models"]}}))
    with pytest.raises(Cancelled):
        pipeline.merge_workload(small, plan, out, on_targets=seen.append)
    assert seen[1] == {n: (0.123, 0.111) for n in stored["models"]}

    # A fresh merge (no checkpoint) measures again and overwrites it.
    (out / "search.state").unlink()
    with pytest.raises(Cancelled):
        pipeline.merge_workload(small, plan, out, on_targets=seen.append)
    assert seen[2] == seen[0]


def test_task_status_and_plurals():
    assert TaskStatus.RUNNING.active and TaskStatus.STOPPING.active and not TaskStatus.FINISHED.active
    assert TaskStatus.CANCELLED.ended and not TaskStatus.IDLE.ended
    assert [plural(n, "round") for n in (0, 1, 2)] == ["0 rounds", "1 round", "2 rounds"]
