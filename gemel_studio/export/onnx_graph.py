"""Each model's ONNX graph, with every stored tensor as external data in `weights.safetensors`.

Graphs are exported without constant folding and without initializer deduplication, so their
initializers are named by the model's state_dict keys; each one that is a stored tensor becomes
ONNX external data pointing into `weights.safetensors` (offset = 8 + header length + the
tensor's data offset), so no graph carries a copy of a shared weight. Initializers that are not
stored tensors stay inside the graph and are counted as unshared bytes.

Detectors (torchvision's SSD, RetinaNet, FCOS and R-CNN families) are exported whole, their
resizing and normalising transform and their postprocessing (top-k, score threshold, NMS)
included, for a batch of one image of the model's input size; the graph's outputs are the
detection dict's entries (boxes, scores, labels, ...), named in the manifest's `onnx_outputs`.
"""

from __future__ import annotations

import io
import mmap
import warnings
from pathlib import Path

import torch

from ..errors import GemelError
from ..runtime.bundle import BundleModel, safetensors_layout

OPSET = 17

_ONNX_TO_SAFETENSORS = {1: "F32", 2: "U8", 3: "I8", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL", 10: "F16",
                        11: "F64", 16: "BF16"}


def output_names(spec: BundleModel) -> list[str]:
    """The graph's output names: a detector's `onnx_outputs`, else the one `onnx_output`."""
    return list(spec.onnx_outputs) if spec.onnx_outputs else [spec.onnx_output]


def _trace_input(spec: BundleModel) -> torch.Tensor:
    if spec.task == "detection":
        # An image-like input: tracing runs the detector's postprocessing on real candidates.
        return torch.rand(1, *spec.input_size, generator=torch.Generator().manual_seed(0))
    return torch.zeros(1, *spec.input_size)


def detection_outputs(model: torch.nn.Module, spec: BundleModel) -> list[str]:
    """A torchvision detector's output names, in the order of its detection dict (which is the
    order of the traced graph's outputs): boxes, labels, scores for the R-CNN family, boxes,
    scores, labels for SSD, RetinaNet and FCOS, then masks or keypoints where it has them."""
    with torch.no_grad():
        out = model(_trace_input(spec))
    if not (isinstance(out, (list, tuple)) and len(out) == 1 and isinstance(out[0], dict)
            and {"boxes", "scores", "labels"} <= set(out[0])):
        raise GemelError(f"model '{spec.name}': a detector should return a list with one dict of boxes, scores "
                         f"and labels per image; {spec.architecture} returned {type(out).__name__}")
    return list(out[0])


def trace_graph(model: torch.nn.Module, spec: BundleModel):
    """The model's ONNX graph as the TorchScript exporter writes it (initializers embedded and
    named by their state_dict keys, not listed as graph inputs)."""
    import onnx

    buf = io.BytesIO()
    names = output_names(spec)
    # Classifiers take any batch size. A detector returns one dict per image: its graph is
    # traced, and runs, for a batch of one image of its input size.
    axes = (None if spec.onnx_outputs else {spec.onnx_input: {0: "batch"}, spec.onnx_output: {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        # keep_initializers_as_inputs=True skips the pass that merges equal-valued initializers
        # (fresh batch norms all hold ones and zeros) so every initializer keeps its state_dict
        # name; no constant folding, so batch norm is not folded into the convolutions.
        torch.onnx.export(model, (_trace_input(spec),), buf, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=True,
                          input_names=[spec.onnx_input], output_names=names, opset_version=OPSET,
                          dynamic_axes=axes)
    proto = onnx.load_from_string(buf.getvalue())
    init_names = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init_names]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    got = [o.name for o in proto.graph.output]
    if got != names:
        raise GemelError(f"model '{spec.name}': the exported graph's outputs are {got}, expected {names}")
    return proto


def export_onnx(model: torch.nn.Module, spec: BundleModel, weights: Path) -> tuple[bytes, int, int, int]:
    """The model's ONNX graph with every stored tensor as external data in `weights` (a file
    beside the graph). Returns (serialized graph, external initializers, bytes of stored tensors
    the graph had to keep a copy of, bytes of the graph's own constants)."""
    import onnx
    from onnx import numpy_helper

    proto = trace_graph(model, spec)
    start, header = safetensors_layout(weights)
    external, copied, constants = 0, 0, 0
    with open(weights, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for init in proto.graph.initializer:
            stored = spec.tensors.get(init.name)
            entry = header.get(stored) if stored else None
            raw = init.raw_data or numpy_helper.to_array(init).tobytes()
            if entry is None:
                constants += len(raw)  # not a model tensor: a constant the exporter made
                continue
            begin, end = entry["data_offsets"]
            if (_ONNX_TO_SAFETENSORS.get(init.data_type) != entry["dtype"] or list(init.dims) != list(entry["shape"])
                    or raw != data[start + begin:start + end]):
                # Not the stored tensor after all (the exporter changed it): the graph keeps a copy.
                copied += len(raw)
                continue
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", weights.name), ("offset", str(start + begin)), ("length", str(end - begin))):
                e = init.external_data.add()
                e.key, e.value = k, v
            external += 1
    return proto.SerializeToString(), external, copied, constants


__all__ = ["OPSET", "detection_outputs", "export_onnx", "output_names", "trace_graph"]
