"""Preprocessing and class names travel with a model: from its pretrained weights (or the
workload) through datasets, the bundle manifest and the runtime, so that a frame at the edge
goes through what the model was trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemel_studio.errors import WorkloadError
from gemel_studio.preprocessing import ImagePreprocessing, pinned, resolve_preprocessing, weights_class_names
from gemel_studio.workload import load_workload

from .conftest import tv



def tvw(name: str, architecture: str, weights: str, **extra) -> dict:
    """A torchvision entry with named pretrained weights."""
    entry = tv(name, architecture, **extra)
    entry["source"]["weights"] = weights
    return entry


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _hub_file_present() -> bool:
    from pathlib import Path

    return (Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()


def test_named_weights_give_their_preprocessing_scaled_to_the_input_size(write_workload):
    w = load_workload(write_workload([tvw("a", "mobilenet_v2", "IMAGENET1K_V1"),
                                      tvw("b", "mobilenet_v2", "IMAGENET1K_V1", input_size=[3, 64, 64]),
                                      tv("c", "mobilenet_v2")], input_size=[3, 224, 224]))
    a, b, c = (resolve_preprocessing(w, w.model(n)) for n in "abc")
    assert (a.resize, a.size, a.mean, a.std) == (256, (224, 224), IMAGENET_MEAN, IMAGENET_STD)
    assert (b.resize, b.size) == (73, (64, 64))  # 256/224 of the input's side
    assert (c.resize, c.mean, c.std) == (None, None, None)  # random init: [0, 1], straight resize


def test_the_workload_overrides_the_weights_field_by_field(write_workload):
    w = load_workload(write_workload([
        tvw("a", "mobilenet_v2", "IMAGENET1K_V1", preprocessing={"mean": [0.5, 0.5, 0.5], "std": [0.25] * 3}),
        tv("b", "resnet18", preprocessing={"resize": 40, "interpolation": "bicubic"}),
        tv("g", "resnet18", input_size=[1, 32, 32], preprocessing={"mean": [0.5], "std": [0.2]})],
        input_size=[3, 32, 32]))
    a, b, g = (resolve_preprocessing(w, w.model(n)) for n in "abg")
    assert (a.mean, a.std, a.resize) == ((0.5,) * 3, (0.25,) * 3, 37)  # resize still the weights'
    assert (b.resize, b.mean, b.interpolation) == (40, None, "bicubic")
    assert (g.channels, g.mean) == (1, (0.5,))


@pytest.mark.parametrize("prep, expected", [
    ({"mean": [0.5, 0.5, 0.5]}, "give both 'mean' and 'std'"),
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "'mean' has 2 values but 'std' has 3"),
    ({"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}, "every 'std' value must be positive"),
    ({"crop": [30, 30]}, "preprocessing.crop [30, 30] differs from input_size [32, 32]"),
    ({"resize": 0}, "greater than 0"),
])
def test_bad_preprocessing_is_one_line_naming_the_model_and_field(write_workload, prep, expected):
    path = write_workload([tv("cam", "resnet18", input_size=[3, 32, 32], preprocessing=prep)])
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    assert "model 'cam'" in str(err.value) and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_a_crop_is_checked_against_the_workloads_input_size_too(write_workload):
    path = write_workload([tv("cam", "resnet18", preprocessing={"resize": 40, "crop": [32, 32]})], input_size=[3, 64, 64])
    with pytest.raises(WorkloadError, match=r"model 'cam': preprocessing.crop \[32, 32\] differs from input_size "
                                            r"\[64, 64\]"):
        load_workload(path)


def test_mean_of_the_wrong_length_and_a_normalised_detector_are_refused(write_workload):
    w = load_workload(write_workload([
        tv("grey", "resnet18", input_size=[1, 32, 32], preprocessing={"mean": [0.5] * 3, "std": [0.2] * 3}),
        {"name": "det", "task": "detection", "num_classes": 3,
         "source": {"kind": "torchvision", "architecture": "ssdlite320_mobilenet_v3_large"},
         "preprocessing": {"mean": [0.5] * 3, "std": [0.2] * 3}}]))
    with pytest.raises(WorkloadError, match="mean has 3 values for a 1-channel input"):
        resolve_preprocessing(w, w.model("grey"))
    with pytest.raises(WorkloadError, match="a torchvision detector takes the whole image and normalises"):
        resolve_preprocessing(w, w.model("det"))


def test_apply_resizes_the_shorter_side_crops_the_centre_and_normalises():
    prep = ImagePreprocessing(channels=3, size=(4, 4), resize=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                              interpolation="nearest")
    x = torch.zeros(3, 4, 8)
    x[:, :, 2:6] = 1.0  # a bright centre band: the crop keeps exactly it
    out = prep.apply(x)
    assert out.shape == (3, 4, 4)
    assert torch.equal(out, torch.ones(3, 4, 4))  # (1 - 0.5) / 0.5
    squash = ImagePreprocessing(channels=1, size=(4, 4)).apply(x)  # straight resize, grey
    assert squash.shape == (1, 4, 4) and 0.0 < float(squash.mean()) < 1.0


def test_normalise_makes_its_mean_and_std_once_per_dtype_and_device_with_the_same_output(monkeypatch):
    from gemel_studio import preprocessing

    prep = ImagePreprocessing(channels=3, size=(4, 4), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def per_frame(x):  # what normalise did before: new tensors for every call
        mean = torch.tensor(prep.mean, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        std = torch.tensor(prep.std, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        return (x - mean) / std

    expected = {(dtype, batched): per_frame(images.to(dtype) if batched else images[0].to(dtype))
                for dtype in (torch.float32, torch.float64) for batched in (True, False)}
    preprocessing._channel_stats.cache_clear()
    made, real = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(k.get("dtype")) or real(*a, **k))
    for _ in range(3):
        for (dtype, batched), want in expected.items():
            assert torch.equal(prep.normalise(images.to(dtype) if batched else images[0].to(dtype)), want)
    assert made == [torch.float32, torch.float32, torch.float64, torch.float64]  # mean and std, once each
    # Made in inference mode (as the runtime calls it), the tensors still serve a training step.
    preprocessing._channel_stats.cache_clear()
    with torch.inference_mode():
        prep.normalise(images)
    x = images.clone().requires_grad_()
    prep.normalise(x).sum().backward()
    assert torch.allclose(x.grad, (1 / torch.tensor(prep.std)).reshape(-1, 1, 1).expand_as(x))


def test_class_names_come_from_the_workload_the_dataset_or_the_weights(write_workload):
    from gemel_studio.export.bundle import labels_of

    w = load_workload(write_workload([
        tvw("imagenet", "mobilenet_v2", "IMAGENET1K_V1"),
        tvw("tops", "mobilenet_v2", "IMAGENET1K_V1", num_classes=2,
           dataset={"kind": "fashion_mnist", "classes": [0, 2]}),
        tv("named", "resnet18", num_classes=2, class_names=["cat", "dog"]),
        tv("bare", "resnet18", num_classes=3)]))
    imagenet = labels_of(w, w.model("imagenet"))
    assert len(imagenet) == 1000 and imagenet[950] == "orange" and imagenet[0] == "tench"
    assert labels_of(w, w.model("tops")) == ["T-shirt/top", "Pullover"]
    assert labels_of(w, w.model("named")) == ["cat", "dog"]
    assert labels_of(w, w.model("bare")) == ["0", "1", "2"]
    assert weights_class_names(w.model("tops")) is None  # another head: the weights' names do not apply


def test_class_names_must_fit_the_class_count(write_workload):
    with pytest.raises(WorkloadError, match="class_names lists 1 names but num_classes is 2"):
        load_workload(write_workload([tv("m", "resnet18", num_classes=2, class_names=["cat"])]))


def test_pinning_keeps_what_the_weights_prescribed_once_the_source_is_a_checkpoint(write_workload):
    w = load_workload(write_workload([tvw("m", "mobilenet_v2", "IMAGENET1K_V1")], input_size=[3, 64, 64]))
    spec = pinned(w, w.model("m"))
    assert spec.preprocessing.resize == 73 and spec.preprocessing.crop == (64, 64)
    assert spec.preprocessing.mean == list(IMAGENET_MEAN)
    assert spec.class_names[950] == "orange"
    from gemel_studio.workload import CheckpointSource

    spec.source = CheckpointSource(kind="checkpoint", architecture="mobilenet_v2", path="m.safetensors")
    w.models = [spec]
    again = resolve_preprocessing(w, spec)
    assert again == resolve_preprocessing(load_workload(write_workload(
        [tvw("m", "mobilenet_v2", "IMAGENET1K_V1")], name="other.yaml", input_size=[3, 64, 64])), spec)


def test_datasets_are_normalised_as_the_model_expects(write_workload, tmp_path):
    from PIL import Image

    from gemel_studio.merging.datasets import load_model_data

    folder = tmp_path / "imgs"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 255 if cls == "a" else 0, np.uint8)).save(folder / cls / f"{i}.png")
    w = load_workload(write_workload([
        tv("m", "resnet18", num_classes=2, preprocessing={"resize": 16, "mean": [0.5] * 3, "std": [0.25] * 3},
           dataset={"kind": "image_folder", "path": str(folder)}),
        tv("s", "resnet18", num_classes=3, preprocessing={"mean": [0.5] * 3, "std": [0.5] * 3},
           dataset={"kind": "synthetic", "task": "shape", "samples": 8})], input_size=[3, 16, 16]))
    data = load_model_data(w, w.model("m"))
    values = {int(y): x for x, y in (data.train[i] for i in range(len(data.train)))}
    assert values[0].shape == (3, 16, 16)
    assert torch.allclose(values[0], torch.full((3, 16, 16), 2.0))  # white: (1 - 0.5) / 0.25
    assert torch.allclose(values[1], torch.full((3, 16, 16), -2.0))  # black
    synth = load_model_data(w, w.model("s"))
    assert float(min(synth.train[i][0].min() for i in range(len(synth.train)))) < -0.5  # [0, 1] mapped to [-1, 1]


@pytest.mark.skipif(not _hub_file_present(), reason="torchvision's mobilenet_v2-b0353104.pth is not in the torch hub "
                    "cache; ./dev.sh setup fetches it (scripts/fetch_weights.py)")
def test_a_pretrained_classifier_gives_torchvisions_own_top1_through_the_bundle_and_both_backends(tmp_path):
    """Frames read from image files by the runtime, through the bundle's manifest preprocessing,
    on both backends, give the answer torchvision's weights.transforms() give on the same files."""
    import yaml
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor
    from torchvision.models import MobileNet_V2_Weights

    from gemel_studio.analysis import analyze_workload
    from gemel_studio.export import export_bundle
    from gemel_studio.merging import propose_plan
    from gemel_studio.merging.pipeline import write_merged_folder
    from gemel_studio.models import build_model
    from gemel_studio.runtime import load_bundle
    from gemel_studio.runtime.sources import ImageFilesSource

    from .conftest import described_outputs

    src = tmp_path / "workload.yaml"
    src.write_text(yaml.safe_dump({"version": 1, "name": "imagenet", "input_size": [3, 224, 224], "models": [
        tvw("mnv2", "mobilenet_v2", "IMAGENET1K_V1")]}))
    workload = load_workload(src)
    model = build_model(workload, workload.model("mnv2"), materialize=True).module.eval()
    merged = tmp_path / "merged"
    write_merged_folder(merged, workload, {"mnv2": model}, propose_plan(workload, analyze_workload(workload)),
                        {"workload": workload.name, "models": {}})
    result = export_bundle(merged, tmp_path / "bundle")
    assert result.ok, [c for c in result.checks if not c.passed]
    bundle = load_bundle(tmp_path / "bundle")
    spec = bundle.manifest.model("mnv2")
    assert spec.preprocessing.mean == list(IMAGENET_MEAN) and spec.preprocessing.resize == 256
    assert spec.labels[950] == "orange"

    # Images the test makes: smooth colour fields with a few shapes, of several sizes and aspects.
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(240, 320), (300, 300), (400, 260), (256, 384)]):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy) + 2 * i)], -1) * 0.5 + 0.5
        img = (base * 255).astype(np.uint8)
        for _ in range(4):
            y0, x0 = rng.integers(0, h - 60), rng.integers(0, w - 60)
            img[y0:y0 + 50, x0:x0 + 50] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(frames_dir / f"{i:04d}.png")
    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    transform = weights.transforms()
    files = sorted(frames_dir.glob("*.png"))
    # torchvision's transforms on the decoded image as floats in [0, 1] (on uint8 they round
    # once more after resizing, which moves scores by about 0.01 on these images).
    def decode_image(path: str) -> torch.Tensor:
        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))

    with torch.no_grad():
        ref = [torch.softmax(model(transform(decode_image(str(f)).float() / 255)[None]), 1)[0] for f in files]
        raw = [torch.softmax(model(decode_image(str(f)).float()[None] / 255), 1)[0] for f in files]
    expected = [weights.meta["categories"][int(p.argmax())] for p in ref]
    # The test can tell: the unnormalised, uncropped input of before gives other answers.
    assert [weights.meta["categories"][int(p.argmax())] for p in raw] != expected

    frames = [f for _, f in ImageFilesSource.from_pattern(str(frames_dir / "%04d.png"), realtime=False).frames()]
    assert len(frames) == len(files)
    for backend in ("torch", "onnxruntime"):
        _, outs = described_outputs(bundle, ["mnv2"], frames, backend)
        got = [o["mnv2"]["label"] for o in outs]
        assert got == expected, backend
        for o, p in zip(outs, ref):
            assert o["mnv2"]["score"] == pytest.approx(float(p.max()), abs=1e-3)
