"""Confirm that an OpenVINO model keeps every quantized weight compressed: an integer Constant.

OpenVINO's ONNX frontend turns ``DequantizeLinear(integer weight, scale[, zero point]) -> MatMul`` into its
weight-decompression subgraph ``Constant(i4/u4/i8/u8) -> Convert(f32) [-> Subtract(zero point)] ->
Multiply(scale) [-> Reshape] -> MatMul``, which its plugins run as a compressed-weight FullyConnected. Had a
version folded the subgraph into one float Constant, the IR would hold float weights (8x the file of int4,
and no longer the QDIR's integers). For each layer :func:`compressed_weight_types` walks up from the tensor the
exporter named ``<layer>.weight_dq`` (OpenVINO keeps ONNX tensor names) to the Constants it is computed from.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from onnx import ModelProto

from exporters.onnx.weights import WEIGHT_SUFFIX
from exporters.openvino.package import openvino_version
from turboboa.arch import role_of
from turboboa.errors import UserError

# the node types of a decompression subgraph between the weight Constant and the MatMul
DECOMPRESSION_OPS = frozenset({"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze",
                               "Broadcast"})


def quantized_weights(onnx_model: ModelProto) -> dict[str, int]:
    """``{"<layer>.weight_dq": element count}`` for every quantized weight of the ONNX export (the output of a
    DequantizeLinear whose integer input is an initializer)."""
    sizes = {t.name: math.prod(t.dims) for t in onnx_model.graph.initializer}
    return {n.output[0]: sizes[n.input[0]] for n in onnx_model.graph.node
            if n.op_type == "DequantizeLinear" and n.output[0].endswith(WEIGHT_SUFFIX) and n.input[0] in sizes}


def tensor_sources(ov_model: Any) -> dict[str, Any]:
    """Every named tensor of the ``ov.Model``: name -> the ``ov.Output`` that computes it."""
    found: dict[str, Any] = {}
    for op in ov_model.get_ordered_ops():
        for out in op.outputs():
            for name in out.get_names():
                found[name] = out
    return found


def upstream_constants(output: Any, layer: str) -> Iterator[Any]:
    """The Constant nodes the tensor ``output`` is computed from, through decompression ops only; a
    :class:`UserError` when the path meets anything else (the weight would not be a constant subgraph)."""
    stack, seen = [output.get_node()], set()
    while stack:
        node = stack.pop()
        if node.get_name() in seen:
            continue
        seen.add(node.get_name())
        kind = node.get_type_name()
        if kind == "Constant":
            yield node
        elif kind in DECOMPRESSION_OPS:
            stack.extend(i.get_source_output().get_node() for i in node.inputs())
        else:
            raise UserError(f"OpenVINO rewrote the weight of {layer} into a {kind} node, not a weight-"
                            f"decompression subgraph; the IR cannot be checked: export with --to onnx instead")


def checkpoint_weights(ckpt: Any) -> dict[str, int]:
    """``{"<layer>.weight_dq": element count}`` of every quantized linear layer of the QDIR ``ckpt`` (what
    its exported graphs dequantize; the embedding is stored as a table, not a DequantizeLinear weight)."""
    return {f"{name}{WEIGHT_SUFFIX}": q.codes.numel() for name, q in ckpt.layers.items()
            if role_of(name) != "embedding"}


def compressed_weight_types(ov_model: Any, weights: ModelProto | dict[str, int]) -> dict[str, str]:
    """``{layer: "i4"}``: the integer element type each quantized layer's weight keeps in ``ov_model`` (the
    ``ov.Model`` converted from the ONNX model ``weights``, or the weights' sizes by tensor name,
    :func:`checkpoint_weights`). A layer whose weight is missing, or is stored (also) as a
    float Constant of the weight's size, or whose Constants hold no integer tensor of the weight's size, is a
    one-line :class:`UserError`."""
    sources = tensor_sources(ov_model)
    types: dict[str, str] = {}
    fix = f"OpenVINO {openvino_version()} did not keep the weights compressed; export with --to onnx instead"
    sizes = weights if isinstance(weights, dict) else quantized_weights(weights)
    for name, size in sizes.items():
        layer = name[: -len(WEIGHT_SUFFIX)]
        if name not in sources:
            raise UserError(f"the OpenVINO model has no tensor {name} (the weight of {layer}); {fix}")
        integer, dense_float = [], []
        for const in upstream_constants(sources[name], layer):
            etype = const.output(0).get_element_type()
            count = math.prod(const.output(0).get_shape())
            if etype.is_integral_number() and etype.bitwidth <= 8 and count == size:
                integer.append(etype.to_string())
            elif etype.is_real() and count >= size:
                dense_float.append(etype.to_string())
        if dense_float or len(integer) != 1:
            found = ", ".join(dense_float) or "no integer constant of its size"
            raise UserError(f"{layer}'s weight in the OpenVINO model is {found}, not one integer constant; {fix}")
        types[layer] = integer[0]
    return types
