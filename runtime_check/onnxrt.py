"""Run an exported QDQ ONNX decoder in onnxruntime (CPU) on the same token windows as the torch backend.

:func:`onnx_logits_fn` returns a ``logits_fn`` for :func:`turboboa.eval.perplexity.perplexity`. The session
options are pinned so that activations stay float32 (:data:`SESSION_OPTIONS`):

* ``graph_optimization_level = ORT_ENABLE_BASIC``: only semantics-preserving rewrites (constant folding,
  redundant-node removal). The extended level would fuse ``DequantizeLinear -> MatMul`` into the contrib op
  ``MatMulNBits`` with ``accuracy_level = 4``, which quantizes the activations to int8 inside the matmul
  (about 1e-2 relative error per matmul, 3e-5 to 3e-4 relative in perplexity): not the model we exported.
* ``session.qdq_matmulnbits_accuracy_level = "1"`` (fp32 compute), so that the fusion, should a higher
  level ever be used with these options, keeps float activations too.
* a fixed ``intra_op_num_threads`` (and one inter-op thread), so repeated runs sum in the same order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turboboa.errors import UserError

SESSION_OPTIONS: dict[str, str] = {
    "graph_optimization_level": "ORT_ENABLE_BASIC",
    "session.qdq_matmulnbits_accuracy_level": "1",
}
INPUT = "input_ids"
TOKENIZER_KEY = "turboboa.tokenizer"
MAX_POSITIONS_KEY = "turboboa.max_positions"
PRODUCER = "turboboa"


def validate_onnx(path: str | os.PathLike[str], require_ours: bool = False) -> dict[str, str]:
    """Check that ``path`` is a complete ONNX model (and, with ``require_ours``, a turboboa export) before
    onnxruntime opens it; returns its ``turboboa.*`` metadata (empty for a foreign file).

    Refused in one line (:class:`UserError`): a missing file, bytes protobuf cannot parse as a model (random
    data, truncation), a model without a graph, external tensor data missing or shorter than the model says,
    and, with ``require_ours``, a model without turboboa's producer name and ``turboboa.*`` metadata.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable ONNX model ({' '.join(str(e).split())[:200]}); it is corrupt, "
                        f"truncated or another format: export it again") from None
    if model.ir_version <= 0 or not model.opset_import or not model.graph.node:
        raise UserError(f"{path} is not an ONNX model (no graph, IR version or opset); it is corrupt or another "
                        f"format: export it again")
    _check_external_data(path, model)
    meta = {p.key: p.value for p in model.metadata_props if p.key.startswith("turboboa.")}
    if require_ours and (model.producer_name != PRODUCER or not meta):
        raise UserError(f"{path} is an ONNX model that turboboa did not write (producer "
                        f"{model.producer_name or 'unknown'!r}, no turboboa.* metadata); export the QDIR with "
                        f"turboboa export --to onnx and pass that file")
    return meta


def _check_external_data(path: Path, model: Any) -> None:
    """Every initializer stored outside the model must lie inside its data file (beside ``path``)."""
    from onnx import TensorProto

    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        data = path.parent / info.get("location", "")
        if not data.is_file():
            raise UserError(f"{path} keeps tensor {t.name} in {data.name}, which is missing; copy it beside the "
                            f"model or export again")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > data.stat().st_size:
            raise UserError(f"{data} is truncated: tensor {t.name} ends at byte {end} of a "
                            f"{data.stat().st_size}-byte file; export again")


def session_options(threads: int) -> Any:
    """``onnxruntime.SessionOptions`` with :data:`SESSION_OPTIONS` and ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, SESSION_OPTIONS["graph_optimization_level"])
    for key, value in SESSION_OPTIONS.items():
        if key.startswith("session."):
            opts.add_session_config_entry(key, value)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


def open_session(path: str | os.PathLike[str], threads: int) -> Any:
    """An onnxruntime CPU session on the ONNX file ``path``; a missing or unloadable file is a UserError."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"onnxruntime cannot load {path} ({detail}); export it again with turboboa export") from None


class GraphWindows:
    """What every runtime of an exported decoder graph shares: the windows it takes (``static_seqlen``,
    ``max_positions``) and the tokenizer recorded at export (``metadata``), for the file ``path``."""

    path: Path
    static_seqlen: int | None
    max_positions: int | None
    metadata: dict[str, str]

    def check_length(self, length: int) -> None:
        """A UserError when windows of ``length`` tokens do not fit the graph."""
        if self.static_seqlen is not None and length != self.static_seqlen:
            raise UserError(f"{self.path} has a static sequence length of {self.static_seqlen} tokens; evaluate "
                            f"it with --seqlen {self.static_seqlen}, or export with --seqlen {length}")
        if self.max_positions is not None and length > self.max_positions:
            raise UserError(f"{self.path} covers {self.max_positions} positions; use --seqlen {self.max_positions} "
                            f"or less")

    def tokenizer(self, override: str | None = None) -> str:
        """The tokenizer folder for this model: ``override``, else the one recorded at export."""
        folder = override or self.metadata.get(TOKENIZER_KEY, "")
        if not folder:
            raise UserError(f"{self.path} records no tokenizer; pass --tokenizer (the QDIR it was exported from)")
        if not override and not Path(folder).is_absolute():  # recorded relative to the model's folder
            folder = str(self.path.parent / folder)
        if not Path(folder).is_dir():
            raise UserError(f"the tokenizer of {self.path} ({folder}) is missing; pass --tokenizer with the QDIR "
                            f"or a tokenizer folder")
        return folder


class OnnxLogits(GraphWindows):
    """A ``logits_fn``: input ids (1, L) -> onnxruntime's float32 logits (1, L, V) of every position.

    A graph with a static sequence length ``T`` takes windows of exactly ``T`` tokens; a dynamic one takes
    up to the model's RoPE table (``turboboa.max_positions``).
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        self.path = Path(path)
        self.threads = int(threads or max(1, os.cpu_count() or 1))
        self.session = self._open_session()
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != INPUT:
            raise UserError(f"{self.path} is not a turboboa decoder (its inputs are {[i.name for i in inputs]}, "
                            f"expected one {INPUT!r}); export it with turboboa export --to onnx")
        dim = inputs[0].shape[1] if len(inputs[0].shape) == 2 else None
        self.static_seqlen: int | None = dim if isinstance(dim, int) else None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        positions = self.metadata.get(MAX_POSITIONS_KEY, "")
        self.max_positions: int | None = int(positions) if positions.isdigit() else None

    def _open_session(self) -> Any:
        """The onnxruntime session on ``self.path`` (CPU here; subclasses open other execution providers)."""
        return open_session(self.path, self.threads)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the logits (1, L, V) onnxruntime computes for ``input_ids`` (1, L)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape (1, L), got {tuple(input_ids.shape)}")
        self.check_length(int(input_ids.shape[1]))
        ids = np.ascontiguousarray(input_ids.to("cpu", torch.int64).numpy())
        (logits,) = self.session.run(["logits"], {INPUT: ids})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def describe(self) -> dict[str, Any]:
        """The session settings that decide the numbers (for the evaluation's JSON)."""
        return {**SESSION_OPTIONS, "intra_op_num_threads": self.threads, "providers": "CPUExecutionProvider"}

    def close(self) -> None:
        """Release the session."""
        self.session = None

    def __enter__(self) -> OnnxLogits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def onnx_logits_fn(path: str | os.PathLike[str], threads: int | None = None) -> OnnxLogits:
    """A logits function running the ONNX file ``path`` in onnxruntime on ``threads`` CPU threads (default:
    all cores); use it with ``with`` (or call ``.close()``)."""
    return OnnxLogits(path, threads)
