"""``turboboa export``: pack a QDIR with an exporter and, for Qualcomm's HTP, compile the precompiled context.

An ONNX graph of ``--profile qnn-htp`` is what the QNN HTP backend compiles whole; ``qnn_context`` also
compiles it there (CPU fallback disabled, so a node the HTP rejects is a one-line error) and writes the
EPContext model, the form that ships to Snapdragon devices, beside it (:func:`exporters.onnx.export.qnn_context_path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import exporters
from exporters.onnx.export import qnn_context_path
from runtime_check.qnn import open_qnn_session
from turboboa.errors import UserError


def export(ckpt: Any, to: str, output: str | Path, progress: bool = False, qnn_context: bool = False,
           **options: Any) -> Path:
    """:func:`exporters.export` of ``ckpt`` with the exporter ``to`` into ``output``; with ``qnn_context``
    (``--to onnx --profile qnn-htp`` only) also the compiled EPContext model ``<name>_ctx.onnx``."""
    if qnn_context and (to != "onnx" or options.get("profile") != "qnn-htp"):
        raise UserError("--qnn-context compiles a --profile qnn-htp graph; export with --to onnx --profile qnn-htp")
    path = exporters.export(ckpt, to, output, progress=progress, **options)
    if qnn_context:
        open_qnn_session(path, context_out=qnn_context_path(path))
    return path
