"""The quantized form of one linear layer: integer codes and the grid they decode on.

The layer names its format (``fmt``, a registered :class:`~turboboa.formats.registry.Format`), and that
format's ``dequantize_layer`` is the one dequantizer every consumer (fake-quant model, exporters, checker)
uses:

* ``fmt == "int"`` (:mod:`turboboa.formats.uniform`): the uniform grid of the layer's ``bits``/``group_size``/
  ``sym``, ``W_hat[r, c] = scale[r, g] * (codes[r, c] - zero[r, g])``, ``g = c // group_size``;
* ``fmt`` a ggml type (``q4_k``, ``iq4_nl``, ...): the stored block fields in ``grid`` (fp16 ``d``/``dmin``,
  integer ``sc``/``m``) decoded by that format's ``dequantize``, bit-identical to ggml's dequantizer;
  ``scale``/``zero`` then hold the exact per-group ``scale_g``/``offset_g`` (``w = scale_g * level - offset_g``);
* ``fmt`` an LPBQ format (``lpbq4``, ``lpbq4_g64``, ...): ``grid.d`` the float32 per-channel scale (repeated
  per block), ``grid.sc`` the integer block multipliers, ``W_hat = fp32(fp32(d * sc) * (codes - 8))``
  (:mod:`turboboa.formats.lpbq`), bit-identical to the ONNX DequantizeLinear pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats.base import GgmlGrid
from .formats.registry import get_format
from .formats.uniform import UNIFORM


@dataclass
class QuantizedLinear:
    """Codes ``(d_out, d_in)`` uint8, per-(row, group) ``scale``/``zero`` float32, the grid's ``bits``/
    ``group_size``/``sym``, its format ``fmt`` (the uniform grid by default) and the stored block fields
    ``grid`` when ``fmt`` names a block format."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    fmt: str = UNIFORM
    grid: GgmlGrid | None = None

    def dequantize(self) -> torch.Tensor:
        """The fake-quant weight ``W_hat`` (float32): the layer's format decodes its stored fields."""
        return get_format(self.fmt).dequantize_layer(self)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def row_slice(self, start: int, stop: int) -> QuantizedLinear:
        """Rows ``start:stop`` of the layer (views: codes, scales, zero points and grid fields share memory)."""
        grid = None
        if self.grid is not None:
            grid = GgmlGrid(**{k: None if v is None else v[start:stop] for k, v in vars(self.grid).items()})
        return QuantizedLinear(codes=self.codes[start:stop], scale=self.scale[start:stop],
                               zero=self.zero[start:stop], bits=self.bits, group_size=self.group_size,
                               sym=self.sym, fmt=self.fmt, grid=grid)


def _row_fields(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """Every stored tensor of ``q`` (codes, scales, zero points, the grid fields it has), each with one row per
    output row."""
    fields = {"codes": q.codes, "scale": q.scale, "zero": q.zero}
    if q.grid is not None:
        fields.update({f"grid.{k}": v for k, v in vars(q.grid).items() if v is not None})
    return fields


def empty_rows(like: QuantizedLinear, rows: int) -> QuantizedLinear:
    """An uninitialized layer of ``rows`` rows with the format, grid and per-row field shapes of ``like``, to be
    filled part by part (:func:`set_rows`) without holding the parts and the whole at once."""
    new = {k: torch.empty((rows, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in _row_fields(like).items()}
    grid = None
    if like.grid is not None:
        grid = GgmlGrid(**{k: new.get(f"grid.{k}") for k in vars(like.grid)})
    return QuantizedLinear(codes=new["codes"], scale=new["scale"], zero=new["zero"], bits=like.bits,
                           group_size=like.group_size, sym=like.sym, fmt=like.fmt, grid=grid)


def set_rows(layer: QuantizedLinear, start: int, part: QuantizedLinear) -> None:
    """Copy ``part``'s rows into ``layer``'s rows ``start .. start + len(part) - 1`` (every stored field)."""
    target = _row_fields(layer.row_slice(start, start + part.shape[0]))
    for key, value in _row_fields(part).items():
        target[key].copy_(value)
