"""Building candidate models from a workload's sources (Qt-free).

`build_model` returns a `BuiltModel`: a torch module (on the meta device where possible, so
analysis allocates no weight memory) or, for ONNX files, the checked ONNX graph.
"""

from .build import BuiltModel, build_model
from .zoo import check_architecture, known_architectures

__all__ = ["BuiltModel", "build_model", "check_architecture", "known_architectures"]
