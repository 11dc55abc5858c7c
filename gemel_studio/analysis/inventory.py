"""Per-layer inventory: one record per parameterised layer with what it costs in memory.

This module is the one source of truth for a layer's bytes: parameter and buffer bytes
follow each tensor's real dtype; output activation bytes come from one forward pass on the
meta device (shapes only, no memory) at the workload's input size and batch size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..models import BuiltModel
from ..workload import Workload
from .signature import dtype_name, module_kind, module_signature


@dataclass(frozen=True)
class TensorInfo:
    name: str  # the tensor's name inside its layer: 'weight', 'bias', 'running_mean'
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass
class LayerRecord:
    name: str  # qualified name in the model, e.g. 'layer1.0.conv1'
    kind: str  # e.g. 'Conv2d'
    signature: str
    param_bytes: int
    buffer_bytes: int
    activation_bytes: int | None  # output bytes at the workload's input size; None if not measured
    trainable: bool
    executed: bool  # ran in the forward pass used to measure activations
    params: tuple[TensorInfo, ...] = ()
    buffers: tuple[TensorInfo, ...] = ()

    @property
    def shareable(self) -> bool:
        """Only weights are shared; each model keeps its own buffers (batch-norm statistics)."""
        return self.param_bytes > 0


@dataclass
class ModelInventory:
    name: str
    architecture: str
    task: str
    source_kind: str
    input_size: tuple[int, int, int]
    batch_size: int
    layers: list[LayerRecord]
    param_bytes: int
    buffer_bytes: int
    activation_bytes: int | None  # peak estimate: largest input+output pair of consecutive layers
    built_on: str
    notes: list[str] = field(default_factory=list)

    @property
    def param_count(self) -> int:
        return sum(math.prod(t.shape) for layer in self.layers for t in layer.params)

    def layer(self, name: str) -> LayerRecord:
        for record in self.layers:
            if record.name == name:
                return record
        raise KeyError(name)

    def to_dict(self) -> dict:
        data = asdict(self)
        for layer in data["layers"]:
            for key in ("params", "buffers"):
                layer[key] = [{"name": t["name"], "shape": list(t["shape"]), "dtype": t["dtype"],
                               "nbytes": t["nbytes"]} for t in layer[key]]
        return data


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _output_bytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return tensor_nbytes(out)
    if isinstance(out, (list, tuple)):
        return sum(_output_bytes(o) for o in out)
    if isinstance(out, dict):
        return sum(_output_bytes(o) for o in out.values())
    return 0


def _example_input(task: str, batch: int, size: tuple[int, int, int], dtype: torch.dtype, device: str):
    if task == "detection":
        return [torch.zeros(size, dtype=dtype, device=device) for _ in range(batch)]
    return torch.zeros((batch, *size), dtype=dtype, device=device)


def _rcnn_box_head_fallback(module: torch.nn.Module, batch: int) -> None:
    """Faster/Mask R-CNN stop on meta after the RPN (NMS has data-dependent shapes); run the box
    head alone on the worst case the model is configured for (post-NMS proposals per image)."""
    roi_heads = getattr(module, "roi_heads", None)
    rpn = getattr(module, "rpn", None)
    backbone = getattr(module, "backbone", None)
    if roi_heads is None or rpn is None or backbone is None:
        return
    proposals = rpn.post_nms_top_n() * batch
    pool = roi_heads.box_roi_pool
    size = pool.output_size if isinstance(pool.output_size, (tuple, list)) else (pool.output_size,) * 2
    dtype = next(module.parameters()).dtype
    x = torch.zeros((proposals, backbone.out_channels, *size), dtype=dtype, device="meta")
    with torch.no_grad():
        roi_heads.box_predictor(roi_heads.box_head(x))


def _torch_layers(module: torch.nn.Module, task: str, input_size: tuple[int, int, int], batch: int,
                  measure: bool) -> tuple[list[LayerRecord], list[int], list[str]]:
    """Records in execution order, the per-call output bytes in call order, and notes.

    With `measure`, one forward pass records which layers run, in what order, and the bytes
    of their outputs: on meta tensors when the module is on meta (no memory, no compute),
    else for real on the module's device.
    """
    notes: list[str] = []
    layered = [(n, m) for n, m in module.named_modules()
               if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))]
    activation: dict[str, int] = {}
    order: list[str] = []
    calls: list[int] = []
    if measure:
        handles = []

        def make_hook(name: str):
            def hook(_mod, _inp, out):
                b = _output_bytes(out)
                if name not in activation:
                    order.append(name)
                    activation[name] = 0
                activation[name] += b
                calls.append(b)
            return hook

        for name, m in layered:
            handles.append(m.register_forward_hook(make_hook(name)))
        was_training = module.training
        module.eval()
        first = next(module.parameters(), None)
        dtype = first.dtype if first is not None else torch.float32
        device = first.device if first is not None else torch.device("meta")
        x = _example_input(task, batch, input_size, dtype, device)
        try:
            with torch.no_grad():
                module(x)
        except NotImplementedError:
            # Detection post-processing (NMS) has no meta implementation; the layers that ran
            # before it are measured. R-CNN box heads run after NMS: measure them directly.
            _rcnn_box_head_fallback(module, batch)
        except Exception as exc:  # torchvision's input checks raise AssertionError, models anything
            # A partial pass gives no honest figures: no layer keeps an activation or a place in
            # the execution order, so all of them are listed alike, in definition order.
            calls.clear()
            activation.clear()
            order.clear()
            notes.append(f"forward pass at input {list(input_size)} failed, activations not "
                         f"measured: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}")
        finally:
            for h in handles:
                h.remove()
            module.train(was_training)
    missing = [n for n, _ in layered if n not in activation]
    if missing and activation:
        notes.append(f"{len(missing)} layer(s) did not run in inference and have no activation figure "
                     f"(first: {missing[0]})")
    by_name = dict(layered)
    records: list[LayerRecord] = []
    seen: set[int] = set()  # a tensor tied inside one model is counted at its first layer only
    for name in order + missing:
        m = by_name[name]
        params, buffers = [], []
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            params.append(TensorInfo(pname, tuple(p.shape), dtype_name(p.dtype), tensor_nbytes(p)))
        for bname, b in m.named_buffers(recurse=False):
            if id(b) in seen:
                continue
            seen.add(id(b))
            buffers.append(TensorInfo(bname, tuple(b.shape), dtype_name(b.dtype), tensor_nbytes(b)))
        records.append(LayerRecord(
            name=name, kind=module_kind(m), signature=module_signature(m),
            param_bytes=sum(t.nbytes for t in params), buffer_bytes=sum(t.nbytes for t in buffers),
            activation_bytes=activation.get(name), trainable=any(p.requires_grad for p in m.parameters(recurse=False)),
            executed=name in activation, params=tuple(params), buffers=tuple(buffers)))
    return records, calls, notes


def _peak(calls: list[int], input_bytes: int) -> int | None:
    if not calls:
        return None
    seq = [input_bytes, *calls]
    return max(a + b for a, b in zip(seq, seq[1:]))


def inventory_of_module(module: torch.nn.Module, name: str, *, architecture: str = "", task: str = "classification",
                        input_size: tuple[int, int, int] = (3, 224, 224), batch_size: int = 1,
                        source_kind: str = "module", built_on: str = "meta") -> ModelInventory:
    """Inventory of any torch module. Activations come from one forward pass, free on meta and
    computed for real elsewhere; TorchScript modules (no hooks) keep definition order."""
    first = next(module.parameters(), None)
    measure = not isinstance(module, torch.jit.ScriptModule)
    records, calls, notes = _torch_layers(module, task, tuple(input_size), batch_size, measure)
    dtype_size = first.element_size() if first is not None else 4
    input_bytes = batch_size * math.prod(input_size) * dtype_size
    return ModelInventory(
        name=name, architecture=architecture or type(module).__name__, task=task, source_kind=source_kind,
        input_size=tuple(input_size), batch_size=batch_size, layers=records,
        param_bytes=sum(tensor_nbytes(p) for p in module.parameters()),
        buffer_bytes=sum(tensor_nbytes(b) for b in module.buffers()),
        activation_bytes=_peak(calls, input_bytes), built_on=built_on, notes=notes)


def inventory_from_built(built: BuiltModel, workload: Workload) -> ModelInventory:
    spec = built.spec
    size = tuple(workload.input_size_of(spec))
    if built.onnx_model is None:
        inv = inventory_of_module(built.module, spec.name, architecture=spec.architecture, task=spec.task,
                                  input_size=size, batch_size=workload.batch_size,
                                  source_kind=spec.source.kind, built_on=built.built_on)
        inv.notes = built.notes + inv.notes
        return inv
    from .onnx_inventory import onnx_layers

    records, calls, notes, param_bytes, buffer_bytes = onnx_layers(built.onnx_model, workload.batch_size, size)
    input_bytes = workload.batch_size * math.prod(size) * 4
    return ModelInventory(
        name=spec.name, architecture=spec.architecture, task=spec.task, source_kind=spec.source.kind,
        input_size=size, batch_size=workload.batch_size, layers=records, param_bytes=param_bytes,
        buffer_bytes=buffer_bytes, activation_bytes=_peak(calls, input_bytes), built_on=built.built_on,
        notes=built.notes + notes)
