"""Exporters: writers that pack a quantized checkpoint (QDIR) into a file a runtime loads.

An exporter is a function ``export(ckpt, output, **options) -> Path`` that sees only the checkpoint's public
interface (:class:`turboboa.checkpoint.QuantizedCheckpoint`: codes, grids, formats, float tensors, tokenizer
and config), never the solver. Built-ins register with :func:`register`; another package adds a format through
the ``turboboa.exporters`` entry-point group (``name = "package.module:function"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from turboboa.errors import UserError

Exporter = Callable[..., Path]
ENTRY_POINT_GROUP = "turboboa.exporters"
# built-in exporters: name -> "module:function", imported on first use
_BUILTIN = {"gguf": "exporters.gguf.export:export_gguf", "onnx": "exporters.onnx.export:export_onnx"}
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


def export(ckpt: Any, to: str, output: str | Path, **options: Any) -> Path:
    """Export the checkpoint ``ckpt`` with the exporter ``to`` into ``output``."""
    return get_exporter(to)(ckpt, Path(output), **options)
