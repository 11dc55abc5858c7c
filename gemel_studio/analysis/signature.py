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
_INSTANCENORM = ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")
_RNN = ("LSTM", "GRU", "RNN")


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


def instancenorm_signature(kind: str, n: int, eps: float, affine: bool, dtype: str,
                           track_running_stats: bool = False) -> str:
    stats = ",stats=True" if track_running_stats else ""
    return f"{kind}(n={n},eps={eps:g},affine={affine}{stats},{dtype})"


def layernorm_signature(shape, eps: float, affine: bool, bias: bool, dtype: str) -> str:
    return f"LayerNorm(shape={_tuple(tuple(shape))},eps={eps:g},affine={affine},bias={bias},{dtype})"


def embedding_signature(num: int, dim: int, dtype: str, max_norm=None) -> str:
    # padding_idx only changes which row receives no gradient, so it is left out: an ONNX
    # Gather cannot express it, and the stored table is the same.
    extra = f",max_norm={max_norm:g}" if max_norm is not None else ""  # renormalises rows when run
    return f"Embedding(num={num},dim={dim}{extra},{dtype})"


def prelu_signature(n: int, dtype: str) -> str:
    return f"PReLU(n={n},{dtype})"


def rnn_signature(kind: str, input_size: int, hidden: int, bias: bool, bidirectional: bool, dtype: str,
                  extra: str = "") -> str:
    """One layer of an LSTM, GRU or RNN (an ONNX node is one layer; a torch module with
    num_layers=1 is its twin). `extra` carries what only one side can express."""
    return f"{kind}(in={input_size},hidden={hidden},bias={bias},bidirectional={bidirectional}{extra},{dtype})"


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


def _instancenorm(module: torch.nn.Module, kind: str, params: dict, dtype: str) -> str | None:
    stats = dict(module.named_buffers(recurse=False))
    sized = params.get("weight") if params.get("weight") is not None else stats.get("running_mean")
    if sized is None and getattr(module, "num_features", None) is None:
        return None
    # (x, w, b, mean, var, use_input_stats, momentum, eps, cudnn_enabled)
    call = _graph_calls(module).get("aten::instance_norm")
    eps = call[7] if call and isinstance(call[7], float) else 1e-5
    return instancenorm_signature(kind, _attr(module, "num_features", sized.shape[0] if sized is not None else 0),
                                  _attr(module, "eps", eps), _attr(module, "affine", params.get("weight") is not None),
                                  dtype, _attr(module, "track_running_stats", "running_mean" in stats))


def _layernorm(module: torch.nn.Module, params: dict, dtype: str) -> str | None:
    weight = params.get("weight")
    call = _graph_calls(module).get("aten::layer_norm")  # (x, normalized_shape, w, b, eps, cudnn_enable)
    shape = tuple(weight.shape) if weight is not None else (call[1] if call and isinstance(call[1], tuple) else None)
    shape = _attr(module, "normalized_shape", shape)
    if shape is None:
        return None
    eps = call[4] if call and isinstance(call[4], float) else 1e-5
    affine = _attr(module, "elementwise_affine", weight is not None)
    return layernorm_signature(shape, _attr(module, "eps", eps), affine, params.get("bias") is not None, dtype)


def _rnn(module: torch.nn.Module, kind: str, params: dict, dtype: str) -> str | None:
    """Single-layer recurrent modules only: one ONNX LSTM/GRU/RNN node is one layer."""
    w_ih, w_hh = params.get("weight_ih_l0"), params.get("weight_hh_l0")
    if w_ih is None or w_hh is None:
        return None
    layers = _attr(module, "num_layers", sum(1 for n in params if n.startswith("weight_ih_l") and "_reverse" not in n))
    if layers != 1 or getattr(module, "proj_size", 0) or "weight_hr_l0" in params:
        return None
    extra = ""
    if kind == "RNN":
        traced_relu = "aten::rnn_relu" in _graph_calls(module)
        extra = f",act={getattr(module, 'nonlinearity', 'relu' if traced_relu else 'tanh')}"
    return rnn_signature(kind, _attr(module, "input_size", w_ih.shape[1]), _attr(module, "hidden_size", w_hh.shape[1]),
                         _attr(module, "bias", "bias_ih_l0" in params),
                         _attr(module, "bidirectional", "weight_ih_l0_reverse" in params), dtype, extra)


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
    if kind in _INSTANCENORM and (signature := _instancenorm(module, kind, params, dtype)) is not None:
        return signature
    if kind == "LayerNorm" and (signature := _layernorm(module, params, dtype)) is not None:
        return signature
    if kind == "Embedding" and weight is not None and weight.dim() == 2:
        return embedding_signature(weight.shape[0], weight.shape[1], dtype, getattr(module, "max_norm", None))
    if kind == "PReLU" and weight is not None:
        return prelu_signature(weight.numel(), dtype)
    if kind in _RNN and (signature := _rnn(module, kind, params, dtype)) is not None:
        return signature
    # Anything else: its own description plus the shapes of what it holds.
    shapes = ";".join(f"{n}:{_tuple(tuple(t.shape))}" for n, t in
                      list(params.items()) + list(module.named_buffers(recurse=False)))
    try:
        extra = module.extra_repr()
    except Exception:  # TorchScript modules may not carry it
        extra = ""
    return f"{kind}({extra}|{shapes},{dtype})"
