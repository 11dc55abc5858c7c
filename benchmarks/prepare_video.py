"""Install the real video the runtime benchmark decodes, from the package registry, and print
where it is as one JSON object.

    .venv/bin/python benchmarks/prepare_video.py

The video is OpenCV's own sample `vtest.avi`: a real street recording of pedestrians
(768x576, 10 fps, 795 frames, Xvid), shipped by Debian's `opencv-doc` under
/usr/share/doc/opencv-doc/examples/data/. The package is installed with apt-get (with sudo
when not root) when the file is not there yet; nothing is fetched by hand. Idempotent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DEBIAN_PACKAGE = "opencv-doc"
VIDEO = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
SOURCE = ("OpenCV's sample video vtest.avi (a real street recording of pedestrians), from Debian's "
          f"{DEBIAN_PACKAGE}")


def install_video() -> str:
    """'present' or 'installed'; exits with a one-line message naming the fix on failure."""
    if VIDEO.is_file():
        return "present"
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (sudo + ["apt-get", "update", "-qq"],
                sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", DEBIAN_PACKAGE]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        except FileNotFoundError as exc:
            sys.exit(f"prepare_video: {exc.filename} not found; install Debian's {DEBIAN_PACKAGE} by hand "
                     "and run again")
        if proc.returncode != 0:
            sys.exit(f"prepare_video: '{' '.join(cmd)}' failed ({proc.stderr.strip()[-200:]}); "
                     f"install Debian's {DEBIAN_PACKAGE} by hand and run again")
    if not VIDEO.is_file():
        sys.exit(f"prepare_video: {DEBIAN_PACKAGE} is installed but {VIDEO} is missing; reinstall it "
                 f"(apt-get install --reinstall {DEBIAN_PACKAGE})")
    return "installed"


def describe(path: Path) -> dict:
    """Frame rate, frame count and size as OpenCV reads them (None where it cannot)."""
    try:
        import cv2
    except ImportError:
        return {}
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return {"opens": False}
        return {"opens": True, "fps": cap.get(cv2.CAP_PROP_FPS), "frames": int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
                "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))}
    finally:
        cap.release()


def main() -> None:
    state = install_video()
    print(json.dumps({"video": str(VIDEO), "state": state, "source": SOURCE, "package": DEBIAN_PACKAGE,
                      "bytes": VIDEO.stat().st_size, **describe(VIDEO)}))


if __name__ == "__main__":
    main()
