"""Exporters: writers that pack a quantized checkpoint (QDIR) into a file a runtime loads.

An exporter is a function ``export(ckpt, output, **options) -> Path`` that sees only the checkpoint's public
interface (:class:`turboboa.checkpoint.QuantizedCheckpoint`: codes, grids, formats, float tensors, tokenizer
and config), never the solver. Built-ins register with :func:`register`; another package adds a format through
the ``turboboa.exporters`` entry-point group (``name = "package.module:function"``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from turboboa.arch import role_of
from turboboa.errors import UserError
from turboboa.output_files import prepare_output, remove_stale_temporaries, write_errors_as_user_errors

Exporter = Callable[..., Path]
ENTRY_POINT_GROUP = "turboboa.exporters"
# built-in exporters: name -> "module:function", imported on first use
_BUILTIN = {"gguf": "exporters.gguf.export:export_gguf", "onnx": "exporters.onnx.export:export_onnx",
            "openvino": "exporters.openvino.export:export_openvino"}
_REGISTRY: dict[str, Exporter] = {}


def register(name: str) -> Callable[[Exporter], Exporter]:
    """Decorator: register ``fn`` as the exporter called ``name``."""
    def wrap(fn: Exporter) -> Exporter:
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load(target: str) -> Exporter:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def exporter_names() -> list[str]:
    """Every known exporter: built-ins, registered ones and entry points."""
    names = set(_BUILTIN) | set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def get_exporter(name: str) -> Exporter:
    """The exporter called ``name``; a :class:`UserError` listing the known ones when there is none."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        return _load(_BUILTIN[name])
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise UserError(f"unknown export target {name!r}; choose one of {', '.join(exporter_names())}")


def estimate_export_bytes(ckpt: Any) -> int:
    """Bytes an exported file of ``ckpt`` takes, about, as an upper bound: 9/8 byte per quantized weight (no
    ggml or ONNX container stores more than 8.5 bits) plus float32 scales and zeros, four bytes per float
    value (a quantized embedding counted as float32, as the ONNX export stores it), and 8 MiB of metadata and
    tokenizer."""
    total = 8 * 2**20
    for name, q in ckpt.layers.items():
        table = role_of(name) == "embedding"
        total += 4 * q.codes.numel() if table else q.codes.numel() * 9 // 8 + 8 * q.scale.numel()
    return total + sum(4 * t.numel() for t in ckpt.float_tensors.values())


def file_bytes(path: str | Path) -> int:
    """Bytes of the exported file ``path`` with its companion: an ONNX model's external data
    (``<name>.data``) or an OpenVINO IR's weights (``.bin`` beside the ``.xml``)."""
    path = Path(path)
    companion = path.with_suffix(".bin") if path.suffix == ".xml" else path.with_name(path.name + ".data")
    return path.stat().st_size + (companion.stat().st_size if companion.is_file() else 0)


def size_summary(path: str | Path, parameters: int) -> dict[str, float]:
    """``{"bytes", "mib", "bits_per_weight"}`` of an exported file: bits per weight are the file's bytes
    (companion included) x 8 over ``parameters``, the source model's parameter count."""
    size = file_bytes(path)
    return {"bytes": size, "mib": round(size / 2**20, 3), "bits_per_weight": round(8 * size / parameters, 4)}


def takes_progress(exporter: Exporter) -> bool:
    """Whether ``exporter`` has a ``progress`` parameter (progress bars on stderr)."""
    try:
        return "progress" in inspect.signature(exporter).parameters
    except (TypeError, ValueError):
        return False


def export(ckpt: Any, to: str, output: str | Path, progress: bool = False, **options: Any) -> Path:
    """Export the checkpoint ``ckpt`` with the exporter ``to`` into ``output``; ``progress`` (bars with ETA on
    stderr) is passed to exporters that take it.

    Before the exporter runs: the exporter must exist, ``output`` must not be a folder, its location must be
    writable and hold enough free space (:func:`estimate_export_bytes`); a disk that fills up during the
    write is a one-line :class:`UserError` too (the exporters write under a temporary name and rename). The
    temporaries a killed export of ``output`` left beside it are removed first."""
    exporter = get_exporter(to)
    output = Path(output)
    if output.is_dir():
        raise UserError(f"{output} is a folder; pass a file name for -o")
    prepare_output(output, estimate_export_bytes(ckpt), f"the {to} file")
    with write_errors_as_user_errors(output):
        remove_stale_temporaries(output)
        if takes_progress(exporter):
            options["progress"] = progress
        return exporter(ckpt, output, **options)
