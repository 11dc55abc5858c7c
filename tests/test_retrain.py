"""Datasets and joint retraining: learning, cancel and exact resume, OOM back-off, checkpoints."""

from __future__ import annotations

import pytest
import torch

from gemel_studio.errors import Cancelled, GemelError
from gemel_studio.merging.datasets import DatasetError, SYNTHETIC_TASKS, fashion_mnist, load_model_data, synthetic_scenes
from gemel_studio.merging.plan import RetrainSettings
from gemel_studio.merging.retrain import joint_retrain, loss_weight, resolve_device
from gemel_studio.models import build_model
from gemel_studio.progress import Progress
from gemel_studio.workload import load_workload

from .conftest import tv


def test_synthetic_scenes_are_reproducible_and_labelled():
    a = synthetic_scenes("count", 64, seed=3, size=(3, 24, 24))
    b = synthetic_scenes("count", 64, seed=3, size=(3, 24, 24))
    c = synthetic_scenes("count", 64, seed=4, size=(3, 24, 24))
    assert torch.equal(a.tensors[0], b.tensors[0]) and not torch.equal(a.tensors[0], c.tensors[0])
    assert a.tensors[0].shape == (64, 3, 24, 24)
    assert set(a.tensors[1].tolist()) == set(range(SYNTHETIC_TASKS["count"]))
    grey = synthetic_scenes("color", 8, seed=0, size=(1, 16, 16))
    assert grey.tensors[0].shape == (8, 1, 16, 16)
    with pytest.raises(DatasetError, match="synthetic task 'texture' is unknown"):
        synthetic_scenes("texture", 8, 0, (3, 8, 8))


def _idx(path, array, ndim_code=0x08):
    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, ndim_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def test_fashion_mnist_idx_reader_subsets_and_resizes(tmp_path):
    import numpy as np

    images = np.arange(6 * 28 * 28).reshape(6, 28, 28) % 256
    _idx(tmp_path / "train-images-idx3-ubyte", images)
    _idx(tmp_path / "train-labels-idx1-ubyte", [0, 3, 5, 3, 0, 9])
    ds = fashion_mnist(tmp_path, classes=[3, 0], size=(3, 32, 32))
    x, y = ds.tensors
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [1, 0, 0, 1]  # 3 -> 0, 0 -> 1
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(DatasetError, match="truncated"):
        fashion_mnist(tmp_path, None, (1, 28, 28))
    with pytest.raises(DatasetError, match="no t10k-images-idx3-ubyte"):
        fashion_mnist(tmp_path, None, (1, 28, 28), split="test")


def test_dataset_with_more_classes_than_the_model(write_workload):
    entry = tv("m", "resnet18", num_classes=2, dataset={"kind": "synthetic", "task": "count", "samples": 8})
    w = load_workload(write_workload([entry]))
    with pytest.raises(DatasetError, match="its dataset has 4 classes but num_classes is 2"):
        load_model_data(w, w.models[0])


def test_loss_weights_push_models_below_target():
    assert loss_weight(0.9, 0.45) == pytest.approx(2 ** 0.75)
    assert loss_weight(0.9, 0.95) < 1 < loss_weight(0.9, 0.8)
    assert loss_weight(0.9, 0.0) == 10.0


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(GemelError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    for name in ("meta", "gpu0"):  # a torch device this tool does not run on, and no device at all
        with pytest.raises(GemelError, match="use auto, cpu, cuda or cuda:N"):
            resolve_device(name)


@pytest.fixture
def color_models(write_workload):
    """Two ResNet-18s on easy synthetic tasks at 32x32: trains in seconds on a CPU."""
    entries = [tv("color", "resnet18", num_classes=3, dataset={"kind": "synthetic", "task": "color", "samples": 400, "seed": 1}),
               tv("size", "resnet18", num_classes=2, dataset={"kind": "synthetic", "task": "size", "samples": 400, "seed": 2})]
    w = load_workload(write_workload(entries, input_size=[3, 32, 32]))

    def make():
        torch.manual_seed(0)
        models = {s.name: build_model(w, s, materialize=True).module for s in w.models}
        data = {s.name: load_model_data(w, s) for s in w.models}
        return models, data

    return make


SETTINGS = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0, batch_size=16)


def test_retraining_raises_accuracy(color_models):
    models, data = color_models()
    result = joint_retrain(models, data, {"color": 0.99, "size": 0.99}, RetrainSettings(epochs=3, **SETTINGS),
                           early_stop=False)
    assert len(result.history) == 3
    assert result.accuracy["color"] > result.initial_accuracy["color"] + 0.2
    assert sum(result.accuracy.values()) > sum(result.initial_accuracy.values())


def test_cancel_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path, color_models):
    settings = RetrainSettings(epochs=2, **SETTINGS)
    targets = {"color": 1.0, "size": 1.0}
    models, data = color_models()
    reference = joint_retrain(models, data, targets, settings, early_stop=False)
    ref_state = {k: v.clone() for k, v in models["color"].state_dict().items()}

    models, data = color_models()
    ckpt = tmp_path / "retrain.ckpt"

    def cancel_mid_epoch_2(done, total, message):
        if message.startswith("epoch 2") and done == 3:
            progress.cancel()

    progress = Progress(cancel_mid_epoch_2, min_interval=0)
    with pytest.raises(Cancelled):
        joint_retrain(models, data, targets, settings, progress=progress, checkpoint=ckpt, early_stop=False)
    saved = torch.load(ckpt, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 3)  # one epoch done, three steps of the second

    models, data = color_models()  # a fresh process: weights come from the checkpoint alone
    resumed = joint_retrain(models, data, targets, settings, checkpoint=ckpt, early_stop=False)
    assert any("resumed" in e for e in resumed.events)
    assert [h.epoch for h in resumed.history] == [1, 2]
    for key, value in models["color"].state_dict().items():
        torch.testing.assert_close(value, ref_state[key], msg=key)
    assert resumed.accuracy == reference.accuracy


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, color_models):
    models, data = color_models()
    ckpt = tmp_path / "retrain.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(GemelError, match="checkpoint is corrupt"):
        joint_retrain(models, data, {"color": 1, "size": 1}, RetrainSettings(epochs=1, **SETTINGS), checkpoint=ckpt)
    assert ckpt.read_bytes() == b"not a checkpoint"


class _SmallMemory(torch.nn.Module):
    """Wraps a model and fails like a GPU does when a batch exceeds what fits."""

    def __init__(self, inner: torch.nn.Module, fits: int):
        super().__init__()
        self.inner, self.fits = inner, fits

    def forward(self, x):
        if self.training and x.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory: batch {x.shape[0]}")
        return self.inner(x)


def test_out_of_memory_halves_the_batch_and_says_so(color_models):
    models, data = color_models()
    models = {n: _SmallMemory(m, fits=4) for n, m in models.items()}
    result = joint_retrain(models, data, {"color": 1, "size": 1}, RetrainSettings(epochs=1, **SETTINGS),
                           early_stop=False)
    assert result.batch_size == 4
    assert [e.split(":")[1].strip() for e in result.events] == ["batch size halved to 8, epoch retried",
                                                                "batch size halved to 4, epoch retried"]
    assert len(result.history) == 1
    models = {n: _SmallMemory(m.inner, fits=0) for n, m in models.items()}
    with pytest.raises(GemelError, match="out of GPU memory even at batch size 1"):
        joint_retrain(models, data, {"color": 1, "size": 1}, RetrainSettings(epochs=1, **SETTINGS))


def _steps_trained(progress_calls: list[tuple[int, int, str]]) -> int:
    return sum(1 for _, _, message in progress_calls if " loss " in message)


@pytest.mark.parametrize("checks", [1, 4])
def test_a_round_stops_at_the_first_check_where_every_target_is_met(color_models, checks):
    models, data = color_models()
    calls: list[tuple[int, int, str]] = []
    progress = Progress(lambda *a: calls.append(a), min_interval=0)
    settings = RetrainSettings(epochs=3, checks_per_epoch=checks, **SETTINGS)
    result = joint_retrain(models, data, {"color": 0.0, "size": 0.0}, settings, progress=progress)
    steps = max(len(d.train) // SETTINGS["batch_size"] for d in data.values())
    assert result.stopped == "targets met" and len(result.history) == 1
    if checks == 1:  # checked only at the epoch's end
        assert result.history[0].steps is None and _steps_trained(calls) == steps
    else:  # met at the first check, a quarter of the way in
        assert result.history[0].steps == steps // 4 and _steps_trained(calls) == steps // 4
        assert result.history[0].fraction == pytest.approx((steps // 4) / steps)


def test_checks_that_fail_do_not_cut_the_epoch_short(color_models):
    models, data = color_models()
    calls: list[tuple[int, int, str]] = []
    progress = Progress(lambda *a: calls.append(a), min_interval=0)
    settings = RetrainSettings(epochs=1, checks_per_epoch=4, **SETTINGS)
    result = joint_retrain(models, data, {"color": 1.01, "size": 1.01}, settings, progress=progress)
    steps = max(len(d.train) // SETTINGS["batch_size"] for d in data.values())
    assert result.stopped == "epochs done" and result.history[0].steps is None and _steps_trained(calls) == steps


def test_a_cancel_between_checks_resumes_with_the_last_checks_loss_weights(tmp_path, color_models):
    settings = RetrainSettings(epochs=1, checks_per_epoch=4, **SETTINGS)
    targets = {"color": 1.01, "size": 1.01}  # never met: every check changes the loss weights, none stops
    models, data = color_models()
    reference = joint_retrain(models, data, targets, settings)
    ref_state = {k: v.clone() for k, v in models["color"].state_dict().items()}
    steps = max(len(d.train) // SETTINGS["batch_size"] for d in data.values())
    cancel_at = steps // 4 + 2  # two steps after the first check

    models, data = color_models()
    ckpt = tmp_path / "retrain.ckpt"
    progress = Progress(lambda done, total, message: progress.cancel() if done == cancel_at else None, min_interval=0)
    with pytest.raises(Cancelled):
        joint_retrain(models, data, targets, settings, progress=progress, checkpoint=ckpt)
    models, data = color_models()
    resumed = joint_retrain(models, data, targets, settings, checkpoint=ckpt)
    assert any("resumed" in e for e in resumed.events)
    for key, value in models["color"].state_dict().items():
        torch.testing.assert_close(value, ref_state[key], msg=key)
    assert resumed.accuracy == reference.accuracy
