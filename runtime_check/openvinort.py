"""Run an OpenVINO IR (``.xml``) or a QDQ ONNX decoder (``.onnx``, read directly) in OpenVINO on the same token
windows as the other backends.

:func:`openvino_logits_fn` returns a ``logits_fn`` for :func:`turboboa.eval.perplexity.perplexity`. The
compile properties are pinned so that OpenVINO computes the exported model in float32 (:data:`PINNED`):

* ``INFERENCE_PRECISION_HINT = f32``: on CPUs with AVX512-BF16 or AMX the CPU plugin otherwise runs in bf16
  (about 1e-2 relative error in the logits);
* ``DYNAMIC_QUANTIZATION_GROUP_SIZE = 0``: the CPU plugin otherwise quantizes the activations of every
  compressed-weight MatMul to int8 in groups of 32 (again about 1e-2 relative, even with the f32 hint);
* ``EXECUTION_MODE_HINT = ACCURACY``, one stream, a fixed ``INFERENCE_NUM_THREADS``.

Pinned this way, OpenVINO's logits match onnxruntime's (:mod:`runtime_check.onnxrt`) on the same graph within
float32 rounding (tests/test_openvino.py). A property the device does not list is left out (``describe()``
reports what the compiled model uses). One limit stays: OpenVINO's low-precision transformations strip
16-bit activation QuantizeLinear -> DequantizeLinear pairs (65536-level FakeQuantize) on the CPU, so a model
exported with ``--act-bits 16`` runs (partly) without its activation quantization; ``describe()`` says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.openvino.metadata import read_rt_info
from exporters.openvino.package import import_openvino
from turboboa.errors import UserError

from .onnxrt import INPUT, MAX_POSITIONS_KEY, GraphWindows, validate_onnx

PINNED: dict[str, Any] = {
    "INFERENCE_PRECISION_HINT": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
    "EXECUTION_MODE_HINT": "ACCURACY",
    "NUM_STREAMS": 1,
}
THREADS = "INFERENCE_NUM_THREADS"
STRIPPED_LEVELS = 65536  # FakeQuantize levels OpenVINO's CPU plugin strips (16-bit activation QDQ)
OUTPUT = "logits"


def _text(value: Any) -> Any:
    """A compiled-model property as JSON-friendly text: element types as ``f32``, enums by name."""
    if hasattr(value, "to_string"):
        return value.to_string()
    if hasattr(value, "name") and not isinstance(value, (int, float, str, bool)):
        return value.name
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def read_ov_model(core: Any, path: Path) -> tuple[Any, dict[str, str]]:
    """The ``ov.Model`` of the ``.xml`` IR or ``.onnx`` file ``path`` and its ``turboboa.*`` metadata; a missing,
    incomplete or unreadable file is a one-line :class:`UserError`."""
    if not path.is_file():
        raise UserError(f"OpenVINO model not found: {path}")
    if path.suffix not in (".xml", ".onnx"):
        raise UserError(f"{path.name} is neither an OpenVINO IR (.xml) nor an ONNX model (.onnx); pass one of those")
    meta = validate_onnx(path) if path.suffix == ".onnx" else {}
    if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
        raise UserError(f"{path} has no weights file {path.with_suffix('.bin').name} beside it; copy it there or "
                        f"export again")
    try:
        model = core.read_model(str(path))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"OpenVINO cannot read {path} ({detail}); export it again with turboboa export") from None
    return model, meta or read_rt_info(model)


def compile_properties(core: Any, device: str, threads: int) -> dict[str, Any]:
    """:data:`PINNED` and the thread count, restricted to the properties ``device`` supports."""
    wanted = {**PINNED, THREADS: threads}
    supported = set(core.get_property(device, "SUPPORTED_PROPERTIES"))
    return {k: v for k, v in wanted.items() if k in supported}


def stripped_activation_quantizers(model: Any) -> int:
    """How many 16-bit activation quantizers (:data:`STRIPPED_LEVELS`-level FakeQuantize) ``model`` holds."""
    return sum(1 for op in model.get_ordered_ops()
               if op.get_type_name() == "FakeQuantize" and op.get_attributes().get("levels") == STRIPPED_LEVELS)


class OpenVinoLogits(GraphWindows):
    """A ``logits_fn``: input ids (1, L) -> OpenVINO's float32 logits (1, L, V) of every position.

    A graph with a static sequence length ``T`` takes windows of exactly ``T`` tokens; a dynamic one takes
    up to the model's RoPE table (``turboboa.max_positions``).
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None, device: str = "CPU") -> None:
        ov = import_openvino()
        self.path = Path(path)
        self.device = device
        self.threads = int(threads or max(1, os.cpu_count() or 1))
        core = ov.Core()
        available = list(core.available_devices)
        if device.split(".")[0] not in {d.split(".")[0] for d in available}:
            raise UserError(f"OpenVINO device {device!r} is not available here; choose one of {', '.join(available)}")
        model, self.metadata = read_ov_model(core, self.path)
        names = [i.get_any_name() for i in model.inputs]
        if names != [INPUT] or OUTPUT not in {n for o in model.outputs for n in o.get_names()}:
            raise UserError(f"{self.path} is not a turboboa decoder (its inputs are {names}, expected one "
                            f"{INPUT!r} and a {OUTPUT!r} output); export it with turboboa export")
        dim = model.inputs[0].get_partial_shape()
        self.static_seqlen: int | None = dim[1].get_length() if dim.rank.get_length() == 2 and dim[1].is_static else None
        positions = self.metadata.get(MAX_POSITIONS_KEY, "")
        self.max_positions: int | None = int(positions) if positions.isdigit() else None
        self.stripped = stripped_activation_quantizers(model) if device.startswith("CPU") else 0
        # activations run in float here: the graph has no activation quantizers, or the CPU plugin dropped them
        # all (a 16-bit graph; an 8-bit qnn-htp graph keeps its uint8 ones and is compared as quantized)
        act_bits = self.metadata.get("turboboa.act_bits", "none")
        self.float_activations = act_bits == "none" or (act_bits == "16" and bool(self.stripped))
        try:
            self.compiled = core.compile_model(model, device, compile_properties(core, device, self.threads))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
            detail = " ".join(str(e).split())[:300]
            raise UserError(f"OpenVINO cannot compile {self.path} for {device} ({detail}); try --device CPU or "
                            f"export again") from None
        self.request = self.compiled.create_infer_request()
        self.version = str(ov.get_version())

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the logits (1, L, V) OpenVINO computes for ``input_ids`` (1, L)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape (1, L), got {tuple(input_ids.shape)}")
        self.check_length(int(input_ids.shape[1]))
        ids = np.ascontiguousarray(input_ids.to("cpu", torch.int64).numpy())
        result = self.request.infer({INPUT: ids})
        logits = np.array(result[self.compiled.output(OUTPUT)], dtype=np.float32, copy=True)
        return torch.from_numpy(logits)

    def describe(self) -> dict[str, Any]:
        """The settings that decide the numbers (for the evaluation's JSON), read back from the compiled model."""
        settings: dict[str, Any] = {"openvino": self.version, "device": self.device}
        for key in [*PINNED, THREADS]:
            try:
                settings[key] = _text(self.compiled.get_property(key))
            except Exception:  # noqa: BLE001 - a property this device does not report
                continue
        if self.stripped:
            settings["activation_quantization"] = (f"{self.stripped} 16-bit activation quantizers stripped by "
                                                   f"OpenVINO's CPU plugin (float activations there)")
        return settings

    def close(self) -> None:
        """Release the compiled model and its request."""
        self.request = None
        self.compiled = None

    def __enter__(self) -> OpenVinoLogits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def openvino_logits_fn(path: str | os.PathLike[str], threads: int | None = None, device: str = "CPU") -> OpenVinoLogits:
    """A logits function running the OpenVINO IR or ONNX file ``path`` on the OpenVINO ``device`` with
    ``threads`` threads (default: all cores) and the pinned float32 properties; use it with ``with``."""
    return OpenVinoLogits(path, threads, device)
