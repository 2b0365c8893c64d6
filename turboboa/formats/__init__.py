"""Storage formats: ggml block layouts as small registered classes (pure data layout, no solver).

``get_format("q4_k")`` returns the :class:`~turboboa.formats.base.GgmlFormat` subclass for a ggml type; a
solver snaps its continuous per-group scales onto the stored grid (``snap``), rounds weights onto it
(``quantize_codes``), and an exporter writes the exact block bytes (``pack``). See ``formats/ggml.py`` for the
table of types, levels and formulas.
"""

from turboboa.formats import ggml
from turboboa.formats.base import BlockFields, GgmlFormat, GgmlGrid, format_names, get_format

__all__ = ["BlockFields", "GgmlFormat", "GgmlGrid", "format_names", "get_format", "ggml"]
