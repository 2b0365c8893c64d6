"""``GridConfig``: the grid each weight is rounded onto: a uniform grid, a storage format, or a preset's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..arch import role_of
from ..errors import UserError
from ..formats import is_ggml_format
from ..formats.base import block_format_names
from ..formats.choice import FALLBACK, layer_format, parse_overrides, resolve_group
from ..formats.presets import check_preset, output_type, preset_format, table_format
from ..formats.registry import all_format_names, get_format
from ..grids import SUPPORTED_BITS
from .option import OptionGroup, option

GRIDS = ("auto", "minmax", "search")
FLOAT = "float"  # --embed-format float: the embedding and head stay float32


@dataclass(frozen=True)
class GridConfig(OptionGroup):
    """Which grid each layer, the embedding and the head are quantized onto. ``group_size`` is always an int
    once built (None resolves to 128, or to the block of an LPBQ format)."""

    bits: int = option(4, "2, 3, 4 or 8")
    group_size: int | None = option(
        None, "-1 = per output channel (default 128); under --format lpbq4 its block: 16, 32 (default), 64, 128")
    sym: bool = option(False, "symmetric grids (zero point 2^(bits-1))")
    grid: str = option("auto", "how a group's range is fitted: minmax, search (Hessian-weighted range search), "
                       "auto (search except for rtn)", choices=GRIDS)
    format: str = option(
        "int", "int (uniform grid of --bits/--group-size), a ggml type the GGUF file stores: "
        "q2_k q3_k q4_k q5_k q6_k q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl, or lpbq4 (Qualcomm LPBQ, for ONNX)")
    tensor_formats: tuple[str, ...] = option(
        (), "per-layer format override by module-name pattern, e.g. '*.down_proj=q6_k' (repeatable; the last "
        "match wins)", flag="--tensor-format", metavar="PATTERN=TYPE")
    preset: str = option("", "llama-quantize-like file type: Q4_0, Q2_K, Q3_K_S, Q3_K_M or Q4_K_M (a ggml type "
                         "per tensor, embedding included; see docs/formats-and-export.md)")
    embed_format: str = option(
        "", "type of the token embedding and the head: float, or a ggml type (default: llama-quantize's choice "
        "for the file: q6_k for the head or a tied embedding, q8_0 where the width is not a multiple of 256, "
        "the layers' type for an untied embedding; a preset's own types)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format.lower() not in all_format_names():
            raise UserError(f"unknown --format '{self.format}'; choose one of {', '.join(all_format_names())}")
        fmt, group_size = resolve_group(self.format.lower(), self.group_size)
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "group_size", group_size)
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"--bits {self.bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size == 0 or self.group_size < -1:
            raise UserError(f"--group-size {self.group_size} is invalid; use -1 (per output channel) or a positive size")
        if self.grid not in GRIDS:
            raise UserError(f"unknown grid '{self.grid}'; choose one of {', '.join(GRIDS)}")
        object.__setattr__(self, "tensor_formats", tuple(self.tensor_formats))
        parse_overrides(self.tensor_formats)
        if self.preset:
            object.__setattr__(self, "preset", check_preset(self.preset))
        if self.embed_format and self.embed_format.lower() not in (FLOAT, *block_format_names()):
            raise UserError(f"unknown --embed-format '{self.embed_format}'; choose {FLOAT} or one of "
                            f"{', '.join(block_format_names())}")

    def layer_format(self, name: str, columns: int, shape: Any = None, role: str | None = None) -> str:
        """The grid layer ``name`` is quantized onto: "int" or a ggml type: the preset's choice (``shape``, a
        :class:`~turboboa.formats.presets.ModelShape`, is then needed; ``role``: the layer's role, by default
        the one its name has, :func:`turboboa.arch.role_of`) or ``format``, then the overrides, then the width
        fallbacks."""
        default = preset_format(self.preset, name, shape, role) if self.preset else self.format
        return layer_format(default, name, columns, parse_overrides(self.tensor_formats), bool(self.preset))

    def embedding_format(self, columns: int, shape: Any, name: str = "", role: str | None = None) -> str:
        """The token embedding's format (or, for the head's ``name`` or ``role="head"``, an untied head's):
        ``embed_format`` ("" for ``float``), else llama-quantize's choice for the file type: the preset's, or that
        of a file whose layers are the ggml type ``format`` (:func:`~turboboa.formats.presets.table_format`: q6_k
        for the head or a tied embedding, the layers' type for an untied one); for a uniform or LPBQ grid q6_k
        for both. Then the overrides (matched against ``name``) and width fallbacks (q6_k -> q8_0); a width no
        block fits keeps float. ``role``: "embedding" or "head", by default the role of ``name``
        (:func:`turboboa.arch.role_of`), the embedding without a name."""
        role = role or (role_of(name) if name else "embedding")
        if self.embed_format.lower() == FLOAT:
            return ""
        derived = not self.embed_format
        if self.embed_format:
            fmt = self.embed_format.lower()
        elif self.preset:
            fmt = preset_format(self.preset, name, shape, role)
            output = role == "head" or shape.tied
            if output and columns % 256:  # llama.cpp: an output matrix whose width takes no 256-block is q8_0
                fmt = "q8_0"
        else:  # the layers' file type; a grid GGUF cannot hold (uniform, LPBQ) has none: about 8-bit tables
            fmt = (table_format(self.format, role, shape) if is_ggml_format(self.format)
                   else output_type("q8_0" if self.bits == 8 else ""))
            if not get_format(fmt).supports_width(columns):
                fmt = FALLBACK.get(fmt, fmt)
            if not get_format(fmt).supports_width(columns):
                return ""  # no block of this type fits the width: the table stays float, as the user did not ask
        return layer_format(fmt, name, columns, parse_overrides(self.tensor_formats), from_preset=derived)
