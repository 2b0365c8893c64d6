"""The optional ``openvino`` package (the ``npu`` extra), imported on first use."""

from __future__ import annotations

from types import ModuleType

from turboboa.errors import UserError

MISSING = "the openvino exporter needs the npu extra; install it with: pip install -e '.[npu]'"


def import_openvino() -> ModuleType:
    """The ``openvino`` module; a one-line :class:`UserError` naming the extra to install when it is missing."""
    try:
        import openvino
    except ImportError:
        raise UserError(MISSING) from None
    return openvino


def openvino_version() -> str:
    """The OpenVINO runtime's full build version (e.g. ``2026.4.1-22982-...``)."""
    return str(import_openvino().get_version())
