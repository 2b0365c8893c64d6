"""The format registry: every grid a layer can be quantized onto is a registered :class:`Format` class.

A layer (:class:`~turboboa.quantized.QuantizedLinear`) names its format (``fmt``), and everything that
depends on the kind of grid asks that class: how the layer dequantizes (:meth:`Format.dequantize_layer`),
which grid the solvers fit (:meth:`Format.solver_grid`), the grid's bits, group size and symmetry
(:meth:`Format.grid_params`), which widths it stores (:meth:`Format.check_columns`), and what exporters can
do with it (``ggml_type`` for GGUF, ``onnx_encoding`` for ONNX QDQ).

Two families subclass :class:`Format` with a ``name=`` keyword, which registers them at definition time:

* the uniform integer grid ``"int"`` (:mod:`turboboa.formats.uniform`), whose bits, group size and symmetry
  are the run's and are stored on each layer (``configurable``);
* the block formats (:class:`~turboboa.formats.base.BlockFormat`: the ggml types, the i-quants, LPBQ), whose
  grid is fixed by the format and stored in the layer's ``grid`` fields.

Formats are used as classes (all methods are class methods; there is no instance state).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import torch

from turboboa.errors import UserError

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

    from turboboa.formats.fields import GgmlGrid

_REGISTRY: dict[str, type[Format]] = {}


class GridParams(NamedTuple):
    """A layer's grid in three numbers: ``bits`` per code, ``group_size`` (columns sharing a scale; <= 0 per
    output channel) and ``sym`` (no offset: zero point ``2^(bits-1)`` or a symmetric level table)."""

    bits: int
    group_size: int
    sym: bool


class StoredLayer(Protocol):
    """The stored fields of a quantized layer that a format decodes (``QuantizedLinear`` has them):
    uint8 ``codes`` ``(rows, cols)``, float32 per-(row, group) ``scale``/``zero`` ``(rows, n_groups)``, the
    layer's ``bits``/``group_size``/``sym``, and the block fields ``grid`` of a block format (else None)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    grid: GgmlGrid | None


class Format(ABC):
    """A registered grid. Subclass with ``name=`` (and ``family=`` where several registered formats are one
    ``--format`` choice, as the LPBQ block sizes) to register.

    Class constants: ``name``; ``family`` (the ``--format`` name a user picks it by; the name by default);
    ``configurable`` (bits, group size and symmetry are the run's ``--bits``/``--group-size``/``--sym``, not
    fixed by the format); ``ggml_type`` (the GGUF tensor type that stores it bit for bit, None when no ggml
    type does); ``onnx_encoding`` (how ONNX QDQ writes it, None for no DequantizeLinear form: ``"uniform"``
    integer codes with a per-group scale and zero point, ``"levels"`` the signed level of each code with a
    float group scale, ``"lpbq"`` integer block multipliers of a per-channel scale; the ONNX exporter maps
    each to its encoder and decides which level tables it holds).
    """

    name: ClassVar[str]
    family: ClassVar[str]
    configurable: ClassVar[bool] = False
    ggml_type: ClassVar[GGMLQuantizationType | None] = None
    onnx_encoding: ClassVar[str | None] = None

    def __init__(self) -> None:
        raise TypeError("formats are used as classes (get_format(name).dequantize_layer(...)), not instances")

    def __init_subclass__(cls, *, name: str | None = None, family: str | None = None, **kwargs: object) -> None:
        """Register ``cls`` under ``name`` (abstract helpers pass no name)."""
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        if name in _REGISTRY:
            raise TypeError(f"format {name!r} is registered twice")
        cls.name = name
        cls.family = family or name
        _REGISTRY[name] = cls

    # ------------------------------------------------------------------------------------------ grid
    @classmethod
    @abstractmethod
    def grid_params(cls, bits: int, group_size: int, sym: bool) -> GridParams:
        """The grid of a layer (or run) on this format whose own settings are ``bits``/``group_size``/``sym``:
        those settings for a configurable format, the format's fixed ones otherwise."""

    @classmethod
    @abstractmethod
    def solver_grid(cls, bits: int, group_size: int, sym: bool, search: bool) -> tuple[Any, int]:
        """The grid the solvers quantize onto (``turboboa.grids.GridSpec`` or a
        ``turboboa.formats.spec.FormatSpec``) and its group size, for the run's ``bits``/``group_size``/``sym``;
        ``search``: the Hessian-weighted range search instead of min-max."""

    @classmethod
    @abstractmethod
    def dequantize_layer(cls, layer: StoredLayer) -> torch.Tensor:
        """The fake-quant weight ``W_hat`` ``(rows, cols)`` (float32) of a layer stored on this format."""

    # ------------------------------------------------------------------------------------------ width
    @classmethod
    def supports_width(cls, cols: int) -> bool:
        """True when a row of ``cols`` columns can be stored (any positive width unless the format has blocks)."""
        return cols > 0

    @classmethod
    def check_width(cls, cols: int) -> None:
        """Raise :class:`UserError` unless :meth:`supports_width`."""
        if not cls.supports_width(cols):
            raise UserError(f"{cls.name}: a layer with {cols} input columns cannot be stored")

    @classmethod
    def check_columns(cls, columns: int, group_size: int, where: str) -> None:
        """Raise :class:`UserError` unless a layer of ``columns`` inputs (``where``: e.g. ``layer 3.q_proj``)
        can be stored under the run's ``group_size``; by default the format's own width rule."""
        cls.check_width(columns)

    # ------------------------------------------------------------------------------------------ export
    @classmethod
    def gguf_refusal(cls, source: str, layer: str) -> str:
        """Why a checkpoint (``source``) whose layer ``layer`` is on this format has no GGUF file, and the fix
        (one line; only asked when ``ggml_type`` is None)."""
        return (f"{source} holds {cls.name} layers (e.g. {layer}), which no ggml type stores; quantize with a "
                f"ggml --format (q4_k, q4_0, iq4_nl, ...) to export GGUF")


def get_format(name: str) -> type[Format]:
    """The registered format called ``name`` (case-insensitive); :class:`UserError` listing the known ones."""
    fmt = _REGISTRY.get(name.lower())
    if fmt is None:
        raise UserError(f"unknown format {name!r}; choose one of {', '.join(all_format_names())}")
    return fmt


def is_ggml_format(name: str) -> bool:
    """True when ``name`` is a registered format a ggml type stores (one a GGUF file can hold)."""
    fmt = _REGISTRY.get(name.lower())
    return fmt is not None and fmt.ggml_type is not None


def format_names() -> tuple[str, ...]:
    """Names of the registered ggml types (the GGUF-packable formats), in registration order."""
    return tuple(name for name, fmt in _REGISTRY.items() if fmt.ggml_type is not None)


def all_format_names() -> tuple[str, ...]:
    """Names of every registered format: the uniform grid ``int``, the ggml types, then the others (LPBQ)."""
    return tuple(_REGISTRY)
