"""Reading a model as the chain of layers the compiled step can run.

torch.fx traces the model's forward into a graph; the compiled step takes it
when the graph is one straight chain of Conv2d (stride 1, square kernel, zero
padding), ReLU, 2x2 max-pooling, flatten and Linear, ending in the logits.
Anything else gets a reason, which the run logs before it falls back to the
eager step.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV, RELU, POOL, FLAT, LINEAR = 1, 2, 3, 4, 5
SPEC_VERSION = 2  # fused_step.cpp reads this version only


@dataclass
class Layer:
    kind: int
    module: nn.Module | None = None  # Conv2d / Linear, whose parameters the step trains


class Unsupported(Exception):
    """The model is outside what the compiled step runs; the message says why."""


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _check_conv(m: nn.Conv2d) -> None:
    if _pair(m.stride) != (1, 1) or _pair(m.dilation) != (1, 1) or m.groups != 1:
        raise Unsupported(f"{m} has a stride, dilation or groups (only plain stride-1 convolutions are compiled)")
    if isinstance(m.padding, str) or m.padding_mode != "zeros" or len(set(_pair(m.padding))) != 1:
        raise Unsupported(f"{m} has padding the compiled step does not do (equal zero padding only)")
    if len(set(_pair(m.kernel_size))) != 1:
        raise Unsupported(f"{m} has a non-square kernel")


def _check_pool(kernel, stride, padding=0, dilation=1, ceil_mode=False, return_indices=False) -> None:
    stride = kernel if stride is None or stride == [] or stride == () else stride
    if _pair(kernel) != (2, 2) or _pair(stride) != (2, 2) or _pair(padding) != (0, 0) or _pair(dilation) != (1, 1) \
            or ceil_mode or return_indices:
        raise Unsupported("a max-pooling other than MaxPool2d(2) is not compiled")


def _classify(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> Layer:
    if node.op == "call_module":
        m = graph_module.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            _check_conv(m)
            return Layer(CONV, m)
        if isinstance(m, nn.Linear):
            return Layer(LINEAR, m)
        if isinstance(m, nn.ReLU):
            return Layer(RELU)
        if isinstance(m, nn.MaxPool2d):
            _check_pool(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
            return Layer(POOL)
        if isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                raise Unsupported(f"{m} does not flatten from dimension 1")
            return Layer(FLAT)
        raise Unsupported(f"it has a {type(m).__name__} layer (compiled: Conv2d, ReLU, MaxPool2d(2), flatten, Linear)")
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.nn.functional.relu):
            return Layer(RELU)
        if node.target in (F.max_pool2d, torch.max_pool2d):
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            given = {**dict(zip(names, node.args[1:])), **{k: v for k, v in node.kwargs.items() if k in names}}
            _check_pool(given.get("kernel_size"), given.get("stride"), given.get("padding", 0),
                        given.get("dilation", 1), given.get("ceil_mode", False), given.get("return_indices", False))
            return Layer(POOL)
        if node.target is torch.flatten and (list(node.args[1:]) + list(node.kwargs.values()) in ([1], [1, -1])):
            return Layer(FLAT)
        name = getattr(node.target, "__name__", str(node.target))
        raise Unsupported(f"its forward calls {name} (compiled: relu, max_pool2d(2), flatten, Conv2d, Linear)")
    if node.op == "call_method":
        if node.target == "relu" and len(node.args) == 1:
            return Layer(RELU)
        if node.target == "flatten" and list(node.args[1:]) in ([1], [1, -1]):
            return Layer(FLAT)
        if node.target in ("view", "reshape") and len(node.args) == 3 and node.args[1] == -1 \
                and isinstance(node.args[2], int):
            return Layer(FLAT)  # x.view(-1, features); the shape check below confirms it flattens
        raise Unsupported(f"its forward calls .{node.target}()")
    raise Unsupported(f"its forward uses {node.op} {node.target}")


def chain(model: nn.Module) -> list[Layer]:
    """The model's layers in order, or Unsupported with the reason."""
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure just means "not compiled"
        raise Unsupported(f"its forward cannot be traced ({str(err).splitlines()[0]})") from None
    layers, previous = [], None
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                raise Unsupported("its forward takes more than one input")
            previous = node
            continue
        if node.op == "output":
            if node.args[0] is not previous:
                raise Unsupported("its forward does not return the last layer's output")
            break
        if node.op == "call_function" and node.target is operator.getitem:
            raise Unsupported("its forward indexes a tensor")
        if not node.args or node.args[0] is not previous or len(previous.users) != 1:
            raise Unsupported("its layers do not form one straight chain")
        layers.append(_classify(graph_module, node))
        previous = node
    return layers


def check_shapes(layers: list[Layer], input_shape: tuple, num_classes: int) -> None:
    """Follow one image's shape through the chain, as the compiled step will."""
    shape = tuple(input_shape)  # (C, H, W), later (features,)
    for layer in layers:
        if layer.kind == CONV:
            m = layer.module
            if len(shape) != 3 or shape[0] != m.in_channels:
                raise Unsupported(f"{m} receives shape {shape}")
            k, p = _pair(m.kernel_size)[0], _pair(m.padding)[0]
            shape = (m.out_channels, shape[1] + 2 * p - k + 1, shape[2] + 2 * p - k + 1)
            if min(shape[1:]) < 1:
                raise Unsupported(f"{m} gets an image smaller than its kernel")
        elif layer.kind == POOL:
            if len(shape) != 3 or min(shape[1:]) < 2:
                raise Unsupported(f"a max-pooling receives shape {shape}")
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
        elif layer.kind == FLAT:
            shape = (int(torch.tensor(shape).prod()),)
        elif layer.kind == LINEAR:
            if len(shape) != 1 or shape[0] != layer.module.in_features:
                raise Unsupported(f"{layer.module} receives shape {shape}")
            shape = (layer.module.out_features,)
    if shape != (num_classes,):
        raise Unsupported(f"the chain ends in shape {shape}, not ({num_classes},) logits")


def spec(layers: list[Layer], input_shape: tuple, batch_size: int, flat_params: torch.Tensor) -> list[int]:
    """The int32 description fused_step.cpp reads: a header, then 8 ints per
    layer; parameters are given as offsets into the flat parameter buffer."""
    def offset(p: torch.Tensor | None) -> int:
        if p is None:
            return -1
        start = (p.data_ptr() - flat_params.data_ptr()) // flat_params.element_size()
        if not (0 <= start < flat_params.numel()) or not p.is_contiguous():
            raise Unsupported("its parameters are not inside the optimiser's flat buffer")
        return int(start)

    out = [SPEC_VERSION, len(layers), batch_size, *input_shape]
    for layer in layers:
        m = layer.module
        if layer.kind == CONV:
            row = [CONV, m.in_channels, m.out_channels, _pair(m.kernel_size)[0], _pair(m.padding)[0],
                   offset(m.weight), offset(m.bias)]
        elif layer.kind == LINEAR:
            row = [LINEAR, m.in_features, m.out_features, offset(m.weight), offset(m.bias)]
        else:
            row = [layer.kind]
        out += row + [0] * (8 - len(row))
    return out
