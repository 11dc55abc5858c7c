"""Streams of still images: a folder of images, or an image sequence pattern (`%04d.png`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gemel_studio.errors import GemelError
from gemel_studio.runtime.sources import ImageFilesSource, parse_source, sequence_files


def _save(path, value: int, size=(6, 8)):
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def _values(source) -> list[int]:
    return [round(float(f[0, 0, 0]) * 255) for _, f in source.frames()]


def test_a_sequence_pattern_plays_its_files_in_number_order(tmp_path):
    for i, v in [(1, 10), (2, 20), (10, 100)]:
        _save(tmp_path / f"f{i}.png", v)
    _save(tmp_path / "other.png", 7)  # not of the sequence
    assert [p.name for p in sequence_files(str(tmp_path / "f%d.png"))] == ["f1.png", "f2.png", "f10.png"]
    source = parse_source(str(tmp_path / "f%d.png"))
    source.realtime = False
    assert _values(source) == [10, 20, 100]
    assert source.end_reason == "ended"


def test_a_zero_padded_pattern_matches_only_its_width(tmp_path):
    _save(tmp_path / "0001.png", 1)
    _save(tmp_path / "0002.png", 2)
    _save(tmp_path / "3.png", 3)
    assert [p.name for p in sequence_files(str(tmp_path / "%04d.png"))] == ["0001.png", "0002.png"]


def test_a_folder_of_images_plays_sorted_and_loops(tmp_path):
    for name, v in [("b.png", 2), ("a.jpg", 1), ("c.bmp", 3)]:
        _save(tmp_path / name, v * 50)
    (tmp_path / "notes.txt").write_text("not an image")
    source = parse_source(str(tmp_path), loop=True)
    source.realtime = False
    got = []
    for _, frame in source.frames():
        got.append(round(float(frame[0, 0, 0]) * 255))
        if len(got) == 7:
            source.stop()
    assert [abs(v - w) <= 3 for v, w in zip(got, [50, 100, 150] * 3)] == [True] * 7  # jpeg is lossy
    assert got[0] < got[1] < got[2]


def test_frames_are_rgb_chw_in_unit_range(tmp_path):
    Image.fromarray(np.array([[[255, 0, 0]]], np.uint8)).save(tmp_path / "red.png")
    frame = next(ImageFilesSource.from_folder(tmp_path, realtime=False).frames())[1]
    assert frame.shape == (3, 1, 1) and frame.dtype == torch.float32
    assert frame[:, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_a_damaged_image_ends_the_stream_naming_the_file(tmp_path):
    _save(tmp_path / "0000.png", 9)
    (tmp_path / "0001.png").write_bytes(b"\x89PNG not really")
    source = ImageFilesSource.from_pattern(str(tmp_path / "%04d.png"), realtime=False)
    assert len(list(source.frames())) == 1
    assert source.end_reason.startswith("unreadable:") and "0001.png" in source.end_reason


def test_an_empty_folder_ends_at_once_with_a_reason(tmp_path):
    source = parse_source(str(tmp_path))
    assert list(source.frames()) == []
    assert source.end_reason.startswith("unreadable: no images")


@pytest.mark.parametrize("pattern, expected", [
    ("missing/%04d.png", "no files match this image sequence"),
    ("f%d_%d.png", "names its frame number once"),
])
def test_bad_sequences_are_one_line(tmp_path, pattern, expected):
    with pytest.raises(GemelError) as err:
        parse_source(str(tmp_path / pattern))
    assert expected in str(err.value) and "\n" not in str(err.value)
