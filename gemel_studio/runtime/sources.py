"""Frame sources for the edge runtime: synthetic frames, video files (OpenCV), image folders,
image sequences (`frames/%04d.png`, as OpenCV names them) and cameras.

A source yields `(timestamp, frame)` pairs at its own frame rate in real time: `timestamp` is
the `time.monotonic()` at which the frame arrived, `frame` a float32 CHW tensor in [0, 1] (RGB).
A source never raises out of `frames()`: a truncated or unreadable video, or a camera that
disappears, ends that source and leaves the reason in `end_reason`, so the other streams of a
run go on. `stop()` (from any thread) ends it at once, even while it waits for the next frame.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..errors import GemelError

Frame = tuple[float, torch.Tensor]


class FrameSource:
    """Base of every source: pacing, stopping and the end reason. Subclasses implement
    `_open()` (returns an error text or None) and `_read()` (next frame, or None at the end)."""

    name = "source"

    def __init__(self, fps: float, realtime: bool = True):
        if not (fps > 0 and math.isfinite(fps)):
            raise GemelError(f"{self.name}: frame rate {fps!r} must be a positive number")
        self.fps = float(fps)
        self.realtime = realtime
        self.end_reason: str | None = None  # set once the source has ended: why
        self.frames_read = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _open(self) -> str | None:
        return None

    def _read(self) -> torch.Tensor | None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def frames(self) -> Iterator[Frame]:
        """Frames in real time (or as fast as they decode with `realtime=False`) until the source
        ends or is stopped; `end_reason` says which."""
        try:
            problem = self._open()
            if problem:
                self.end_reason = problem
                return
            start = time.monotonic()
            while not self._stop.is_set():
                due = start + self.frames_read / self.fps
                if self.realtime and self._stop.wait(max(0.0, due - time.monotonic())):
                    break
                try:
                    frame = self._read()
                except Exception as exc:  # a decoder error ends this source, never the run
                    self.end_reason = f"read error: {exc}"
                    return
                if frame is None:
                    self.end_reason = self.end_reason or "ended"
                    return
                self.frames_read += 1
                yield time.monotonic(), frame
            self.end_reason = self.end_reason or "stopped"
        finally:
            self._close()


class SyntheticSource(FrameSource):
    """Generated frames (a bright square moving over seeded noise): no files, no camera."""

    def __init__(self, fps: float = 30.0, size: tuple[int, int] = (64, 64), seed: int = 0,
                 frames: int | None = None, realtime: bool = True):
        self.name = f"synthetic:{fps:g}"
        super().__init__(fps, realtime)
        self.size = (int(size[0]), int(size[1]))
        self.limit = frames
        self._gen = torch.Generator().manual_seed(seed)
        self._background = torch.rand(3, *self.size, generator=self._gen) * 0.5

    def _read(self) -> torch.Tensor | None:
        if self.limit is not None and self.frames_read >= self.limit:
            return None
        h, w = self.size
        frame = self._background.clone()
        side = max(1, min(h, w) // 4)
        y = (self.frames_read * 2) % max(1, h - side)
        x = (self.frames_read * 3) % max(1, w - side)
        frame[:, y:y + side, x:x + side] = torch.rand(3, 1, 1, generator=self._gen) * 0.5 + 0.5
        return frame


def _to_tensor(bgr) -> torch.Tensor:
    """An OpenCV BGR (or grey) uint8 image as an RGB float CHW tensor in [0, 1]."""
    t = torch.from_numpy(bgr)
    if t.ndim == 2:
        t = t.unsqueeze(-1)
    else:
        t = t.flip(-1)  # BGR -> RGB
    return t.permute(2, 0, 1).float().div_(255.0).contiguous()


class VideoSource(FrameSource):
    """A video file decoded by OpenCV, at the file's own frame rate (30 when it does not say),
    or replayed at `fps` (a benchmark's streams all at 30 fps from a 10 fps recording).

    A file that cannot be opened ends the source as "unreadable"; one whose frames stop before
    the count its header announces ends as "truncated". With `loop`, a complete file starts
    over at its end."""

    def __init__(self, path: Path | str, loop: bool = False, realtime: bool = True, fps: float | None = None):
        import cv2

        rate = fps
        self.path = Path(path)
        self.name = str(self.path)
        self.loop = loop
        self._cap = cv2.VideoCapture(str(self.path)) if self.path.is_file() else None
        fps = self._cap.get(cv2.CAP_PROP_FPS) if self._cap is not None and self._cap.isOpened() else 0.0
        count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT) if self._cap is not None and self._cap.isOpened() else 0
        self.frame_count = int(count) if count and count > 0 else None
        self.file_fps = fps if fps and fps > 0 and math.isfinite(fps) else None
        super().__init__(self.file_fps or 30.0, realtime)
        if rate is not None:
            if not (rate > 0 and math.isfinite(rate)):
                raise GemelError(f"{self.path}: replay frame rate {rate!r} must be a positive number")
            self.fps = float(rate)
        self._in_pass = 0  # frames read since the file (re)started

    def _open(self) -> str | None:
        if not self.path.exists():
            return f"unreadable: {self.path} does not exist"
        if self._cap is None or not self._cap.isOpened():
            return f"unreadable: OpenCV cannot open {self.path} (damaged, or not a video)"
        return None

    def _read(self) -> torch.Tensor | None:
        import cv2

        ok, image = self._cap.read()
        if ok and image is not None:
            self._in_pass += 1
            return _to_tensor(image)
        if self.frame_count is not None and self._in_pass < self.frame_count:
            self.end_reason = (f"truncated: {self.path} stopped after {self._in_pass} of "
                               f"{self.frame_count} frames")
            return None
        if self._in_pass == 0:
            self.end_reason = f"unreadable: no frame could be decoded from {self.path}"
            return None
        if self.loop and self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            self._in_pass = 0
            return self._read()
        self.end_reason = "ended"
        return None

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_PRINTF_INT = re.compile(r"%(0?)(\d*)d")


def sequence_files(pattern: str) -> list[Path]:
    """The files an image-sequence pattern names, in frame order: `frames/%04d.png` matches
    frames/0000.png, frames/0001.png, ... (any start index; sorted by the number)."""
    path = Path(pattern)
    match = _PRINTF_INT.search(path.name)
    if match is None or len(_PRINTF_INT.findall(path.name)) != 1 or "%" in str(path.parent):
        raise GemelError(f"stream '{pattern}': an image sequence names its frame number once, in the file "
                         "name, as %d or %04d (e.g. frames/%04d.png)")
    digits = rf"\d{{{int(match.group(2))}}}" if match.group(1) and match.group(2) else r"\d+"
    regex = re.compile(re.escape(path.name[:match.start()]) + f"({digits})" + re.escape(path.name[match.end():]) + "$")
    folder = path.parent
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := regex.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


class ImageFilesSource(FrameSource):
    """Still images as frames, in order, at `fps` (30 by default): every image in a folder
    (sorted by name) or the files of a sequence pattern. An image that cannot be decoded ends
    the source as "unreadable", naming the file. With `loop`, the sequence starts over."""

    def __init__(self, files: list[Path], name: str, fps: float = 30.0, loop: bool = False,
                 realtime: bool = True):
        self.name = name
        self.files = list(files)
        self.loop = loop
        super().__init__(fps, realtime)
        self._next = 0

    @classmethod
    def from_folder(cls, folder: Path | str, **kwargs) -> "ImageFilesSource":
        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return cls(files, str(folder), **kwargs)

    @classmethod
    def from_pattern(cls, pattern: str, **kwargs) -> "ImageFilesSource":
        return cls(sequence_files(pattern), pattern, **kwargs)

    def _open(self) -> str | None:
        if not self.files:
            return f"unreadable: no images ({', '.join(IMAGE_SUFFIXES)}) in {self.name}"
        return None

    def _read(self) -> torch.Tensor | None:
        import cv2

        if self._next >= len(self.files):
            if not self.loop:
                return None
            self._next = 0
        path = self.files[self._next]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            self.end_reason = f"unreadable: OpenCV cannot decode {path} (damaged, or not an image)"
            return None
        self._next += 1
        return _to_tensor(image)


class CameraSource(FrameSource):
    """A camera by index (cv2.VideoCapture(N)); a camera that cannot be opened or stops giving
    frames ends the source as "gone"."""

    def __init__(self, index: int, fps: float | None = None, realtime: bool = True):
        self.index = int(index)
        self.name = f"camera:{self.index}"
        self._cap = None
        super().__init__(fps or 30.0, realtime)
        self._fps_given = fps is not None

    def _open(self) -> str | None:
        import cv2

        self._cap = cv2.VideoCapture(self.index)
        if not self._cap.isOpened():
            return f"gone: camera {self.index} cannot be opened"
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        if not self._fps_given and fps and fps > 0 and math.isfinite(fps):
            self.fps = float(fps)
        return None

    def _read(self) -> torch.Tensor | None:
        ok, image = self._cap.read()
        if not ok or image is None:
            self.end_reason = f"gone: camera {self.index} stopped giving frames after {self.frames_read}"
            return None
        return _to_tensor(image)

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()


def parse_source(spec: str, size: tuple[int, int] = (64, 64), seed: int = 0, loop: bool = False) -> FrameSource:
    """A source from its command-line form: `synthetic[:FPS]`, `camera:N`, a video file, a folder
    of images, or an image sequence pattern such as `frames/%04d.png`."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        rate = spec.partition(":")[2] or "30"
        try:
            fps = float(rate)
        except ValueError:
            raise GemelError(f"stream '{spec}': '{rate}' is not a frame rate; write e.g. synthetic:30") from None
        return SyntheticSource(fps, size=size, seed=seed)
    if spec.startswith("camera:"):
        index = spec.partition(":")[2]
        if not index.isdigit():
            raise GemelError(f"stream '{spec}': '{index}' is not a camera index; write e.g. camera:0")
        return CameraSource(int(index))
    path = Path(spec)
    if path.is_dir():
        return ImageFilesSource.from_folder(path, loop=loop)
    if not path.exists() and _PRINTF_INT.search(path.name):
        source = ImageFilesSource.from_pattern(spec, loop=loop)
        if not source.files:
            raise GemelError(f"stream '{spec}': no files match this image sequence; check the folder and the "
                             "number's width (%04d matches 0000.png)")
        return source
    if not path.is_file():
        raise GemelError(f"stream '{spec}': no such video file, image folder or image sequence (or write "
                         "synthetic[:FPS] or camera:N)")
    return VideoSource(path, loop=loop)


@dataclass(frozen=True)
class StreamSpec:
    """One stream of a run as `--stream SOURCE[=MODEL,...]` names it: its source (see
    `parse_source`) and the models its frames go through (empty: every model of the bundle)."""

    source: str
    models: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, text: str) -> "StreamSpec":
        """`synthetic:30=color,size` -> StreamSpec('synthetic:30', ('color', 'size')); a
        one-line GemelError for what cannot be a stream."""
        source, eq, models = text.partition("=")
        if not source:
            raise GemelError(f"--stream '{text}': name a source: synthetic[:FPS], a video path or camera:N")
        names = tuple(m.strip() for m in models.split(",") if m.strip())
        if eq and not names:
            raise GemelError(f"--stream '{text}': no model names after '='; write SOURCE=MODEL[,MODEL...]")
        return cls(source, names)

    def __str__(self) -> str:
        return self.source + (f"={','.join(self.models)}" if self.models else "")

    def open(self, loop: bool = False, seed: int = 0, size: tuple[int, int] = (64, 64)) -> FrameSource:
        """A fresh frame source for it (a source runs once)."""
        return parse_source(self.source, size=size, seed=seed, loop=loop)

    def stream(self, loop: bool = False, seed: int = 0) -> tuple[FrameSource, list[str]]:
        """What the Engine takes for it: (a fresh source, the model names)."""
        return self.open(loop=loop, seed=seed), list(self.models)


__all__ = ["CameraSource", "Frame", "FrameSource", "ImageFilesSource", "StreamSpec", "SyntheticSource", "VideoSource",
           "parse_source", "sequence_files"]
