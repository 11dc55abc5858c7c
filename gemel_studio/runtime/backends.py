"""The backends a model runs on: torch (the bundle's modules over the scheduler's resident
tensors) and onnxruntime (the bundle's ONNX graphs, sessions over the same tensors).

Neither keeps weights of its own: what is resident is what the scheduler holds, so the memory
budget holds whichever backend runs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.func import functional_call

from ..errors import GemelError
from ..preprocessing import ImagePreprocessing
from .options import BACKENDS


def prepare_input(frame: torch.Tensor, prep: ImagePreprocessing, device: torch.device) -> torch.Tensor:
    """A CHW [0, 1] frame as a 1xCxHxW batch, through the model's own preprocessing (the
    bundle manifest's: resize and centre crop or a straight resize, then mean and std)."""
    return prep.apply(frame.to(device, non_blocking=True)).unsqueeze(0)


class TorchRunner:
    """The torch backend: a bundle module run over a state dict of resident tensors
    (`functional_call`: the module's own parameters are never read or changed)."""

    def __init__(self, bundle):
        self.bundle = bundle

    def run(self, name: str, state: dict[str, torch.Tensor], x: torch.Tensor):
        with torch.inference_mode():
            return functional_call(self.bundle.models[name], state, (x,), strict=False)


class OrtRunner:
    """The onnxruntime backend: one session per model over the scheduler's resident tensors
    (no copy of its own), made when the model runs and dropped as soon as any of its tensors
    is evicted, so the memory budget holds for onnxruntime too. Making a session
    is part of loading the model and is counted in its load time. CPU only: the onnxruntime
    wheel this project installs has no CUDA provider. A detector's graph (batch of one) gives
    its outputs as torchvision does: a list with one dict of boxes, scores and labels."""

    def __init__(self, bundle, scheduler, names: list[str], threads: int | None = None):
        if scheduler.device.type != "cpu":
            raise GemelError(f"the onnxruntime backend runs on the CPU only (asked for {scheduler.device}); "
                             "use --device cpu, or --backend torch on a GPU")
        missing = [n for n in names if bundle.manifest.model(n).onnx is None]
        if missing:
            raise GemelError(f"model(s) {', '.join(missing)} have no ONNX graph in the bundle (the export notes "
                             "say why; bundles from before detectors had graphs lack them: export again); "
                             "use --backend torch")
        self.bundle = bundle
        self.scheduler = scheduler
        self.threads = threads  # a session's intra-op threads (None: onnxruntime's own, one per core)
        self.sessions: dict[str, object] = {}
        self.sessions_made = {n: 0 for n in names}
        self._io: dict[str, tuple[str, list[str], bool]] = {}
        for n in names:
            spec = bundle.manifest.model(n)
            detector = spec.task == "detection"
            if detector and not spec.onnx_outputs:
                raise GemelError(f"model '{n}': the manifest names no detection outputs (onnx_outputs) for its "
                                 "graph; export the bundle again, or use --backend torch")
            self._io[n] = (spec.onnx_input, list(spec.onnx_outputs) if detector else [spec.onnx_output], detector)
        scheduler.on_evict.append(lambda name: self.sessions.pop(name, None))

    def prepare(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Make the model's session over `state` unless it still has one."""
        if name not in self.sessions:
            start = time.perf_counter()
            self.sessions[name] = self.bundle.session_over(name, state, threads=self.threads)
            spent = time.perf_counter() - start
            self.scheduler.stats[name].load_seconds += spent
            self.scheduler.stats[name].load_wait_seconds += spent  # nothing runs meanwhile
            self.sessions_made[name] += 1

    def run(self, name: str, x: torch.Tensor) -> np.ndarray | list[dict[str, torch.Tensor]]:
        inp, outs, detector = self._io[name]
        values = self.sessions[name].run(outs, {inp: x.contiguous().numpy()})
        if detector:
            return [{k: torch.from_numpy(v) for k, v in zip(outs, values)}]
        return values[0]


__all__ = ["BACKENDS", "OrtRunner", "TorchRunner", "prepare_input"]
