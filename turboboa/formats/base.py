"""Block storage formats, the stored grid of a row-block-quantized tensor, and the format registry.

A 2-D weight ``W[rows, cols]`` (PyTorch ``[out, in]``) is cut, row by row, into blocks of ``block_size``
consecutive input columns (32, or 256 for the k-quants); a block holds ``block_size / group_size`` groups of
contiguous columns (reference ``gguf-format.md`` §1). A block stores super-scales (``d``, ``dmin``; fp16 in
ggml), integer sub-scales (``sc``, ``m``; k-quants and LPBQ only) and one integer code per weight. Every
format dequantizes as

    w = scale_g * levels[code] - offset_g                                   (one fp32 rounding, at the "-")

with the per-group ``scale_g`` and ``offset_g`` given by :meth:`BlockFormat.group_scale_offset` as fp32
products of the stored values (exact for ggml, §1: ``fp32(d*sc)`` and ``fp32(dmin*m)``), so
:meth:`BlockFormat.dequantize` equals ggml's own dequantizer bit for bit.

:class:`BlockFormat` is the grid (what every solver and the ONNX exporter need); :class:`GgmlFormat` adds the
ggml type and its byte packing. Each concrete format (:mod:`turboboa.formats.ggml`,
:mod:`turboboa.formats.lpbq`) subclasses one of them with a ``name=`` keyword and is registered at definition
time in the registry of every grid (:mod:`turboboa.formats.registry`, which also holds the uniform grid
``int``); :func:`~turboboa.formats.registry.get_format` looks a name up.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from turboboa.errors import UserError
from turboboa.formats.fields import GgmlGrid
from turboboa.formats.registry import Format, GridParams, StoredLayer, all_format_names, get_format
from turboboa.formats.spec import format_spec

FP16_MAX = 65504.0
DEQUANT_ELEMENTS = 1 << 22  # weights dequantized per step: a big table's temporaries stay at a few MiB


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """``fp32(fp16(x))``: round to the nearest fp16 (ties to even), clamped to +-65504 so it stays finite.

    A negative zero becomes +0, so an all-zero block stores ``d = 0`` bytes ``00 00``.
    """
    y = x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    return torch.where(y == 0, torch.zeros_like(y), y)


def is_fp16_representable(x: torch.Tensor) -> bool:
    """True when every value of ``x`` is finite and ``fp32(fp16(x)) == x``."""
    x = x.float()
    return bool(torch.isfinite(x).all()) and torch.equal(x.to(torch.float16).to(torch.float32), x)


@dataclass
class BlockFields:
    """One ggml block per row of every array: the unit :meth:`GgmlFormat._pack_blocks` works on.

    ``q``: ``(N, block_size)`` uint8 codes; ``d``/``dmin``: ``(N,)`` float32; ``sc``/``m``: ``(N, G)`` int32
    with ``G = block_size / group_size`` (``None`` where the type has no such field).
    """

    q: np.ndarray
    d: np.ndarray
    dmin: np.ndarray | None = None
    sc: np.ndarray | None = None
    m: np.ndarray | None = None


class BlockFormat(Format):
    """A block-quantized storage grid: block layout, levels and the exact dequantizer. Subclass with ``name=``
    to register (:class:`GgmlFormat` for the ggml types, which add byte packing; LPBQ in
    :mod:`turboboa.formats.lpbq` has no GGUF type and no packing). Its bits, group size and symmetry are the
    format's own, whatever the run's ``--bits``/``--group-size``/``--sym``.

    Class constants (set by the subclass or derived in ``__init_subclass__``): ``name``, ``block_size``
    (columns fixed together), ``group_size``, ``bits``, ``levels`` (float32, code -> level, increasing),
    ``asymmetric``, ``sc_range``/``m_range`` (inclusive integer ranges of the sub-scales/sub-mins),
    ``row_scale`` (True when ``d`` is one value per row, repeated in every block: LPBQ's per-channel scale).
    """

    name: ClassVar[str]
    block_size: ClassVar[int]
    group_size: ClassVar[int]
    bits: ClassVar[int]
    levels: ClassVar[torch.Tensor]
    asymmetric: ClassVar[bool]
    sc_range: ClassVar[tuple[int, int] | None] = None
    m_range: ClassVar[tuple[int, int] | None] = None
    row_scale: ClassVar[bool] = False
    spec_class: ClassVar[Any] = None  # the solver grid class (None: turboboa.formats.spec.FormatSpec)
    groups_per_block: ClassVar[int]
    _levels_cache: ClassVar[dict[torch.device, torch.Tensor]]

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        """Fill the derived constants and register ``cls`` under ``name`` (abstract helpers pass no name)."""
        if name is not None:
            cls.groups_per_block = cls.block_size // cls.group_size
            cls.levels = cls.levels.to(torch.float32)
            cls._levels_cache = {}
            assert 2 < cls.levels.numel() <= 2**cls.bits, name
            assert bool((cls.levels[1:] > cls.levels[:-1]).all()), f"{name}: levels must increase with the code"
        super().__init_subclass__(name=name, **kwargs)

    # ------------------------------------------------------------------------------------------ layer
    @classmethod
    def grid_params(cls, bits: int, group_size: int, sym: bool) -> GridParams:
        """The format's own ``(bits, group_size, not asymmetric)``; the run's settings do not apply."""
        return GridParams(cls.bits, cls.group_size, not cls.asymmetric)

    @classmethod
    def solver_grid(cls, bits: int, group_size: int, sym: bool, search: bool) -> tuple[Any, int]:
        """The format's solver grid (:func:`~turboboa.formats.spec.format_spec`: ``FormatSpec`` or the class
        ``spec_class`` names) and its group size; the run's ``bits``/``group_size``/``sym`` do not apply."""
        return format_spec(cls.name, search=search), cls.group_size

    @classmethod
    def dequantize_layer(cls, layer: StoredLayer) -> torch.Tensor:
        """:meth:`dequantize` of the layer's codes on its stored block fields ``layer.grid``."""
        if layer.grid is None:
            raise ValueError(f"{cls.name}: a layer without its stored grid fields")
        return cls.dequantize(layer.codes, layer.grid)

    # ----------------------------------------------------------------------------------------- geometry
    @classmethod
    def supports_width(cls, cols: int) -> bool:
        """True when a row of ``cols`` columns is a whole number of blocks (``cols % block_size == 0``)."""
        return cols > 0 and cols % cls.block_size == 0

    @classmethod
    def check_width(cls, cols: int) -> None:
        """Raise :class:`UserError` unless ``cols`` is a multiple of ``block_size``."""
        if not cls.supports_width(cols):
            raise UserError(
                f"{cls.name}: a layer with {cols} input columns cannot be stored, the width must be a "
                f"multiple of the {cls.block_size}-column block; choose a format with "
                f"{min(32, cls.block_size)}-column blocks or keep this layer in float")

    @classmethod
    def code_max(cls) -> int:
        """The largest code, ``len(levels) - 1`` (codes run over ``0..code_max``; ``2^bits - 1`` except for
        the i-quants' sign-magnitude tables, e.g. IQ2's six levels in 3 bits)."""
        return cls.levels.numel() - 1

    @classmethod
    def levels_on(cls, device: torch.device | str) -> torch.Tensor:
        """``levels`` on ``device`` (cached, so per-column solver calls do not copy it every time)."""
        device = torch.device(device)
        if device not in cls._levels_cache:
            cls._levels_cache[device] = cls.levels.to(device)
        return cls._levels_cache[device]

    # ------------------------------------------------------------------------------------------ grid
    @classmethod
    @abstractmethod
    def group_scale_offset(cls, grid: GgmlGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (row, group) float32 ``(scale_g, offset_g)`` with ``w = scale_g * levels[code] - offset_g``.

        Both are exact fp32 products of the stored values, so evaluating the formula in fp32 (products
        exact, one rounding at the subtraction) is what ggml computes.
        """

    @classmethod
    @abstractmethod
    def snap(cls, scale: torch.Tensor, offset: torch.Tensor | None = None) -> GgmlGrid:
        """The stored grid nearest (the llama.cpp way) to continuous per (row, group) scales and offsets."""

    @classmethod
    def dequantize(cls, codes: torch.Tensor, grid: GgmlGrid) -> torch.Tensor:
        """``w[r, c] = fp32(scale_g * levels[code]) - offset_g`` with ``g = c // group_size``, float32.

        Equal bit for bit to ``gguf.quants.dequantize(pack(codes, grid), ggml_type)``.
        """
        scale, offset = cls.group_scale_offset(grid)
        rows, cols = codes.shape
        n_groups = scale.shape[-1]
        if cols != n_groups * cls.group_size:
            raise ValueError(f"{cls.name}: {cols} code columns do not match {n_groups} groups")
        scale, offset = scale.to(codes.device), offset.to(codes.device)
        out = torch.empty(rows, cols, dtype=torch.float32, device=codes.device)
        step = max(1, DEQUANT_ELEMENTS // max(1, cols))  # rows at a time: temporaries stay small for big tables
        for r in range(0, rows, step):
            out[r : r + step] = cls._dequantize_rows(codes[r : r + step], scale[r : r + step], offset[r : r + step])
        return out

    @classmethod
    def _dequantize_rows(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """:meth:`dequantize` of a few rows: ``fp32(scale_g * levels[code]) - offset_g`` (``(rows, cols)``)."""
        rows, cols = codes.shape
        lv = cls.levels_on(codes.device)[codes.long()].reshape(rows, -1, cls.group_size)
        w = scale.unsqueeze(-1) * lv
        w = w - offset.unsqueeze(-1)
        return w.reshape(rows, cols)

    @classmethod
    def quantize_codes(cls, w: torch.Tensor, scale: torch.Tensor,
                       offset: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of the representable values nearest to ``w``: ``argmin_q |scale*levels[q] - offset - w|``.

        ``scale``/``offset`` either have the shape of ``w`` (e.g. one GPTQ column: ``w``, ``scale``,
        ``offset`` all ``(rows,)``) or hold one value per group of ``group_size`` columns along the last axis
        (``w``: ``(..., cols)``, ``scale``: ``(..., cols / group_size)``). ``offset=None`` means 0.
        Returns uint8 codes in ``0..code_max``; out-of-range weights are clamped to the end levels, and a
        group with ``scale = 0`` (every code decodes to ``-offset``) gets any code. The nearest level is
        chosen by comparing the two fp32-dequantized levels bracketing ``(w + offset) / scale``, so it is
        exact for the values :meth:`dequantize` produces (ties go to the lower code).
        """
        if offset is None:
            offset = torch.zeros_like(scale)
        shape = w.shape
        if scale.shape != shape:
            if scale.shape[:-1] != shape[:-1] or shape[-1] != scale.shape[-1] * cls.group_size:
                raise ValueError(f"{cls.name}: scale of shape {tuple(scale.shape)} matches neither w "
                                 f"{tuple(shape)} nor its groups of {cls.group_size} columns")
            w = w.reshape(*shape[:-1], scale.shape[-1], cls.group_size)
            scale = scale.unsqueeze(-1)
            offset = offset.unsqueeze(-1)
        scale = scale.to(torch.float32)
        offset = offset.to(torch.float32)
        dtype = torch.promote_types(w.dtype, torch.float32)
        w = w.to(dtype)
        levels = cls.levels_on(w.device)
        nonzero = scale != 0
        t = torch.where(nonzero, (w + offset) / torch.where(nonzero, scale, torch.ones_like(scale)),
                        torch.zeros_like(w))
        hi = torch.searchsorted(levels, t.to(torch.float32).contiguous()).clamp(1, levels.numel() - 1)
        lo = hi - 1
        v_lo = (scale * levels[lo] - offset).to(dtype)
        v_hi = (scale * levels[hi] - offset).to(dtype)
        codes = torch.where((w - v_hi).abs() < (w - v_lo).abs(), hi, lo)
        return codes.reshape(shape).to(torch.uint8)

    @classmethod
    def store_scale(cls, x: torch.Tensor) -> torch.Tensor:
        """A continuous super-scale as the block stores it: ``fp32(fp16(x))`` (ggml's fp16 ``d``/``dmin``)."""
        return round_fp16(x)

    @classmethod
    def valid_scale(cls, x: torch.Tensor) -> torch.Tensor:
        """Where a stored super-scale is acceptable (every finite value for the ggml types)."""
        return torch.isfinite(x)


class GgmlFormat(BlockFormat):
    """A ggml quantization type: a :class:`BlockFormat` whose block is ggml's, plus its byte packing.

    Extra constants, from the gguf package: ``ggml_type``, ``block_size`` and ``type_size``
    (``gguf.GGML_QUANT_SIZES``), ``bpw = 8 * type_size / block_size``. Subclass with ``name=`` and
    ``ggml_type=`` to register.
    """

    ggml_type: ClassVar[GGMLQuantizationType]
    type_size: ClassVar[int]
    bpw: ClassVar[float]
    onnx_encoding = "levels"

    def __init_subclass__(cls, *, name: str | None = None, ggml_type: GGMLQuantizationType | None = None,
                          **kwargs: object) -> None:
        """Take the block geometry from ``ggml_type``, then register as a :class:`BlockFormat`."""
        if name is not None:
            if ggml_type is None:
                raise TypeError(f"format {name!r} needs ggml_type=")
            cls.ggml_type = ggml_type
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[ggml_type]
            cls.bpw = 8 * cls.type_size / cls.block_size
        super().__init_subclass__(name=name, **kwargs)

    @classmethod
    def row_bytes(cls, cols: int) -> int:
        """Bytes of one row: ``(cols / block_size) * type_size``."""
        cls.check_width(cols)
        return cols // cls.block_size * cls.type_size

    # ------------------------------------------------------------------------------------------ bytes
    @classmethod
    @abstractmethod
    def _pack_blocks(cls, blocks: BlockFields) -> np.ndarray:
        """``(N, type_size)`` uint8: the bytes of N blocks, in the layout of reference §2."""

    @classmethod
    @abstractmethod
    def _unpack_blocks(cls, raw: np.ndarray) -> BlockFields:
        """Inverse of :meth:`_pack_blocks` on ``(N, type_size)`` uint8."""

    @classmethod
    def check_grid(cls, codes: torch.Tensor, grid: GgmlGrid) -> None:
        """Raise ``ValueError`` unless codes and grid have this format's shapes, ranges and fp16 values."""
        rows, cols = codes.shape
        n_blocks, n_groups = cols // cls.block_size, cols // cls.group_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > cls.code_max()):
            raise ValueError(f"{cls.name}: codes must lie in 0..{cls.code_max()}")
        if tuple(grid.d.shape) != (rows, n_blocks) or not is_fp16_representable(grid.d):
            raise ValueError(f"{cls.name}: d must be ({rows}, {n_blocks}) finite fp16 values")
        if cls.asymmetric != (grid.dmin is not None):
            raise ValueError(f"{cls.name}: dmin must be {'given' if cls.asymmetric else 'None'}")
        if grid.dmin is not None and (tuple(grid.dmin.shape) != (rows, n_blocks)
                                      or not is_fp16_representable(grid.dmin)):
            raise ValueError(f"{cls.name}: dmin must be ({rows}, {n_blocks}) finite fp16 values")
        for label, field, rng in (("sc", grid.sc, cls.sc_range), ("m", grid.m, cls.m_range)):
            if (field is None) != (rng is None):
                raise ValueError(f"{cls.name}: {label} must be {'None' if rng is None else 'given'}")
            if field is not None and rng is not None:
                if tuple(field.shape) != (rows, n_groups):
                    raise ValueError(f"{cls.name}: {label} must have shape ({rows}, {n_groups})")
                if field.numel() and (int(field.min()) < rng[0] or int(field.max()) > rng[1]):
                    raise ValueError(f"{cls.name}: {label} must lie in {rng[0]}..{rng[1]}")

    @classmethod
    def pack(cls, codes: torch.Tensor, grid: GgmlGrid) -> np.ndarray:
        """The exact ggml bytes of a (rows, cols) tensor: uint8 ``(rows, (cols / block_size) * type_size)``.

        Raises :class:`UserError` when ``cols`` is not a multiple of ``block_size`` and ``ValueError`` when
        the codes or the grid are outside the type's ranges (see :meth:`check_grid`).
        """
        rows, cols = codes.shape
        cls.check_width(cols)
        cls.check_grid(codes, grid)
        n = rows * (cols // cls.block_size)
        g = cls.groups_per_block

        def ints(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().cpu().to(torch.int32).numpy().reshape(n, g)

        def floats(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().cpu().to(torch.float32).numpy().reshape(n)

        blocks = BlockFields(q=codes.detach().cpu().to(torch.uint8).numpy().reshape(n, cls.block_size),
                             d=floats(grid.d), dmin=floats(grid.dmin), sc=ints(grid.sc), m=ints(grid.m))
        raw = cls._pack_blocks(blocks)
        assert raw.shape == (n, cls.type_size) and raw.dtype == np.uint8
        return raw.reshape(rows, -1)

    @classmethod
    def unpack(cls, raw: np.ndarray) -> tuple[torch.Tensor, GgmlGrid]:
        """Inverse of :meth:`pack`: uint8 ``raw (rows, row_bytes)`` -> (uint8 codes (rows, cols), grid)."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        rows, nbytes = raw.shape
        if nbytes % cls.type_size:
            raise ValueError(f"{cls.name}: {nbytes} bytes per row is not a whole number of "
                             f"{cls.type_size}-byte blocks")
        n_blocks = nbytes // cls.type_size
        b = cls._unpack_blocks(raw.reshape(rows * n_blocks, cls.type_size))

        def ints(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a.astype(np.int32).reshape(rows, -1))

        def floats(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a.astype(np.float32).reshape(rows, n_blocks))

        codes = torch.from_numpy(b.q.astype(np.uint8).reshape(rows, n_blocks * cls.block_size))
        grid = GgmlGrid(d=floats(b.d), dmin=floats(b.dmin), sc=ints(b.sc), m=ints(b.m))
        return codes, grid


def block_format_names() -> tuple[str, ...]:
    """Names of the registered block formats (the ggml types, then LPBQ): the grids a lookup table (the
    embedding, an untied head) can be rounded onto."""
    return tuple(name for name in all_format_names() if issubclass(get_format(name), BlockFormat))
