"""``--localize``: where does an NPU backend's output leave the fake-quant model's? Block by block.

The ``qnn-htp`` graph quantizes every tensor at named points (:mod:`turboboa.activations.program`); the
residual stream after each block is the point ``<block i>.mlp_residual``, a DequantizeLinear output
of the graph. :func:`localize` adds those tensors (and the logits) as outputs of a copy of the ONNX model,
runs one window through it on the backend, runs the same window through the torch simulation recording the
same points, and reports per block

* ``rel_error = ||y_backend - y_sim||_2 / ||y_sim||_2`` over the window, and
* ``max_steps = max |y_backend - y_sim| / s``, in quantization steps ``s`` of that point's encoding,

so the report shows the block where the difference appears and how it grows.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from turboboa.arch import decoder_spec
from turboboa.arch.decoder import DecoderSpec
from turboboa.checkpoint import load_fakequant_model

RESIDUAL = "mlp_residual"


def block_points(spec: DecoderSpec) -> list[str]:
    """The residual stream's point after each block, then the logits' (the head's)."""
    return [f"{spec.block(i)}.{RESIDUAL}" for i in range(spec.layers)] + [spec.head]


def tensor_of_point(model: onnx.ModelProto, point: str, head: str) -> str:
    """The graph tensor holding ``point``'s dequantized value: the output of the first DequantizeLinear of an
    activation (not a constant) with the point's scale (later ones are movement ops re-quantizing it); the
    logits for the ``head``'s point."""
    if point == head:
        return "logits"
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[1] == f"{point}.scale" and node.input[0] not in constants:
            return node.output[0]
    raise ValueError(f"the graph has no tensor for {point}; it is not a --profile qnn-htp export")


def with_outputs(path: Path, points: list[str], folder: Path, head: str) -> Path:
    """A copy of the ONNX model ``path`` in ``folder`` whose outputs also include ``points``' tensors."""
    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    for point in points:
        name = tensor_of_point(model, point, head)
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    out = folder / path.name
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data", size_threshold=1024)
    return out


def simulated_points(sim: Any, window: torch.Tensor, points: list[str]) -> dict[str, np.ndarray]:
    """The torch simulation's values at ``points`` for ``window`` ``(L,)`` (``sim``: a
    :class:`~turboboa.activations.simulate.QuantizedGraphModel`)."""
    recorded: dict[str, np.ndarray] = {}
    ops = sim.ops
    original = ops.q

    def recording(x: torch.Tensor, point: str) -> torch.Tensor:
        y = original(x, point)
        if point in points:
            recorded[point] = y.detach().cpu().numpy()
        return y

    ops.q = recording
    try:
        sim(input_ids=window[None])
    finally:
        ops.q = original
    return recorded


def localize(onnx_path: Path, ckpt: Any, window: torch.Tensor,
             open_session: Callable[[Path], Any]) -> list[dict[str, Any]]:
    """Per block (and the logits), the backend's distance from the simulation on ``window`` (module
    docstring). ``open_session(path)`` opens the backend on an ONNX file and returns an object with
    ``run(output_names, feeds)``."""
    from transformers import AutoConfig

    spec = decoder_spec(AutoConfig.from_pretrained(ckpt.path))
    points = block_points(spec)
    sim = load_fakequant_model(ckpt)
    expected = simulated_points(sim, window, points)
    with tempfile.TemporaryDirectory(prefix="turboboa-localize-") as tmp:
        path = with_outputs(Path(onnx_path), points, Path(tmp), spec.head)
        model = onnx.load(str(path), load_external_data=False)
        names = [tensor_of_point(model, p, spec.head) for p in points]
        session = open_session(path)
        got = session.run(names, {"input_ids": window[None].numpy().astype(np.int64)})
        del session
    rows = []
    for point, value in zip(points, got, strict=True):
        ref = expected[point].reshape(value.shape)
        diff = np.abs(value.astype(np.float64) - ref)
        step = float(ckpt.activations.layers[point].scale)
        norm = float(np.linalg.norm(ref))
        rows.append({"point": point, "rel_error": float(np.linalg.norm(value - ref)) / norm if norm else 0.0,
                     "max_steps": float(diff.max()) / step, "mean_steps": float(diff.mean()) / step})
    return rows
