"""Turn one workload entry into a model: torchvision by name, a checkpoint, TorchScript, ONNX."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..workload import CheckpointSource, ModelSpec, OnnxSource, TorchScriptSource, TorchvisionSource, Workload
from . import checkpoints, zoo


@dataclass
class BuiltModel:
    spec: ModelSpec
    module: torch.nn.Module | None  # None for ONNX
    onnx_model: object | None = None  # onnx.ModelProto for ONNX sources
    built_on: str = "meta"  # where the module was constructed: 'meta' or 'cpu'
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


def _check_task(spec: ModelSpec, architecture: str) -> None:
    actual = zoo.task_of(architecture)
    if actual != spec.task:
        raise ModelLoadError(
            f"model '{spec.name}': {architecture} is a {actual} architecture but the workload says "
            f"task: {spec.task}; fix the task or the architecture"
        )


def _hub_file(architecture: str, weight_name: str) -> Path:
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(architecture)
        weights = enum[weight_name] if weight_name != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        names = ", ".join(getattr(get_model_weights(architecture), "__members__", {}))
        raise ModelLoadError(
            f"{architecture}: no torchvision weights named '{weight_name}' (known: {names or 'none'})"
        ) from None
    filename = weights.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.exists():
        raise ModelLoadError(
            f"{architecture}: weights {weight_name} are not in the torch hub cache ({path}); "
            "copy the file there from a connected machine, or name a local file as weights"
        )
    return path


def _weights_path(workload: Workload, source: TorchvisionSource | CheckpointSource) -> tuple[Path | None, bool]:
    """The weights file to load, and whether it is a pretrained file whose head may differ."""
    if isinstance(source, CheckpointSource):
        return workload.resolve(source.path), False
    if source.weights is None:
        return None, False
    w = source.weights
    if "/" in w or w.endswith((".pt", ".pth", ".safetensors")):
        return workload.resolve(w), True
    return _hub_file(source.architecture, w), True


def _apply_dtypes(module: torch.nn.Module, specs: dict[str, checkpoints.TensorSpec], skip: set[str]) -> None:
    """On meta, give each parameter and buffer the dtype it has in the file (bytes follow it)."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        spec = specs.get(name)
        if spec is None or name in skip or spec.dtype == tensor.dtype:
            continue
        tensor.data = tensor.data.to(spec.dtype)


def _build_torchvision(workload: Workload, spec: ModelSpec, materialize: bool) -> BuiltModel:
    source = spec.source
    _check_task(spec, source.architecture)
    device = "cpu" if materialize else "meta"
    module, built_on = zoo.construct(source.architecture, spec.num_classes, device)
    built = BuiltModel(spec, module, built_on=built_on)
    if built_on == "cpu" and device == "meta":
        built.notes.append("built on the CPU: this constructor computes with tensors while it builds")
    path, pretrained = _weights_path(workload, source)
    if path is None:
        return built
    origin = f"model '{spec.name}': {path}"
    specs = checkpoints.read_tensor_specs(path)
    skip = checkpoints.check_fits(specs, module, origin, allow_head_mismatch=pretrained)
    if skip:
        built.notes.append(f"{len(skip)} tensor(s) of the pretrained head not loaded (other class count): "
                           + ", ".join(sorted(skip)))
    if materialize:
        if pretrained:
            checkpoints.verify_hub_hash(path)
        state = {k: v for k, v in checkpoints.read_state_dict(path).items() if k not in skip}
        state = {k.removeprefix("module."): v for k, v in state.items()}
        for key, value in module.state_dict().items():  # counters an older checkpoint lacks keep their default
            if key.endswith(checkpoints.NUM_BATCHES_TRACKED):
                state.setdefault(key, value)
        module.load_state_dict(state, strict=not skip)
    else:
        _apply_dtypes(module, specs, skip)
    return built


def _build_torchscript(workload: Workload, spec: ModelSpec) -> BuiltModel:
    path = workload.resolve(spec.source.path)
    checkpoints._check_exists(path)
    try:
        # torch warns that TorchScript is deprecated on every load: noise in front of the figures
        # of a format people still deploy (the README says so once).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(\.|$)")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch.jit raises RuntimeError and others for bad archives
        raise ModelLoadError(f"model '{spec.name}': {path}: not a readable TorchScript file "
                             f"({checkpoints._first_line(exc)})") from None
    return BuiltModel(spec, module, built_on="cpu",
                      notes=["TorchScript is loaded on the CPU; per-layer activation bytes are not measured"])


def _onnx_tensors(graph):
    """Every tensor a graph stores: initializers (dense and sparse) and node attributes
    (Constant values), subgraphs included."""
    import onnx

    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _onnx_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _onnx_tensors(sub)


def _check_external_data(spec: ModelSpec, path: Path, model) -> None:
    """Weights saved as external data live in files named relative to the .onnx file (only
    their names are checked here: the analysis reads sizes from dims, never the data)."""
    import onnx

    for tensor in _onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location or not (path.parent / location).is_file():
            raise ModelLoadError(
                f"model '{spec.name}': {path}: its weights are in an external data file, {location or '(unnamed)'}, "
                f"which is missing from {path.parent}; keep the .data file next to the .onnx file under that name")


def _build_onnx(workload: Workload, spec: ModelSpec) -> BuiltModel:
    import onnx

    path = workload.resolve(spec.source.path)
    checkpoints._check_exists(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelLoadError(f"model '{spec.name}': {path}: not a readable ONNX file "
                             f"({checkpoints._first_line(exc)}); export it again or check the path") from None
    _check_external_data(spec, path, model)
    try:
        # Given the path, the checker finds external data next to the file (given the proto,
        # it would look in the current folder).
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"model '{spec.name}': {path}: fails the ONNX checker: "
                             f"{checkpoints._first_line(exc)}") from None
    return BuiltModel(spec, None, onnx_model=model, built_on="onnx")


def build_model(workload: Workload, spec: ModelSpec, materialize: bool = False) -> BuiltModel:
    """Build one model of a workload.

    materialize=False: structure only, on the meta device where possible; weight files are
    checked (names, shapes, dtypes) but their data are not read.
    materialize=True: real weights on the CPU, ready to run or train.
    """
    source = spec.source
    if isinstance(source, (TorchvisionSource, CheckpointSource)):
        return _build_torchvision(workload, spec, materialize)
    if isinstance(source, TorchScriptSource):
        return _build_torchscript(workload, spec)
    if isinstance(source, OnnxSource):
        return _build_onnx(workload, spec)
    raise ModelLoadError(f"model '{spec.name}': unsupported source kind {source.kind}")
