"""Grids as small registered classes (pure data layout, no solver): the uniform integer grid, the ggml block
layouts and Qualcomm's LPBQ.

``get_format("q4_k")`` returns the :class:`~turboboa.formats.registry.Format` subclass of a format
(``get_format("int")`` the uniform grid's, :mod:`turboboa.formats.uniform`); a layer dequantizes through it
(``dequantize_layer``), a solver quantizes onto the grid it names (``solver_grid``: ``GridSpec`` for the
uniform grid, :func:`~turboboa.formats.spec.format_spec` for the block formats: fit, snap, round, decode), and
an exporter asks it what it can write: a ggml type (:class:`~turboboa.formats.base.GgmlFormat`, ``ggml_type``)
packs its exact block bytes (``pack``) for GGUF, ``onnx_encoding`` names the ONNX QDQ pattern. See
``formats/uniform.py``, ``formats/ggml.py`` and ``formats/lpbq.py`` for the formulas.
"""

from turboboa.formats import uniform  # registered first: the default grid leads every list of format names

# isort: split
from turboboa.formats import ggml, iquant, lpbq
from turboboa.formats.base import BlockFields, BlockFormat, GgmlFormat, GgmlGrid, block_format_names
from turboboa.formats.registry import (
    Format,
    GridParams,
    all_format_names,
    format_names,
    get_format,
    is_ggml_format,
)

__all__ = ["BlockFields", "BlockFormat", "Format", "GgmlFormat", "GgmlGrid", "GridParams", "all_format_names",
           "block_format_names", "format_names", "get_format", "ggml", "iquant", "is_ggml_format", "lpbq",
           "uniform"]
