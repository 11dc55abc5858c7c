"""Per-layer inventory of a torch module: one record per parameterised layer with what it costs.

This module is the one source of truth for a torch layer's bytes: parameter and buffer bytes
follow each tensor's real dtype; output activation bytes come from one forward pass on the
meta device (shapes only, no memory) at the workload's input size and batch size. The record
types are in records.py; `inventory_from_built` hands ONNX models to onnx_inventory.py.
"""

from __future__ import annotations

import math

import torch

from ..models import BuiltModel
from ..workload import Workload
from .records import LayerRecord, ModelInventory, TensorInfo, peak_activation_bytes
from .signature import dtype_name, module_kind, module_signature

__all__ = ["LayerRecord", "ModelInventory", "TensorInfo", "inventory_from_built", "inventory_of_module",
           "tensor_nbytes"]


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

    def first_seen(named) -> list[TensorInfo]:
        out = []
        for tname, t in named:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(TensorInfo(tname, tuple(t.shape), dtype_name(t.dtype), tensor_nbytes(t)))
        return out

    for name in order + missing:
        m = by_name[name]
        params, buffers = first_seen(m.named_parameters(recurse=False)), first_seen(m.named_buffers(recurse=False))
        records.append(LayerRecord(
            name=name, kind=module_kind(m), signature=module_signature(m),
            param_bytes=sum(t.nbytes for t in params), buffer_bytes=sum(t.nbytes for t in buffers),
            activation_bytes=activation.get(name), trainable=any(p.requires_grad for p in m.parameters(recurse=False)),
            executed=name in activation, params=tuple(params), buffers=tuple(buffers)))
    return records, calls, notes


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
        activation_bytes=peak_activation_bytes(calls, input_bytes), built_on=built_on, notes=notes)


def inventory_from_built(built: BuiltModel, workload: Workload) -> ModelInventory:
    spec = built.spec
    size = tuple(workload.input_size_of(spec))
    if built.onnx_model is None:
        inv = inventory_of_module(built.module, spec.name, architecture=spec.architecture, task=spec.task,
                                  input_size=size, batch_size=workload.batch_size,
                                  source_kind=spec.source.kind, built_on=built.built_on)
        inv.notes = built.notes + inv.notes
        return inv
    from .onnx_inventory import inventory_of_onnx  # onnx is imported for ONNX models only

    return inventory_of_onnx(built.onnx_model, spec.name, architecture=spec.architecture, task=spec.task,
                             input_size=size, batch_size=workload.batch_size, source_kind=spec.source.kind,
                             built_on=built.built_on, notes=built.notes)
