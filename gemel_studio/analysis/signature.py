"""Layer signatures: one canonical string that decides whether two layers are interchangeable.

Two layers with the same signature can hold one copy of their weights. The signature has
the kind, every hyperparameter that decides the weights' shapes or what the layer computes
with them (stride, padding, attention heads), the bias flag and the dtype; torch modules
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


def mha_signature(embed_dim: int, num_heads, kdim: int, vdim: int, batch_first, bias: bool, bias_kv: bool,
                  zero_attn, dtype: str) -> str:
    return (f"MultiheadAttention(e={embed_dim},heads={num_heads},k={kdim},v={vdim},batch_first={batch_first},"
            f"bias={bias},bias_kv={bias_kv},zero_attn={zero_attn},{dtype})")


def module_kind(module: torch.nn.Module) -> str:
    """The class name; TorchScript modules keep the original one in `original_name`."""
    return getattr(module, "original_name", None) or type(module).__name__


# --- TorchScript ---------------------------------------------------------------------------
# A traced module keeps none of its Python attributes (in_channels, stride, eps...): they were
# constants of the call it recorded. They are read back from its graph, else from the weight
# shapes, else the constructor's defaults.

_NOT_CONSTANT = object()


def _constant(value):
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        items = tuple(_constant(v) for v in node.inputs())
        return _NOT_CONSTANT if any(i is _NOT_CONSTANT for i in items) else items
    return _NOT_CONSTANT


def _graph_calls(module: torch.nn.Module) -> dict[str, list]:
    """Operator name -> constant arguments (_NOT_CONSTANT for tensors) of the first call to it in
    a TorchScript module's own forward; empty for eager modules or when there is no graph."""
    if not isinstance(module, torch.jit.ScriptModule):
        return {}
    try:
        nodes = list(module.graph.nodes())
    except Exception:  # a module without a forward has no graph
        return {}
    calls: dict[str, list] = {}
    for node in nodes:
        if node.kind().startswith("aten::") and node.kind() not in calls:
            try:
                calls[node.kind()] = [_constant(v) for v in node.inputs()]
            except Exception:
                continue
    return calls


def _attr(module: torch.nn.Module, name: str, default):
    value = getattr(module, name, None)
    return default if value is None else value


def _conv_hyperparameters(module: torch.nn.Module, weight: torch.Tensor) -> dict:
    spatial = weight.dim() - 2
    hp = {"stride": (1,) * spatial, "padding": (0,) * spatial, "dilation": (1,) * spatial, "groups": 1,
          "output_padding": (0,) * spatial, "padding_mode": "zeros"}
    calls = _graph_calls(module)
    if "aten::_convolution" in calls:  # (x, w, b, stride, padding, dilation, transposed, output_padding, groups, ...)
        args = calls["aten::_convolution"]
        hp.update(stride=args[3], padding=args[4], dilation=args[5], output_padding=args[7], groups=args[8])
    elif "aten::_convolution_mode" in calls:  # (x, w, b, stride, padding: str, dilation, groups)
        args = calls["aten::_convolution_mode"]
        hp.update(stride=args[3], padding=args[4], dilation=args[5], groups=args[6])
    pad = calls.get("aten::pad")  # (x, pad, mode, value): padding_mode other than zeros
    if pad and pad[2] in ("reflect", "replicate", "circular") and isinstance(pad[1], tuple):
        hp.update(padding_mode=pad[2], padding=tuple(pad[1][0::2][::-1]))
    hp = {k: (None if v is _NOT_CONSTANT else v) for k, v in hp.items()}
    for name in hp:
        hp[name] = _attr(module, name, hp[name])
    return hp


def _conv(module: torch.nn.Module, kind: str, weight: torch.Tensor, bias: bool, dtype: str) -> str:
    hp = _conv_hyperparameters(module, weight)
    groups = hp["groups"] or 1
    transposed = "Transpose" in kind
    in_ch = _attr(module, "in_channels", weight.shape[0] if transposed else weight.shape[1] * groups)
    out_ch = _attr(module, "out_channels", weight.shape[1] * groups if transposed else weight.shape[0])
    return conv_signature(kind, in_ch, out_ch, _attr(module, "kernel_size", tuple(weight.shape[2:])), hp["stride"],
                          hp["padding"], hp["dilation"], hp["groups"], bias, dtype, hp["padding_mode"],
                          hp["output_padding"] if transposed else None)


def _batchnorm(module: torch.nn.Module, kind: str, params: dict, dtype: str) -> str | None:
    stats = dict(module.named_buffers(recurse=False))
    sized = params.get("weight") if params.get("weight") is not None else stats.get("running_mean")
    if sized is None and getattr(module, "num_features", None) is None:
        return None
    call = _graph_calls(module).get("aten::batch_norm")  # (x, w, b, mean, var, training, momentum, eps, ...)
    eps = call[7] if call and isinstance(call[7], float) else 1e-5
    return batchnorm_signature("BatchNorm2d" if kind == "SyncBatchNorm" else kind,
                               _attr(module, "num_features", sized.shape[0] if sized is not None else 0),
                               _attr(module, "eps", eps), _attr(module, "affine", params.get("weight") is not None),
                               dtype)


def _mha(module: torch.nn.Module, params: dict, dtype: str) -> str:
    if params.get("in_proj_weight") is not None:  # q, k and v of one size, packed
        embed = kdim = vdim = params["in_proj_weight"].shape[1]
    else:
        embed = params["q_proj_weight"].shape[1]
        kdim, vdim = params["k_proj_weight"].shape[1], params["v_proj_weight"].shape[1]
    return mha_signature(_attr(module, "embed_dim", embed), getattr(module, "num_heads", None),
                         _attr(module, "kdim", kdim), _attr(module, "vdim", vdim),
                         getattr(module, "batch_first", None), params.get("in_proj_bias") is not None,
                         params.get("bias_k") is not None, getattr(module, "add_zero_attn", None), dtype)


def module_signature(module: torch.nn.Module) -> str:
    kind = module_kind(module)
    params = dict(module.named_parameters(recurse=False))
    first = next(iter(params.values()), None)
    if first is None:
        first = next(iter(module.buffers(recurse=False)), None)
    dtype = dtype_name(first.dtype) if first is not None else "none"
    bias = params.get("bias") is not None
    weight = params.get("weight")
    if kind in _CONV and weight is not None and weight.dim() >= 3:
        return _conv(module, kind, weight, bias, dtype)
    if kind == "Linear" and weight is not None and weight.dim() == 2:
        return linear_signature(_attr(module, "in_features", weight.shape[1]),
                                _attr(module, "out_features", weight.shape[0]), bias, dtype)
    if kind in _BATCHNORM and (signature := _batchnorm(module, kind, params, dtype)) is not None:
        return signature
    if kind == "MultiheadAttention" and ("in_proj_weight" in params or "q_proj_weight" in params):
        return _mha(module, params, dtype)
    # Anything else: its own description plus the shapes of what it holds.
    shapes = ";".join(f"{n}:{_tuple(tuple(t.shape))}" for n, t in
                      list(params.items()) + list(module.named_buffers(recurse=False)))
    try:
        extra = module.extra_repr()
    except Exception:  # TorchScript modules may not carry it
        extra = ""
    return f"{kind}({extra}|{shapes},{dtype})"
