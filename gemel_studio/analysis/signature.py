"""Layer signatures: one canonical string that decides whether two layers are interchangeable.

Two layers with the same signature can hold one copy of their weights. The signature has
the kind, every shape-deciding hyperparameter, the bias flag and the dtype; torch modules
(eager or TorchScript) and ONNX nodes map to the same strings so that they can be compared.
"""

from __future__ import annotations

import torch

_CONV = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
_BATCHNORM = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tuple(value) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)


def conv_signature(kind: str, in_ch: int, out_ch: int, kernel, stride, padding, dilation, groups: int,
                   bias: bool, dtype: str, padding_mode: str = "zeros", output_padding=None) -> str:
    extra = f",pm={padding_mode}" if padding_mode != "zeros" else ""
    if output_padding is not None and any(output_padding):
        extra += f",op={_tuple(output_padding)}"
    return (f"{kind}(in={in_ch},out={out_ch},k={_tuple(kernel)},s={_tuple(stride)},p={_tuple(padding)},"
            f"d={_tuple(dilation)},g={groups},bias={bias}{extra},{dtype})")


def linear_signature(in_f: int, out_f: int, bias: bool, dtype: str) -> str:
    return f"Linear(in={in_f},out={out_f},bias={bias},{dtype})"


def batchnorm_signature(kind: str, n: int, eps: float, affine: bool, dtype: str) -> str:
    return f"{kind}(n={n},eps={eps:g},affine={affine},{dtype})"


def module_kind(module: torch.nn.Module) -> str:
    """The class name; TorchScript modules keep the original one in `original_name`."""
    return getattr(module, "original_name", None) or type(module).__name__


def module_signature(module: torch.nn.Module) -> str:
    kind = module_kind(module)
    params = dict(module.named_parameters(recurse=False))
    first = next(iter(params.values()), None)
    if first is None:
        first = next(iter(module.buffers(recurse=False)), None)
    dtype = dtype_name(first.dtype) if first is not None else "none"
    bias = params.get("bias") is not None
    if kind in _CONV:
        return conv_signature(kind, module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.dilation, module.groups, bias, dtype,
                              getattr(module, "padding_mode", "zeros"),
                              getattr(module, "output_padding", None) if "Transpose" in kind else None)
    if kind == "Linear":
        return linear_signature(module.in_features, module.out_features, bias, dtype)
    if kind in _BATCHNORM:
        return batchnorm_signature("BatchNorm2d" if kind == "SyncBatchNorm" else kind, module.num_features,
                                   module.eps, module.affine, dtype)
    # Anything else: its own description plus the shapes of what it holds.
    shapes = ";".join(f"{n}:{_tuple(tuple(t.shape))}" for n, t in
                      list(params.items()) + list(module.named_buffers(recurse=False)))
    try:
        extra = module.extra_repr()
    except Exception:  # TorchScript modules may not carry it
        extra = ""
    return f"{kind}({extra}|{shapes},{dtype})"
