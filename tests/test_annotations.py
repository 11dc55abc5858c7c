"""Detection data from files: COCO instances JSON, Pascal VOC folders and YOLO labels read into
boxes at the model's input size, class names mapped to class indices, one-line errors for every
malformed entry, distillation for detectors, and a merge that retrains on a COCO dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from gemel_studio.analysis import analyze_workload
from gemel_studio.errors import WorkloadError
from gemel_studio.export.bundle import labels_of
from gemel_studio.merging import propose_plan
from gemel_studio.merging.datasets import SHAPES, DatasetError, DetectionScenes, ModelData, distill, load_model_data
from gemel_studio.merging.pipeline import finetune_workload, merge_workload
from gemel_studio.merging.plan import GroupState, RetrainSettings
from gemel_studio.merging.retrain import evaluate
from gemel_studio.models import build_model
from gemel_studio.models.zoo import construct
from gemel_studio.workload import load_workload, save_workload

from .conftest import tv

CPU = torch.device("cpu")
DETECTOR = "ssdlite320_mobilenet_v3_large"
FAST = {"epochs": 1, "batch_size": 8, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "device": "cpu"}


def det(name: str, dataset: dict, num_classes: int = 4, **extra) -> dict:
    return tv(name, DETECTOR, task="detection", num_classes=num_classes, dataset=dataset, **extra)


def png(path, width: int, height: int, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def targets_by_name(data: ModelData) -> dict[str, dict]:
    """Every image's target (train and validation), by file name."""
    ds = data.train.dataset
    assert data.val.dataset is ds
    return {f.name: t for f, t in zip(ds.files, ds.targets)}


def boxes(target) -> list[list[float]]:
    return target["boxes"].tolist()


# --- COCO ----------------------------------------------------------------------------------

COCO_CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 5, "name": "bird"}]


def coco(tmp_path, annotations=None, images=None, categories=None, name="instances.json"):
    """wide.png (128x64) with a cat, a dog and a crowd; square.png (32x32) with a bird; empty.png none."""
    png(tmp_path / "images" / "wide.png", 128, 64, 1)
    png(tmp_path / "images" / "square.png", 32, 32, 2)
    png(tmp_path / "images" / "empty.png", 16, 16, 3)
    data = {
        "images": images if images is not None else [
            {"id": 1, "file_name": "wide.png", "width": 128, "height": 64},
            {"id": 2, "file_name": "square.png", "width": 32, "height": 32},
            {"id": 3, "file_name": "empty.png"}],
        "annotations": annotations if annotations is not None else [
            {"id": 7, "image_id": 1, "category_id": 3, "bbox": [10, 8, 20, 16], "iscrowd": 0},
            {"id": 8, "image_id": 1, "category_id": 1, "bbox": [64, 0, 64, 64]},
            {"id": 9, "image_id": 1, "category_id": 1, "bbox": [0, 0, 128, 64], "iscrowd": 1},
            {"id": 10, "image_id": 2, "category_id": 5, "bbox": [4, 4, 8.5, 16]}],
        "categories": categories if categories is not None else COCO_CATEGORIES,
    }
    (tmp_path / name).write_text(json.dumps(data))
    return {"kind": "coco", "images": "images", "annotations": name}


def test_coco_boxes_scale_to_the_input_and_categories_number_by_id(tmp_path, write_workload):
    w = load_workload(write_workload([det("d", coco(tmp_path))], input_size=[3, 64, 64]))
    data = load_model_data(w, w.model("d"))
    assert data.task == "detection" and data.num_classes == 4  # dog 1, cat 3 -> 2, bird 5 -> 3, + background
    assert len(data.train) + len(data.val) == 3
    t = targets_by_name(data)
    # wide.png is 128x64: x halves, y stays; the crowd annotation is skipped.
    assert boxes(t["wide.png"]) == [[5.0, 8.0, 15.0, 24.0], [32.0, 0.0, 64.0, 64.0]]
    assert t["wide.png"]["labels"].tolist() == [2, 1] and t["wide.png"]["labels"].dtype == torch.int64
    assert boxes(t["square.png"]) == [[8.0, 8.0, 25.0, 40.0]]  # 32x32 -> 64x64 doubles
    assert t["square.png"]["labels"].tolist() == [3]
    assert t["empty.png"]["boxes"].shape == (0, 4) and t["empty.png"]["labels"].shape == (0,)
    image, target = data.train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() < image.max() <= 1
    assert labels_of(w, w.model("d")) == ["background", "dog", "cat", "bird"]


def test_each_image_is_decoded_once_when_the_data_loads_and_once_each_time_it_is_read(tmp_path, write_workload,
                                                                                     monkeypatch):
    # Loading decodes every image fully (its real size, and a broken file stops the load, not the
    # training); a read decodes it again (nothing but the boxes is held): never more than that.
    from PIL import Image, ImageFile

    opened, decoded = [], []
    real_open, real_load = Image.open, ImageFile.ImageFile.load

    def counting_load(image):
        if image.tile:  # pixels not decoded yet
            decoded.append(Path(image.filename).name)
        return real_load(image)

    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(Path(fp).name) or real_open(fp, *a, **k))
    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    w = load_workload(write_workload([det("d", coco(tmp_path))], input_size=[3, 64, 64]))
    data = load_model_data(w, w.model("d"))
    files = sorted(["wide.png", "square.png", "empty.png"])
    assert sorted(opened) == files and sorted(decoded) == files
    opened.clear(), decoded.clear()
    for split in (data.train, data.val):
        for i in range(len(split)):
            split[i]
    assert sorted(opened) == files and sorted(decoded) == files


def test_coco_categories_map_by_class_names(tmp_path, write_workload):
    names = ["background", "bird", "cat", "fish", "dog"]
    w = load_workload(write_workload([det("d", coco(tmp_path), num_classes=5, class_names=names)]))
    t = targets_by_name(load_model_data(w, w.model("d")))
    assert t["wide.png"]["labels"].tolist() == [2, 4] and t["square.png"]["labels"].tolist() == [1]
    assert labels_of(w, w.model("d")) == names


@pytest.mark.parametrize("classes, wide, square, names", [
    ({"cat": 2}, [2], [], ["background", "1", "cat", "3"]),  # dog and bird dropped
    ({3: 1, "bird": 3}, [1], [3], ["background", "cat", "2", "bird"]),  # a COCO id, a name
    (["bird", "dog"], [2], [1], ["background", "bird", "dog", "3"]),  # a list: class 1 first
])
def test_coco_explicit_classes_map_and_keep_only_the_categories_named(tmp_path, write_workload, classes, wide,
                                                                      square, names):
    w = load_workload(write_workload([det("d", {**coco(tmp_path), "classes": classes})]))
    t = targets_by_name(load_model_data(w, w.model("d")))
    assert t["wide.png"]["labels"].tolist() == wide and t["square.png"]["labels"].tolist() == square
    assert labels_of(w, w.model("d")) == names
    # Saved and read back (YAML keys of ids come back as text), the mapping is the same.
    (tmp_path / "saved").mkdir()
    save_workload(w, tmp_path / "saved" / "w.yaml")
    again = load_workload(tmp_path / "saved" / "w.yaml")
    t2 = targets_by_name(load_model_data(again, again.model("d")))
    assert {k: v["labels"].tolist() for k, v in t2.items()} == {k: v["labels"].tolist() for k, v in t.items()}


# --- Pascal VOC ----------------------------------------------------------------------------


def voc_xml(filename: str, objects: list[tuple], size=(64, 48)) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin>"
        f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, difficult, (x1, y1, x2, y2) in objects)
    dims = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC</folder><filename>{filename}</filename>{dims}{objs}</annotation>"


def voc(tmp_path, xml_one=None, split_lines=None):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    png(root / "JPEGImages" / "0001.png", 64, 48, 1)
    png(root / "JPEGImages" / "0002.png", 32, 32, 2)
    (root / "Annotations" / "0001.xml").write_text(xml_one if xml_one is not None else voc_xml(
        "0001.png", [("person", False, (8, 6, 40, 30)), ("car", True, (0, 0, 16, 12)),
                     ("dog", False, (32, 24, 64, 48))]))
    (root / "Annotations" / "0002.xml").write_text(voc_xml("0002.png", [("car", False, (4, 4, 20, 28))], (32, 32)))
    if split_lines is not None:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(split_lines) + "\n")
    return {"kind": "voc", "path": "voc"}


def test_voc_reads_objects_sorted_by_name_and_skips_difficult_ones(tmp_path, write_workload):
    w = load_workload(write_workload([det("d", voc(tmp_path)), det("keep", {"kind": "voc", "path": "voc",
                                                                             "keep_difficult": True})],
                                     input_size=[3, 96, 128]))
    data = load_model_data(w, w.model("d"))
    t = targets_by_name(data)
    # Names sorted: car 1, dog 2, person 3. 64x48 -> 128x96 doubles; the difficult car is skipped.
    assert boxes(t["0001.png"]) == [[16.0, 12.0, 80.0, 60.0], [64.0, 48.0, 128.0, 96.0]]
    assert t["0001.png"]["labels"].tolist() == [3, 2]
    assert boxes(t["0002.png"]) == [[16.0, 12.0, 80.0, 84.0]] and t["0002.png"]["labels"].tolist() == [1]
    assert data.num_classes == 4
    kept = targets_by_name(load_model_data(w, w.model("keep")))
    assert kept["0001.png"]["labels"].tolist() == [3, 1, 2]
    assert labels_of(w, w.model("d")) == ["background", "car", "dog", "person"]


def test_voc_split_list_and_explicit_classes(tmp_path, write_workload):
    dataset = {**voc(tmp_path, split_lines=["0002", ""]), "split": "train", "classes": {"car": 3}}
    w = load_workload(write_workload([det("d", dataset)]))
    t = targets_by_name(load_model_data(w, w.model("d")))
    assert list(t) == ["0002.png"] and t["0002.png"]["labels"].tolist() == [3]


# --- YOLO ----------------------------------------------------------------------------------


def yolo(tmp_path, lines_a=("0 0.5 0.5 0.5 0.25", "1 0.25 0.75 0.5 0.5"), folder="yolo"):
    """images/train/a.png (64x32) with two boxes, b.png (32x32) with no label file."""
    root = tmp_path / folder
    png(root / "images" / "train" / "a.png", 64, 32, 1)
    png(root / "images" / "train" / "b.png", 32, 32, 2)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("\n".join(lines_a) + "\n")
    return root


@pytest.mark.parametrize("how", ["label_dir", "beside", "data.yaml"])
def test_yolo_boxes_are_fractions_and_class_k_is_label_k_plus_one(tmp_path, write_workload, how):
    root = yolo(tmp_path)
    if how == "label_dir":
        dataset = {"kind": "yolo", "images": "yolo/images/train", "label_dir": "yolo/labels/train",
                   "names": ["car", "bus"]}
    elif how == "beside":  # Ultralytics' rule: .../images/... -> .../labels/...
        dataset = {"kind": "yolo", "images": "yolo/images/train", "names": ["car", "bus"]}
    else:
        (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/train",
                                                        "names": {0: "car", 1: "bus"}, "nc": 2}))
        dataset = {"kind": "yolo", "data": "yolo/data.yaml"}
    w = load_workload(write_workload([det("d", dataset, num_classes=3)], input_size=[3, 64, 64]))
    data = load_model_data(w, w.model("d"))
    t = targets_by_name(data)
    # a.png is 64x32, shown at 64x64: box 0 spans x 16..48 and y 0.375..0.625 of the height.
    assert boxes(t["a.png"]) == [[16.0, 24.0, 48.0, 40.0], [0.0, 32.0, 32.0, 64.0]]
    assert t["a.png"]["labels"].tolist() == [1, 2] and data.num_classes == 3
    assert t["b.png"]["boxes"].shape == (0, 4)  # no label file: no object
    assert labels_of(w, w.model("d")) == ["background", "car", "bus"]


def test_yolo_labels_field_is_truth_or_distill_and_label_dir_names_the_folder(tmp_path, write_workload):
    path = write_workload([det("d", {"kind": "yolo", "images": "i", "labels": "l", "names": ["a"]})])
    with pytest.raises(WorkloadError, match=r"field 'dataset': 'labels' is truth or distill; name the folder of "
                                            r"YOLO label files 'label_dir'"):
        load_workload(path)


# --- malformed annotations: one line naming the file, the entry and the fix ----------------


def _ann(**kw):
    return [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [10, 8, 20, 16], **kw}]


MALFORMED = {
    "coco: not JSON": (lambda p: (coco(p), (p / "instances.json").write_text('{"images": [1,}'))[0],
                       r"instances\.json: not valid JSON \(line 1, column 15: .*\); fix the file"),
    "coco: empty box": (lambda p: coco(p, annotations=_ann(bbox=[10, 8, 0, 16])),
                        r"instances\.json: annotation id 7: bbox \[10, 8, 0, 16\] has a width or height of zero or "
                        r"less; fix or delete it"),
    "coco: box outside": (lambda p: coco(p, annotations=_ann(bbox=[100, 8, 40, 16])),
                          r"instances\.json: annotation id 7: box \[100, 8, 140, 24\] \(x1, y1, x2, y2\) reaches "
                          r"outside the 128x64 image wide\.png; fix the box"),
    "coco: bad bbox": (lambda p: coco(p, annotations=_ann(bbox=[1, 2, 3])),
                       r"annotation id 7: bbox should be \[x, y, width, height\] in pixels, found \[1, 2, 3\]"),
    "coco: unknown category": (lambda p: coco(p, annotations=_ann(category_id=9)),
                               r"instances\.json: annotation id 7: category_id 9 is not among the file's categories "
                               r"\(1, 3, 5\); fix it or add the category"),
    "coco: unknown image": (lambda p: coco(p, annotations=_ann(image_id=4)),
                            r"instances\.json: annotation id 7: image_id 4 is not among the file's images"),
    "coco: missing image": (lambda p: coco(p, images=[{"id": 1, "file_name": "gone.png"}], annotations=[]),
                            r"instances\.json: image id 1: image .*images/gone\.png not found; fix its file_name or "
                            r"the dataset's images folder"),
    "coco: unreadable image": (lambda p: (coco(p), (p / "images" / "wide.png").write_bytes(b"not a png"))[0],
                               r"instances\.json: image id 1: cannot read image .*wide\.png \(.*\); replace the image"),
    "coco: truncated image": (lambda p: (coco(p), (p / "images" / "wide.png").write_bytes(
                                  (p / "images" / "wide.png").read_bytes()[:200]))[0],
                              r"instances\.json: image id 1: cannot read image .*wide\.png"),
    "coco: wrong size": (lambda p: coco(p, images=[{"id": 1, "file_name": "square.png", "width": 64, "height": 64}],
                                        annotations=[]),
                         r"instances\.json: image id 1: says the image is 64x64 but square\.png is 32x32; fix the "
                         r"size in the annotation"),
    "coco: not in class_names": (lambda p: coco(p), r"instances\.json: annotation id 7: category 'cat' is not among "
                                                    r"model 'd''s class_names \(after background\); add it there"),
    "coco: too many categories": (lambda p: {**coco(p, categories=COCO_CATEGORIES + [{"id": 6, "name": "owl"}])},
                                  r"instances\.json: 4 categories, but model 'd' has num_classes 4 \(background \+ "
                                  r"3\); raise num_classes to 5"),
    "coco: classes misspelt": (lambda p: {**coco(p), "classes": ["cta"]},
                               r"instances\.json: the dataset's classes names 'cta', which no category in it has"),
    "coco: class index too high": (lambda p: {**coco(p), "classes": {"cat": 4}},
                                   r"the dataset's classes uses class 4, but model 'd' has num_classes 4"),
    "voc: not XML": (lambda p: voc(p, xml_one="<annotation><object>"),
                     r"voc/Annotations/0001\.xml: not valid XML \(.*\); fix the file"),
    "voc: empty box": (lambda p: voc(p, xml_one=voc_xml("0001.png", [("cat", 0, (1, 1, 5, 5)),
                                                                      ("dog", 0, (20, 4, 12, 9))])),
                       r"0001\.xml: object 2 \('dog'\): bndbox xmin 20 ymin 4 xmax 12 ymax 9 has a width or height of "
                       r"zero or less"),
    "voc: no number": (lambda p: voc(p, xml_one=voc_xml("0001.png", [("cat", 0, (1, 1, 5, "five"))])),
                       r"0001\.xml: object 1 \('cat'\): bndbox <ymax> is 'five', not a number; fix it"),
    "voc: box outside": (lambda p: voc(p, xml_one=voc_xml("0001.png", [("cat", 0, (1, 1, 70, 5))])),
                         r"0001\.xml: object 1 \('cat'\): box \[1, 1, 70, 5\] .* reaches outside the 64x48 image"),
    "voc: missing image": (lambda p: voc(p, xml_one=voc_xml("0009.png", [], size=None)),
                           r"0001\.xml: image .*JPEGImages/0009\.png not found; fix <filename>"),
    "voc: split names a missing file": (lambda p: {**voc(p, split_lines=["0001", "0009"]), "split": "train"},
                                        r"ImageSets/Main/train\.txt: line 2: no Annotations/0009\.xml; fix the list"),
    "voc: unknown split": (lambda p: {**voc(p), "split": "val"},
                           r"ImageSets/Main/val\.txt: no such split list; fix the dataset's split"),
    "yolo: four values": (lambda p: _yolo_case(p, ("0 0.5 0.5 0.2 0.2", "1 0.5 0.5 0.2")),
                          r"labels/train/a\.txt: line 2: expected 'class cx cy width height', found 4 values; fix it"),
    "yolo: unknown class": (lambda p: _yolo_case(p, ("2 0.5 0.5 0.2 0.2",)),
                            r"a\.txt: line 1: class 2 is not one of 0\.\.1 \(car, bus\); fix the class or add "
                            r"its name"),
    "yolo: not numbers": (lambda p: _yolo_case(p, ("car 0.5 0.5 0.2 0.2",)),
                          r"a\.txt: line 1: 'car 0\.5 0\.5 0\.2 0\.2' is not five numbers"),
    "yolo: box outside": (lambda p: _yolo_case(p, ("0 0.9 0.5 0.5 0.2",)),
                          r"a\.txt: line 1: box \[41\.6, 12\.8, 73\.6, 19\.2\] .* reaches outside the 64x32 image "
                          r"a\.png; fix the box"),
    "yolo: empty box": (lambda p: _yolo_case(p, ("", "0 0.5 0.5 0 0.2")),
                        r"a\.txt: line 2: width 0 or height 0\.2 is zero or less"),
    "yolo: list names a missing image": (lambda p: _yolo_listed(p, ["images/train/a.png", "images/train/gone.png"]),
                                         r"yolo/train\.txt: line 2: image .*gone\.png not found; fix the list"),
    "yolo: data.yaml without the split": (lambda p: {**_yolo_listed(p, ["images/train/a.png"]), "split": "val"},
                                          r"data\.yaml: no 'val' entry; .* split to one of train"),
}


def _yolo_listed(tmp_path, lines):
    """A data.yaml whose train split is a .txt list of images."""
    root = yolo(tmp_path)
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "train.txt", "names": ["car", "bus"]}))
    return {"kind": "yolo", "data": "yolo/data.yaml"}


def _yolo_case(tmp_path, lines):
    yolo(tmp_path, lines_a=lines)
    return {"kind": "yolo", "images": "yolo/images/train", "names": ["car", "bus"]}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_annotations_name_the_file_and_the_entry(tmp_path, write_workload, case):
    build, expected = MALFORMED[case]
    dataset = build(tmp_path)
    extra = {"class_names": ["background", "dog", "bird", "owl"]} if case == "coco: not in class_names" else {}
    w = load_workload(write_workload([det("d", dataset, **extra)]))
    with pytest.raises(DatasetError) as err:
        load_model_data(w, w.model("d"))
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path) in message  # the file, by its full path
    assert re.search(expected, message), message


@pytest.mark.parametrize("model, expected", [
    (tv("c", "resnet18", dataset={"kind": "coco", "images": "images", "annotations": "instances.json"}),
     r"model 'c': dataset kind coco holds boxes, for detectors; set the model's task: detection"),
    (det("d", {"kind": "image_folder", "path": "images"}),
     r"model 'd': a detector needs images with boxes, and dataset kind image_folder has none; use kind coco, voc, "
     r"yolo or synthetic \(task detect\), or an image_folder with labels: distill"),
    (det("d", {"kind": "fashion_mnist"}), r"dataset kind fashion_mnist has none"),
    (det("d", {"kind": "coco", "images": "images", "annotations": "instances.json", "score_threshold": 0.3}),
     r"model 'd': score_threshold picks a detector's own boxes for labels: distill and means nothing here; remove it"),
])
def test_a_dataset_that_cannot_label_the_models_task_is_refused_before_reading(tmp_path, write_workload, model,
                                                                               expected):
    w = load_workload(write_workload([model]))  # nothing on disk: refused before any file is read
    with pytest.raises(DatasetError, match=expected):
        load_model_data(w, w.model(model["name"]))


def test_with_distill_only_the_images_are_read_and_their_boxes_ignored(tmp_path, write_workload):
    # Each kind with a broken box: distill reads the images the files list, never the boxes.
    coco_ds = coco(tmp_path, annotations=_ann(bbox=[1, 2, 3]))
    voc(tmp_path, xml_one=voc_xml("0001.png", [("cat", 0, (9, 9, 1, 1))]))
    yolo(tmp_path, lines_a=("not a line",))
    w = load_workload(write_workload([
        det("c", {**coco_ds, "labels": "distill"}), det("v", {"kind": "voc", "path": "voc", "labels": "distill"}),
        det("y", {"kind": "yolo", "images": "yolo/images/train", "labels": "distill"})]))  # names not needed
    for name, images in (("c", 3), ("v", 2), ("y", 2)):
        data = load_model_data(w, w.model(name))
        assert len(data.train.dataset) == images and data.num_classes == 4
        assert all(t["boxes"].shape == (0, 4) for t in data.train.dataset.targets)


def test_an_unknown_dataset_kind_lists_the_box_kinds(write_workload):
    with pytest.raises(WorkloadError, match=r"for a dataset: synthetic, image_folder, fashion_mnist, coco, voc, yolo"):
        load_workload(write_workload([det("d", {"kind": "labelme", "path": "x"})]))


# --- paths ---------------------------------------------------------------------------------


def test_save_as_rebases_every_path_of_a_box_dataset(tmp_path, write_workload):
    coco(tmp_path)
    voc(tmp_path)
    yolo(tmp_path)
    (tmp_path / "yolo" / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": ["car", "bus"]}))
    w = load_workload(write_workload([
        det("c", coco(tmp_path)), det("v", {"kind": "voc", "path": "voc"}),
        det("y", {"kind": "yolo", "images": "yolo/images/train", "label_dir": "yolo/labels/train", "names": ["a"]}),
        det("yd", {"kind": "yolo", "data": "yolo/data.yaml"}, num_classes=3)]))
    fields = ("path", "images", "annotations", "label_dir", "data")
    before = {s.name: {f: w.resolve(getattr(s.dataset, f)) for f in fields if getattr(s.dataset, f, None) is not None}
              for s in w.models}
    (tmp_path / "deeper" / "still").mkdir(parents=True)
    save_workload(w, tmp_path / "deeper" / "still" / "w.yaml")
    again = load_workload(tmp_path / "deeper" / "still" / "w.yaml")
    after = {s.name: {f: again.resolve(p) for f, p in ((f, getattr(s.dataset, f)) for f in before[s.name])}
             for s in again.models}
    assert after == before
    saved = yaml.safe_load((tmp_path / "deeper" / "still" / "w.yaml").read_text())["models"]
    assert not any(str(p).startswith("/") for s in saved for k, p in s["dataset"].items() if k in fields)
    assert len(load_model_data(again, again.model("yd")).train.dataset) == 2


# --- distillation for detectors ------------------------------------------------------------


class Scripted(torch.nn.Module):
    """A 'detector' whose answers are fixed: per image, boxes with scores and labels."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.calls = answers, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        out = []
        for _ in images:
            out.append(self.answers[self.calls % len(self.answers)])
            self.calls += 1
        return out


def test_distill_keeps_a_detectors_boxes_at_or_above_the_threshold(tmp_path, write_workload):
    coco(tmp_path)
    w = load_workload(write_workload([det("d", {**coco(tmp_path), "labels": "distill"})]))
    data = load_model_data(w, w.model("d"))
    assert data.num_classes == 4 and all(t["boxes"].shape == (0, 4) for t in data.train.dataset.targets)
    answers = [{"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0], [5.0, 5.0, 5.0, 9.0], [0.0, 0.0, 4.0, 4.0]]),
                "scores": torch.tensor([0.9, 0.95, 0.3]), "labels": torch.tensor([2, 1, 3])},
               {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[3.0, 3.0, 30.0, 20.0]]), "scores": torch.tensor([0.5]),
                "labels": torch.tensor([1])}]
    out = distill(Scripted(answers), data, CPU)
    got = [t for part in (out.train, out.val) for t in (part[i][1] for i in range(len(part)))]
    # In order: the first image keeps its 0.9 box (the 0.95 one has no width), the second has
    # none, the third keeps its box at exactly the 0.5 default.
    assert [boxes(t) for t in got] == [[[1.0, 2.0, 10.0, 12.0]], [], [[3.0, 3.0, 30.0, 20.0]]]
    assert [t["labels"].tolist() for t in got] == [[2], [], [1]]
    assert all(t["boxes"].shape[1:] == (4,) and t["labels"].dtype == torch.int64 for t in got)
    assert out.task == "detection" and out.num_classes == 4
    assert torch.equal(out.train[0][0], data.train[0][0])  # the same images
    lower = distill(Scripted(answers), data, CPU, score_threshold=0.25)
    assert len(lower.train[0][1]["labels"]) + sum(len(lower.val[i][1]["labels"]) for i in range(len(lower.val))) == 3


def _frames(folder, count: int):
    for i in range(count):
        png(folder / f"frame{i:02}.png", 48 + 8 * (i % 3), 40, seed=i)
    return folder


# --- real detectors, kept small ------------------------------------------------------------


@pytest.fixture
def small_detectors(monkeypatch):
    """SSDlite resizes every image to 320x320 inside; here it keeps the tests' 64x64 (its
    anchors follow the feature maps), a 25th of the work. A test speed-up only: the data
    paths under test are the same."""
    from gemel_studio.models import zoo

    original = zoo.get_model

    def get_model(name, **kwargs):
        model = original(name, **kwargs)
        if name == DETECTOR:
            model.transform.fixed_size, model.transform.min_size, model.transform.max_size = (64, 64), (64,), 64
        return model

    monkeypatch.setattr(zoo, "get_model", get_model)


def _checkpointed_detector(tmp_path, seed: int) -> torch.nn.Module:
    """An untrained SSDlite whose class scores differ from box to box (a fresh one scores every
    box alike), saved as tmp_path/d.safetensors."""
    torch.manual_seed(seed)
    model = construct(DETECTOR, 4, "cpu")[0]
    for p in model.head.classification_head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "d.safetensors"))
    return model.eval()


def _checkpoint_entry(name: str, dataset: dict, **extra) -> dict:
    return {"name": name, "task": "detection", "num_classes": 4, "dataset": dataset, **extra,
            "source": {"kind": "checkpoint", "architecture": DETECTOR, "path": "d.safetensors"}}


def _outputs(model, data: ModelData):
    """The detector's raw outputs on the train and validation images, each part in one batch
    as distill runs it (these tests have fewer than 16 images)."""
    with torch.no_grad():
        return [model([part[i][0] for i in range(len(part))]) for part in (data.train, data.val)]


def _assert_distilled(out: ModelData, raw, threshold: float) -> int:
    """`out`'s targets are exactly the boxes of `raw` scored >= threshold; returns how many."""
    kept = 0
    for part, outs in zip((out.train, out.val), raw):
        assert len(part) == len(outs)
        for i, o in enumerate(outs):
            keep = o["scores"] >= threshold
            target = part[i][1]
            assert target["boxes"].shape == (int(keep.sum()), 4) and target["labels"].dtype == torch.int64
            assert torch.allclose(target["boxes"], o["boxes"][keep], atol=1e-4)
            assert torch.equal(target["labels"], o["labels"][keep])
            kept += int(keep.sum())
    return kept


def test_a_detectors_distilled_targets_are_its_own_boxes_and_score_one(tmp_path, write_workload, small_detectors):
    _frames(tmp_path / "frames", 8)
    model = _checkpointed_detector(tmp_path, 1)
    dataset = {"kind": "image_folder", "path": "frames", "labels": "distill"}
    w = load_workload(write_workload([_checkpoint_entry("d", dataset)], input_size=[3, 64, 64]))
    data = load_model_data(w, w.model("d"))
    assert data.task == "detection" and all(t["boxes"].shape == (0, 4) for t in data.train.dataset.targets)
    raw = _outputs(model, data)
    # A threshold between two scores, under the validation images' best and above most scores,
    # so that images keep a few boxes or none.
    scores = sorted({s for outs in raw for o in outs for s in o["scores"].tolist()})
    best_val = max(float(o["scores"].max()) for o in raw[1])
    cut = min(len(scores) - 3, max(i for i, s in enumerate(scores) if s <= best_val))
    threshold = (scores[cut - 1] + scores[cut]) / 2
    # The detector as the workload builds it (from the checkpoint), as prepare_merge does.
    unmerged = build_model(w, w.model("d"), materialize=True).module
    out = distill(unmerged, data, CPU, score_threshold=threshold)
    assert out.task == "detection" and out.num_classes == 4
    kept = _assert_distilled(out, raw, threshold)
    assert 0 < kept < sum(len(o["scores"]) for outs in raw for o in outs)
    # It scores 1.0 on its own boxes, as retraining measures it (mAP@0.5).
    assert evaluate(unmerged, out.val, CPU, task="detection") == pytest.approx(1.0)
    default = distill(unmerged, data, CPU)
    assert _assert_distilled(default, raw, 0.5) == sum(int((o["scores"] >= 0.5).sum()) for outs in raw for o in outs)


def _scenes_as_coco(tmp_path, count: int, seed: int):
    """`count` 64x64 scenes of the project's synthetic detect task, written as PNGs and a COCO file."""
    scenes = DetectionScenes(count, seed, (3, 64, 64))
    folder = tmp_path / f"coco{seed}"
    (folder / "images").mkdir(parents=True)
    images, anns = [], []
    for i, (x, t) in enumerate(scenes):
        pixels = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        for (x1, y1, x2, y2), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(SHAPES)]
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return {"kind": "coco", "images": f"{folder.name}/images", "annotations": f"{folder.name}/instances.json"}


def test_a_coco_detector_and_a_distilled_one_merge_and_retrain_jointly(tmp_path, write_workload, small_detectors,
                                                                      monkeypatch):
    from gemel_studio.merging import pipeline

    _frames(tmp_path / "frames", 6)
    model = _checkpointed_detector(tmp_path, 2)
    dataset = _scenes_as_coco(tmp_path, 6, 1)
    seen = []  # what prepare_merge hands distill, and what it gets back

    def spy(module, data, device, **kwargs):
        out = pipeline_distill(module, data, device, **kwargs)
        seen.append((data, kwargs, out))
        return out

    pipeline_distill = pipeline.distill
    monkeypatch.setattr(pipeline, "distill", spy)
    w = load_workload(write_workload([
        det("boxes", dataset, target={"relative": 0.5}),
        _checkpoint_entry("frames", {"kind": "image_folder", "path": "frames", "labels": "distill",
                                     "score_threshold": 0.3}, target={"relative": 0.5})], input_size=[3, 64, 64]))
    truth = load_model_data(w, w.model("boxes"))
    scenes = DetectionScenes(6, 1, (3, 64, 64))  # the boxes the COCO file was written from
    for target, (_, scene) in zip(truth.train.dataset.targets, scenes):
        assert torch.allclose(target["boxes"], scene["boxes"]) and torch.equal(target["labels"], scene["labels"])
    plan = propose_plan(w, analyze_workload(w))
    plan.retraining = plan.retraining.model_copy(update=FAST)
    # One group and one epoch: one round, then the report (the merge may miss its targets). Not a
    # time budget: on a busy machine the budget could run out before the first round.
    largest = max(plan.groups, key=lambda g: g.savings_bytes)
    plan.groups = [g.model_copy(update={"state": GroupState.accepted if g is largest else GroupState.rejected})
                   for g in plan.groups]
    report = merge_workload(w, plan, tmp_path / "merged", strategy="bisect")
    assert set(report["models"]) == {"boxes", "frames"} and report["rounds"] >= 1
    for row in report["models"].values():
        assert row["metric"] == "mAP@0.5" and 0.0 <= row["merged_accuracy"] <= 1.0
    assert report["models"]["frames"]["labels"] == "distill"
    assert report["models"]["frames"]["unmerged_accuracy"] == pytest.approx(1.0)
    # The workload's score_threshold reached distill, whose targets are the detector's own boxes.
    (data, kwargs, out), = seen
    assert kwargs == {"score_threshold": 0.3} and _assert_distilled(out, _outputs(model, data), 0.3) > 0
    again = load_workload(tmp_path / "merged" / "workload.yaml")
    assert again.resolve(again.model("boxes").dataset.annotations) == (tmp_path / "coco1" / "instances.json").resolve()


def test_finetune_on_coco_writes_a_workload_that_still_finds_the_files(tmp_path, write_workload, small_detectors):
    w = load_workload(write_workload([det("d", _scenes_as_coco(tmp_path, 5, 2))], input_size=[3, 64, 64]))
    out = tmp_path / "out"
    summary = finetune_workload(w, out, RetrainSettings(**FAST))
    assert summary["d"]["metric"] == "mAP@0.5" and summary["d"]["epochs"] == 1
    again = load_workload(out / "workload.yaml")
    ds = again.model("d").dataset
    assert again.resolve(ds.images) == (tmp_path / "coco2" / "images").resolve()
    assert again.resolve(ds.annotations) == (tmp_path / "coco2" / "instances.json").resolve()
    assert len(load_model_data(again, again.model("d")).train.dataset) == 5
