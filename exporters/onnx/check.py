"""The exported weights against the QDIR, evaluated by onnxruntime itself.

For every quantized layer the file's DequantizeLinear node is run alone (a one-node model holding its own
initializers, session level ``ORT_DISABLE_ALL`` so nothing is folded or fused) and its output ``[K, N]`` is
compared with ``QuantizedLinear.dequantize().T``; a quantized embedding (stored dequantized) is compared
as its float initializer. All differences zero means the file computes with exactly the QDIR's weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from turboboa.arch import role_of
from turboboa.checkpoint import QuantizedCheckpoint
from turboboa.errors import UserError

from .weights import WEIGHT_SUFFIX


def upstream(model: ModelProto, node: NodeProto) -> list[NodeProto]:
    """``node`` and every node it depends on (e.g. LPBQ's block-scale DequantizeLinear), in graph order."""
    producers = {out: n for n in model.graph.node for out in n.output}
    needed: dict[str, NodeProto] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n.name not in needed:
            needed[n.name] = n
            stack.extend(producers[i] for i in n.input if i in producers)
    return [n for n in model.graph.node if n.name in needed]


def node_model(model: ModelProto, node: NodeProto, initializers: dict[str, TensorProto]) -> ModelProto:
    """A model of ``node`` alone with the nodes and constant inputs it needs, same opset and IR version as
    ``model``."""
    nodes = upstream(model, node)
    names = [i for n in nodes for i in n.input if i in initializers]
    graph = helper.make_graph(nodes, "weight", [],
                              [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                              initializer=[initializers[name] for name in dict.fromkeys(names)])
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def run_alone(single: ModelProto) -> np.ndarray:
    """The only output of ``single`` computed by onnxruntime (CPU, no graph optimizations, one thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(single.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


def check_onnx_weights(path: str | os.PathLike[str], ckpt: QuantizedCheckpoint) -> dict[str, float]:
    """For every quantized layer of ``ckpt``: max |onnxruntime's DequantizeLinear output - fake-quant weight|
    (transposed back to HF layout). All zeros mean the file holds exactly the checkpoint's weights. A
    ``qnn-htp`` graph's embedding table is left out: that profile stores every tensor, the table included,
    per tensor at the activation width, so it is no copy of the QDIR's table (its effect is in the PPL)."""
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    dq = {node.output[0][: -len(WEIGHT_SUFFIX)]: node for node in model.graph.node
          if node.op_type == "DequantizeLinear" and node.output[0].endswith(WEIGHT_SUFFIX)}
    profile = {p.key: p.value for p in model.metadata_props}.get("turboboa.profile")
    out = {}
    for name, q in ckpt.layers.items():
        embedding = role_of(name) == "embedding"
        if embedding and name not in dq and profile == "qnn-htp":
            continue  # the profile re-encodes the table per tensor at the activation width (exporters.onnx.qnn)
        expected = q.dequantize().numpy()
        if name in dq:
            got = run_alone(node_model(model, dq[name], initializers)).T
        elif embedding and f"{name}.weight" in initializers:
            got = numpy_helper.to_array(initializers[f"{name}.weight"], base_dir=str(Path(path).parent))
        else:
            raise UserError(f"{path} has no DequantizeLinear for {name}; it was not exported from this QDIR")
        if got.shape != expected.shape:
            raise UserError(f"{path} holds {name} as {got.shape}, the QDIR as {expected.shape}; "
                            f"it was not exported from this QDIR")
        out[name] = float(np.abs(got.astype(np.float32) - expected).max()) if expected.size else 0.0
    return out
