"""Storage formats: ggml block layouts and Qualcomm's LPBQ as small registered classes (pure data layout, no
solver).

``get_format("q4_k")`` returns the :class:`~turboboa.formats.base.BlockFormat` subclass of a format; a solver
quantizes onto its grid through :func:`~turboboa.formats.spec.format_spec` (fit, snap, round, decode), and
an exporter writes it: a ggml type (:class:`~turboboa.formats.base.GgmlFormat`) packs its exact block bytes
(``pack``) for GGUF, LPBQ (``lpbq4``) has its own ONNX pattern. See ``formats/ggml.py`` and
``formats/lpbq.py`` for the tables of types, levels and formulas.
"""

from turboboa.formats import ggml, iquant, lpbq
from turboboa.formats.base import (
    BlockFields,
    BlockFormat,
    GgmlFormat,
    GgmlGrid,
    all_format_names,
    format_names,
    get_format,
    is_ggml_format,
)

__all__ = ["BlockFields", "BlockFormat", "GgmlFormat", "GgmlGrid", "all_format_names", "format_names",
           "get_format", "ggml", "iquant", "is_ggml_format", "lpbq"]
