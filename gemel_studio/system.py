"""What this machine has: library versions and NVIDIA GPUs. The one NVML reader of the project,
used by `gemel info`, the studio's status bar and the runtime's memory figures.

NVML is initialised once per process and its device handles kept, since previews and metrics
ask several times a second; a box without NVML (no driver, another vendor, no pynvml) gets no
GPU figures rather than an error.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
from importlib import metadata

from . import __version__

_nvml_handles: dict[int, object] = {}
_nvml_ready: bool | None = None  # None: not tried yet; False: NVML is not available here
_nvml_lock = threading.Lock()


def _nvml():
    """The pynvml module, initialised once; None where NVML cannot be used."""
    global _nvml_ready
    try:
        import pynvml
    except ImportError:
        return None
    with _nvml_lock:
        if _nvml_ready is None:
            try:
                pynvml.nvmlInit()
                _nvml_ready = True
            except Exception:  # pynvml.NVMLError and its subclasses; a broken driver too
                _nvml_ready = False
    return pynvml if _nvml_ready else None


def _handle(pynvml, index: int):
    with _nvml_lock:
        if index not in _nvml_handles:
            _nvml_handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
        return _nvml_handles[index]


def gpu_memory(index: int) -> dict:
    """The device's used and total memory in bytes (`device_used_bytes`, `device_total_bytes`);
    empty where NVML cannot say."""
    pynvml = _nvml()
    if pynvml is None:
        return {}
    try:
        mem = pynvml.nvmlDeviceGetMemoryInfo(_handle(pynvml, index))
        return {"device_used_bytes": int(mem.used), "device_total_bytes": int(mem.total)}
    except Exception:  # a device that went away, a permission error: the figures are absent
        return {}


def gpu_process_memory(index: int, pid: int | None = None) -> int | None:
    """This process's GPU memory on device `index` as NVML counts it (through
    the NVML handle `gpu_memory` uses); None where NVML is missing or does not list the
    process (a container's PID namespace hides it)."""
    pynvml = _nvml()
    if pynvml is None:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(_handle(pynvml, index))
    except Exception:  # noqa: BLE001 (an old driver, a permission error: the figure is absent)
        return None
    for p in procs:
        if p.pid == pid and isinstance(p.usedGpuMemory, int):
            return int(p.usedGpuMemory)
    return None


def gpu_info() -> list[dict]:
    """NVIDIA GPUs: index, name, total and used memory. Empty when there is none."""
    pynvml = _nvml()
    if pynvml is None:
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = _handle(pynvml, i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_total": int(mem.total), "memory_used": int(mem.used)})
    except Exception:
        return out
    return out


def versions() -> dict:
    """The versions of the stack, the compute device and the GPUs, as `gemel info` prints them."""
    import onnx
    import torch
    import torchvision

    info = {"gemel_studio": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    # Read from package metadata: the core must not import Qt (it may be absent on an edge box).
    info["pyside6"] = info["qt"] = None
    for dist in ("PySide6-Essentials", "PySide6"):
        try:
            info["pyside6"] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    qtcore = sys.modules.get("PySide6.QtCore")
    # PySide6 wheels bundle the Qt of their own version; the running Qt says so when loaded.
    info["qt"] = qtcore.qVersion() if qtcore is not None else info["pyside6"]
    info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    info["gpus"] = gpu_info()
    return info
