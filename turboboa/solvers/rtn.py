"""Round-to-nearest: every weight rounded onto its (row, group) grid, no compensation."""

from __future__ import annotations

import torch

from ..grids import expand_groups
from .gptq import ColumnResult, Grid, fit_groups
from .linalg import as_float


def rtn_quantize(W: torch.Tensor, spec: Grid, group_size: int, H: torch.Tensor | None = None) -> ColumnResult:
    """``Z = round-to-nearest(W)`` on the grid of each (row, group) of ``W`` (``(B, R, C)``); ``H`` weights the
    range search and, for a codebook, the choice of each codeword (its diagonal block)."""
    W = as_float(W)
    grid = fit_groups(W, spec, group_size, H)
    C = W.shape[-1]
    s, z = expand_groups(grid.scale, group_size, C), expand_groups(grid.offset, group_size, C)
    codes = spec.nearest(W, s, z, H)
    return ColumnResult(spec.value(codes, s, z), codes, grid.scale, grid.offset, grid.stored)
