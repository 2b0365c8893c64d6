"""Round-to-nearest: every weight rounded onto its (row, group) grid, no compensation."""

from __future__ import annotations

import torch

from ..grids import GridSpec, dequantize, expand_groups, quantize_codes
from .gptq import ColumnResult, fit_groups
from .linalg import as_float


def rtn_quantize(W: torch.Tensor, spec: GridSpec, group_size: int, H: torch.Tensor | None = None) -> ColumnResult:
    """``Z = clamp(round(W / s) + z0)`` per (row, group) of ``W`` (``(B, R, C)``); ``H`` weights the range search."""
    W = as_float(W)
    scale, zero = fit_groups(W, spec, group_size, H)
    C = W.shape[-1]
    s, z = expand_groups(scale, group_size, C), expand_groups(zero, group_size, C)
    codes = quantize_codes(W, s, z, spec.maxq)
    return ColumnResult(dequantize(codes, s, z), codes, scale, zero)
