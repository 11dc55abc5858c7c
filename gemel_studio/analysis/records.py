"""What an inventory is made of: per-tensor and per-layer records and a model's inventory.

Plain data shared by every inventory builder (torch modules in inventory.py, ONNX graphs in
onnx_inventory.py) and by what reads inventories (groups.py, views, reports).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


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


def peak_activation_bytes(calls: list[int], input_bytes: int) -> int | None:
    """The model's peak estimate: the largest input + output pair of consecutive layer calls
    (the model's input before the first); None when no call was measured."""
    if not calls:
        return None
    seq = [input_bytes, *calls]
    return max(a + b for a, b in zip(seq, seq[1:]))
