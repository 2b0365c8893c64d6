"""The quantized form of one linear layer: integer codes, per-(row, group) scales and zero points."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grids import dequantize_weight


@dataclass
class QuantizedLinear:
    """``W_hat[r, c] = scale[r, c // G] * (codes[r, c] - zero[r, c // G])``; ``G = group_size`` (-1: per row)."""

    codes: torch.Tensor  # (d_out, d_in) uint8
    scale: torch.Tensor  # (d_out, n_groups) float32
    zero: torch.Tensor  # (d_out, n_groups) float32, integer-valued for integer grids
    bits: int
    group_size: int
    sym: bool

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scale, self.zero, self.group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]
